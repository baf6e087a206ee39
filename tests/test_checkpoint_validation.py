"""Safetensors headers and indexes are validated as the safetensors library does, before any work.

The property: on valid headers (random tensors, dtypes, shapes incl. zero-size, metadata, padding) our reader
and ``safetensors.safe_open`` both accept and see the same tensors; on corrupted ones (each class below) ours
raises :class:`CheckpointError` exactly when ``safe_open`` refuses, except where we are stricter on purpose
(``strict``: a repeated JSON key, serde's lenient array / ``{"F32": null}`` forms), and never anything else.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_llama
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from safetensors import safe_open
from safetensors.torch import save_file

from hf_specdef import protect_checkpoint
from hf_specdef.storage.checkpoint import ST_DTYPES, Checkpoint, CheckpointError, open_checkpoint, read_header
from hf_specdef.storage.safetensors_header import DTYPE_BITS, MAX_HEADER_BYTES

SETTINGS = settings(max_examples=150, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
DTYPES = sorted(DTYPE_BITS)
NAMES = st.text(st.characters(codec="utf-8"), max_size=8).filter(lambda s: s != "__metadata__")
SMALL_JSON = st.recursive(st.none() | st.booleans() | st.integers(-5, 10**30) | st.text(max_size=4)
                          | st.floats(allow_nan=False, allow_infinity=False),
                          lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3),
                          max_leaves=6)


# --------------------------------------------------------------------------------------------
# Model headers, files, and the two readers
# --------------------------------------------------------------------------------------------

@dataclass
class Model:
    """A header as JSON objects (``entries`` in header order) plus how it is written."""

    entries: dict[str, dict[str, Any]]
    metadata: Any = None  # written as "__metadata__" unless _ABSENT
    data_size: int = 0
    ensure_ascii: bool = True
    lead: str = ""
    pad: str = ""  # "" / spaces to an 8-byte boundary / other JSON whitespace
    seed: int = 0

    def obj(self) -> dict[str, Any]:
        head = {} if self.metadata is _ABSENT else {"__metadata__": self.metadata}
        return {**head, **self.entries}

    def text(self, obj: Any = None) -> str:
        return json.dumps(self.obj() if obj is None else obj, ensure_ascii=self.ensure_ascii, separators=(",", ":"))

    def case(self, text: str | None = None, **kw: Any) -> Case:
        raw = (self.lead + (self.text() if text is None else text)).encode("utf-8")
        raw += (b" " * (-len(raw) % 8)) if self.pad == "align" else self.pad.encode()
        return Case(raw, self.data_size, seed=self.seed, **kw)

    def sorted_names(self) -> list[str]:
        return sorted(self.entries, key=lambda n: tuple(self.entries[n]["data_offsets"]))


_ABSENT = object()


@dataclass
class Case:
    """What is written: ``8-byte length (n, or the real one) + header + data``, then ``cut`` bytes removed."""

    header: bytes
    data_size: int
    n: int | None = None
    cut: int = 0
    strict: bool = False  # refused by us on purpose even where safetensors accepts
    seed: int = 0
    tags: list[str] = field(default_factory=list)

    def write(self, path: Path) -> bytes:
        data = random.Random(self.seed).randbytes(self.data_size)
        blob = struct.pack("<Q", len(self.header) if self.n is None else self.n) + self.header + data
        blob = blob[: len(blob) - self.cut] if self.cut else blob
        path.write_bytes(blob)
        return blob


def _nbytes(dtype: str, shape: list[int]) -> int:
    return math.prod(shape) * DTYPE_BITS[dtype] // 8


def _layout(entries: dict[str, dict[str, Any]], order: list[str]) -> int:
    """Give the entries contiguous offsets in ``order``; returns the data size."""
    pos = 0
    for name in order:
        e = entries[name]
        size = -(-math.prod(e["shape"]) * DTYPE_BITS[e["dtype"]] // 8)
        e["data_offsets"] = [pos, pos + size]
        pos += size
    return pos


@st.composite
def models(draw: Any, min_tensors: int = 0) -> Model:
    names = draw(st.lists(NAMES, min_size=min_tensors, max_size=5, unique=True))
    entries: dict[str, dict[str, Any]] = {}
    for name in names:
        dtype = draw(st.sampled_from(DTYPES))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        if math.prod(shape) * DTYPE_BITS[dtype] % 8:  # sub-byte dtypes: whole bytes
            shape.append(8 // math.gcd(DTYPE_BITS[dtype], 8))
        entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": [0, 0]}
        if draw(st.integers(0, 5)) == 0:  # fields safetensors ignores
            entries[name]["extra"] = draw(SMALL_JSON)
    size = _layout(entries, draw(st.permutations(names)))
    metadata = draw(st.sampled_from([_ABSENT, None, "dict"]))
    if metadata == "dict":
        metadata = draw(st.dictionaries(NAMES, st.text(max_size=6), max_size=3))
    return Model(entries, metadata, size, draw(st.booleans()), draw(st.sampled_from(["", " ", "\n\t "])),
                 draw(st.sampled_from(["", "align", "  ", "\r\n"])), draw(st.integers(0, 2**16)))


def _reference(path: Path) -> tuple[dict[str, tuple[str, list[int]]], Any] | None:
    """What ``safe_open`` sees (name -> (dtype, shape), metadata), or None if it refuses the file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata()
    except Exception:  # SafetensorError, or an OSError for a file too short to map
        return None


def _ours(path: Path) -> tuple[dict, Any] | str:
    """Our reader: ``(infos, metadata)``, or the refusal message. Any other exception fails the test."""
    try:
        return read_header(path)
    except CheckpointError as e:
        msg = str(e)
        assert "\n" not in msg and str(path) in msg, msg
        return msg


def _check(case: Case, path: Path) -> None:
    blob = case.write(path)
    ref, ours = _reference(path), _ours(path)
    if currently_in_test_context():
        event(f"safe_open {'accepts' if ref else 'refuses'}" + (", strict" if case.strict else ""))
    if ref is None or case.strict:
        assert isinstance(ours, str), f"safe_open refuses (or strict) but we accept {blob[:300]!r}"
        return
    assert not isinstance(ours, str), f"safe_open accepts but we refuse: {ours}; {blob[:300]!r}"
    infos, meta = ours
    ref_tensors, ref_meta = ref
    assert {n: (i.dtype, list(i.shape)) for n, i in infos.items()} == ref_tensors
    assert meta == ref_meta
    with safe_open(str(path), framework="pt") as f:  # the byte ranges: the same bytes as safetensors reads
        for name, info in infos.items():
            if info.dtype in ST_DTYPES and info.nbytes:
                t = f.get_tensor(name)
                assert t.reshape(-1).view(torch.uint8).numpy().tobytes() == blob[info.begin:info.end], name


@pytest.fixture(scope="module")
def shard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("headers") / "t.safetensors"


# --------------------------------------------------------------------------------------------
# Valid headers: both accept, same tensors
# --------------------------------------------------------------------------------------------

@SETTINGS
@given(model=models())
def test_valid_headers_agree_with_safe_open(model: Model, shard: Path) -> None:
    _check(model.case(), shard)


@pytest.mark.parametrize("text, data", [
    ("{}", 0), ("{}       ", 0), ('{"__metadata__":{}}', 0), ('{"__metadata__":null}', 0),
    ('{"a":{"dtype":"F32","shape":[0,3],"data_offsets":[0,0]},"b":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}', 0),
    ('{"a":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}', 4),
    ('{"a":{"dtype":"F4","shape":[4],"data_offsets":[0,2]},"b":{"dtype":"F6_E2M3","shape":[4],"data_offsets":[2,5]}}', 5),
    ('{"a":{"dtype":"F8_E8M0","shape":[1],"data_offsets":[0,1]},"z":{"dtype":"U8","shape":[0],"data_offsets":[1,1]}}', 1),
])
def test_corner_cases_accepted_like_safe_open(text: str, data: int, shard: Path) -> None:
    _check(Case(text.encode(), data), shard)
    assert not isinstance(_ours(shard), str)


def test_validation_reads_the_header_only(shard: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Header work only: 8 + n bytes are read, however large the tensors."""
    import hf_specdef.storage.safetensors_header as sh

    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 20], "data_offsets": [0, 4 << 20]}}).encode()
    with open(shard, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + (4 << 20))
    sizes: list[int] = []
    real_open = open

    class Spy:
        def __init__(self, f: Any) -> None:
            self.f = f

        def __enter__(self) -> Spy:
            return self

        def __exit__(self, *exc: Any) -> None:
            self.f.close()

        def fileno(self) -> int:
            return self.f.fileno()

        def read(self, n: int = -1) -> bytes:
            b = self.f.read(n)
            sizes.append(len(b))
            return b

    monkeypatch.setattr(sh, "open", lambda *a, **k: Spy(real_open(*a, **k)), raising=False)
    infos, _ = read_header(shard)
    assert infos["w"].nbytes == 4 << 20 and sum(sizes) == 8 + len(header)


# --------------------------------------------------------------------------------------------
# Corruptions: we refuse exactly when safe_open refuses (or where we are strict on purpose)
# --------------------------------------------------------------------------------------------

def _pick(d: Any, m: Model) -> str:
    return d.draw(st.sampled_from(sorted(m.entries)))


def _with_tensor(d: Any, m: Model) -> Model:
    if not m.entries:
        m.entries["t"] = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
        m.data_size = _layout(m.entries, ["t"])
    return m


def _raw(text: str, values: dict[str, str]) -> str:
    """Replace each placeholder string ``"@k"`` in JSON text by the raw JSON text ``values[k]``."""
    for k, v in values.items():
        text = text.replace(json.dumps(f"@{k}"), v)
    return text


def shift_offset(d: Any, m: Model) -> Case:
    m = _with_tensor(d, m)
    offs = m.entries[_pick(d, m)]["data_offsets"]
    for i in d.draw(st.sampled_from([[0], [1], [0, 1]])):
        offs[i] += d.draw(st.integers(-3, 3).filter(bool))
    return m.case()


def swap_offsets(d: Any, m: Model) -> Case:
    m = _with_tensor(d, m)
    m.entries.setdefault("u", {"dtype": d.draw(st.sampled_from(["U8", "F16", "F32"])), "shape": [2], "data_offsets": [0, 0]})
    m.data_size = _layout(m.entries, m.sorted_names())
    a, b = d.draw(st.lists(st.sampled_from(sorted(m.entries)), min_size=2, max_size=2, unique=True))
    m.entries[a]["data_offsets"], m.entries[b]["data_offsets"] = m.entries[b]["data_offsets"], m.entries[a]["data_offsets"]
    return m.case()


def overlap(d: Any, m: Model) -> Case:
    """A second entry over the bytes of an existing one (same dtype and shape: only the overlap is wrong)."""
    m = _with_tensor(d, m)
    src = m.entries[_pick(d, m)]
    m.entries[d.draw(NAMES.filter(lambda s: s not in m.entries))] = {**src, "shape": list(src["shape"])}
    return m.case()


def overlap_shifted(d: Any, m: Model) -> Case:
    """A tensor moved back into its predecessor's bytes."""
    m = _with_tensor(d, m)
    m.entries["pre"] = {"dtype": "U8", "shape": [4], "data_offsets": [0, 0]}
    m.data_size = _layout(m.entries, ["pre"] + [n for n in m.sorted_names() if n != "pre"])
    name = d.draw(st.sampled_from([n for n in m.entries if m.entries[n]["data_offsets"][0] > 0]))
    k = d.draw(st.integers(1, m.entries[name]["data_offsets"][0]))
    m.entries[name]["data_offsets"] = [o - k for o in m.entries[name]["data_offsets"]]
    return m.case()


def hole(d: Any, m: Model) -> Case:
    m = _with_tensor(d, m)
    order = m.sorted_names()
    at, k = d.draw(st.integers(0, len(order) - 1)), d.draw(st.integers(1, 16))
    for name in order[at:]:
        m.entries[name]["data_offsets"] = [o + k for o in m.entries[name]["data_offsets"]]
    m.data_size += k
    return m.case()


def trailing_bytes(d: Any, m: Model) -> Case:
    m.data_size += d.draw(st.integers(1, 64))
    return m.case()


def truncated_file(d: Any, m: Model) -> Case:
    case = m.case()
    return Case(case.header, case.data_size, cut=d.draw(st.integers(1, 8 + len(case.header) + case.data_size)), seed=m.seed)


def header_length(d: Any, m: Model) -> Case:
    case = m.case()
    n, total = len(case.header), len(case.header) + case.data_size
    case.n = d.draw(st.sampled_from([0, 1, n - 1, n + 1, n + 8, total, total + 1, MAX_HEADER_BYTES, MAX_HEADER_BYTES + 1,
                                     2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1))
    return case


def duplicate_key(d: Any, m: Model) -> Case:
    """A key written twice, in raw JSON text (json.loads and serde keep the last)."""
    m = _with_tensor(d, m)
    where = d.draw(st.sampled_from(["tensor-same", "tensor-other", "field", "metadata", "metadata-key", "ignored"]))
    name = _pick(d, m)
    entry = m.entries[name]
    obj = m.obj()
    if where == "field":
        f = d.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        pairs = ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in [*entry.items(), (f, entry[f])])
        obj[name] = "@e"
        return m.case(_raw(m.text(obj), {"e": "{" + pairs + "}"}), strict=True)
    if where in ("metadata", "metadata-key"):
        if m.metadata is _ABSENT:
            m.metadata = {}
            obj = m.obj()
        md = obj.get("__metadata__") or {}
        inner = ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in [*md.items(), ("k", "1"), ("k", "2")])
        text = m.text(obj)
        text = (text[:-1] + ',"__metadata__":{}}' if where == "metadata" else
                _raw(m.text({**obj, "__metadata__": "@m"}), {"m": "{" + inner + "}"}))
        return m.case(text, strict=True)
    if where == "ignored":
        obj[name] = {**entry, "extra": "@x"}
        return m.case(_raw(m.text(obj), {"x": '{"q":1,"q":2}'}), strict=True)
    other = entry if where == "tensor-same" else {**entry, "data_offsets": [o + 1 for o in entry["data_offsets"]]}
    text = m.text(obj)
    return m.case(text[:-1] + "," + json.dumps(name, ensure_ascii=m.ensure_ascii) + ":" + json.dumps(other) + "}",
                  strict=True)


BAD_VALUES = (st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from([2**64, 2**64 - 1, 10**30, -2**63])
              | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=4) | st.sampled_from(DTYPES)
              | st.lists(st.integers(-1, 4) | st.text(max_size=2) | st.booleans(), max_size=4)
              | st.dictionaries(st.text(max_size=3), st.integers(0, 3) | st.text(max_size=2), max_size=2))


def wrong_type(d: Any, m: Model) -> Case:
    """dtype / shape / data_offsets / one of their elements / __metadata__ / a metadata value replaced by any JSON."""
    m = _with_tensor(d, m)
    e = m.entries[_pick(d, m)]
    where = d.draw(st.sampled_from(["dtype", "shape", "data_offsets", "shape[]", "data_offsets[]", "__metadata__",
                                    "metadata value"]))
    value = d.draw(BAD_VALUES)
    if where in ("shape[]", "data_offsets[]"):
        seq = e[where[:-2]]
        if not seq:
            seq.append(1)
        seq[d.draw(st.integers(0, len(seq) - 1))] = value
    elif where == "__metadata__":
        m.metadata = value
    elif where == "metadata value":
        m.metadata = {"k": value}
    else:
        e[where] = value
    return m.case()


def strings_for_ints(d: Any, m: Model) -> Case:
    m = _with_tensor(d, m)
    e = m.entries[_pick(d, m)]
    key = d.draw(st.sampled_from(["shape", "data_offsets"]))
    if not e[key]:
        e[key] = ["0"]
    else:
        i = d.draw(st.integers(0, len(e[key]) - 1))
        e[key][i] = str(e[key][i])
    return m.case()


def float_ints(d: Any, m: Model) -> Case:
    """An offset or dimension written as a float, -0, an exponent, or beyond 64 bits (serde reads these as floats)."""
    m = _with_tensor(d, m)
    e = m.entries[_pick(d, m)]
    key = d.draw(st.sampled_from(["shape", "data_offsets"]))
    if not e[key]:
        e[key] = [0]
    i = d.draw(st.integers(0, len(e[key]) - 1))
    v = e[key][i]
    e[key][i] = "@v"
    raw = d.draw(st.sampled_from([f"{v}.0", f"{v}e0", f"{v}E0", f"{v}0e-1", "-0", "-0.0", str(2**64 + v), str(10**25)]))
    return m.case(_raw(m.text(), {"v": raw}))


def deep_nesting(d: Any, m: Model) -> Case:
    """Arrays/objects nested around serde_json's limit (128 deep) in an ignored field, or far deeper anywhere."""
    m = _with_tensor(d, m)
    depth = d.draw(st.integers(120, 132) | st.sampled_from([1000, 5000, 100_000]))
    kind = d.draw(st.sampled_from(["[]", "{}"]))
    nest = "[" * depth + "]" * depth if kind == "[]" else '{"a":' * depth + "1" + "}" * depth
    where = d.draw(st.sampled_from(["ignored field", "entry", "metadata"]))
    obj = m.obj()
    if where == "ignored field":
        obj[_pick(d, m)]["extra"] = "@n"
    elif where == "entry":
        obj[_pick(d, m)] = "@n"
    else:
        obj["__metadata__"] = "@n"
    return m.case(_raw(m.text(obj), {"n": nest}))


def missing_field(d: Any, m: Model) -> Case:
    m = _with_tensor(d, m)
    del m.entries[_pick(d, m)][d.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
    return m.case()


def non_object_entry(d: Any, m: Model) -> Case:
    m = _with_tensor(d, m)
    m.entries[_pick(d, m)] = d.draw(BAD_VALUES.filter(lambda v: not isinstance(v, dict)))
    return m.case()


def lenient_forms(d: Any, m: Model) -> Case:
    """Forms no writer produces that serde accepts: an entry as [dtype, shape, data_offsets], a dtype as {"F32": null}."""
    m = _with_tensor(d, m)
    name = _pick(d, m)
    e = m.entries[name]
    if d.draw(st.booleans()):
        m.entries[name] = [e["dtype"], e["shape"], e["data_offsets"]]
    else:
        e["dtype"] = {e["dtype"]: None}
    return m.case(strict=True)


def bad_dtype(d: Any, m: Model) -> Case:
    m = _with_tensor(d, m)
    e = m.entries[_pick(d, m)]
    e["dtype"] = d.draw(st.sampled_from(["f32", "F8", "FP32", "float32", "", "Q4_0", "F32 ", "F8_E4M3FN", "I4", "C128"])
                        | st.text(max_size=6).filter(lambda s: s not in DTYPE_BITS))
    return m.case()


def size_mismatch(d: Any, m: Model) -> Case:
    """A shape or dtype that does not match the tensor's byte range (incl. sub-byte dtypes off a byte boundary)."""
    m = _with_tensor(d, m)
    e = m.entries[_pick(d, m)]
    if d.draw(st.booleans()):
        e["shape"] = d.draw(st.lists(st.integers(0, 6), max_size=3))
    else:
        e["dtype"] = d.draw(st.sampled_from(DTYPES))
    if d.draw(st.booleans()):  # re-tiled: only the size (or whole bytes) can be wrong
        m.data_size = _layout(m.entries, m.sorted_names())
    return m.case()


def overflow(d: Any, m: Model) -> Case:
    """Dimensions whose product (or its bit count) overflows 64 bits, with a zero dimension after them or not."""
    m = _with_tensor(d, m)
    e = m.entries[_pick(d, m)]
    big = d.draw(st.lists(st.sampled_from([2**32, 2**62, 2**63, 2**64 - 1, 3]), min_size=1, max_size=3))
    e["shape"] = big + d.draw(st.sampled_from([[], [0]]))
    if d.draw(st.booleans()):
        e["shape"] = [0] + e["shape"]
    return m.case()


def metadata_wrong(d: Any, m: Model) -> Case:
    m.metadata = d.draw(st.sampled_from(["x", 1, [], [["k", "v"]], True])
                        | st.dictionaries(st.text(max_size=3), BAD_VALUES, min_size=1, max_size=3))
    return m.case()


def json_numbers(d: Any, m: Model) -> Case:
    """NaN / Infinity / numbers beyond float64 (refused by serde_json) or merely huge or tiny (accepted) in ignored fields."""
    m = _with_tensor(d, m)
    m.entries[_pick(d, m)]["extra"] = "@x"
    raw = d.draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1e308", "1e-400", "9" * 400,
                                  "9" * 20, "-9" * 1, str(-(2**63) - 1), "1.7976931348623157e308", "1.8e308"]))
    return m.case(_raw(m.text(), {"x": raw}))


def surrogates(d: Any, m: Model) -> Case:
    """UTF-16 escapes: a valid pair is fine, a lone surrogate is refused (in a name, metadata or an ignored field)."""
    m = _with_tensor(d, m)
    esc = d.draw(st.sampled_from(["\\ud83d\\ude00", "\\ud800", "\\udc00", "\\ud800\\u0041", "\\ud800\\ud800", "\\udbff\\udfff",
                                  "\\\\ud800"]))
    where = d.draw(st.sampled_from(["name", "metadata", "ignored"]))
    obj = m.obj()
    if where == "name":
        target = _pick(d, m)
        obj = {("@s" if k == target else k): v for k, v in obj.items()}
    elif where == "metadata":
        obj["__metadata__"] = {"k": "@s"}
    else:
        obj[_pick(d, m)]["extra"] = "@s"
    return m.case(_raw(m.text(obj), {"s": f'"{esc}"'}))


def not_utf8(d: Any, m: Model) -> Case:
    m = _with_tensor(d, m)
    bad = d.draw(st.sampled_from([b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xe2\x82", b"\x80", b"\xf4\x90\x80\x80"]))
    case = m.case()
    i = case.header.index(b'"') + 1  # inside the first string
    case.header = case.header[:i] + bad + case.header[i:]
    return case


def whitespace(d: Any, m: Model) -> Case:
    """JSON whitespace around the object is fine (writers pad with spaces); NUL, form feed, NBSP, a BOM are not."""
    m.lead = d.draw(st.sampled_from(["", " ", "\t\n", "\ufeff", "\x0c", "\x00"]))
    m.pad = d.draw(st.sampled_from(["", "align", "   ", "\r\n", "\x00", "\x00" * 7, "\x0c", "\u00a0", "x", "{}"]))
    return m.case()


def not_an_object(d: Any, m: Model) -> Case:
    return m.case(d.draw(st.sampled_from(["[]", '"x"', "1", "null", "true", "[{}]", '{"a":1}', ""])))


def byte_flip(d: Any, m: Model) -> Case:
    """Any one byte of the length prefix or the header changed (a generic fuzz of everything above)."""
    case = m.case()
    blob = bytearray(struct.pack("<Q", len(case.header)) + case.header)
    i = d.draw(st.integers(0, len(blob) - 1))
    blob[i] = d.draw(st.integers(0, 255).filter(lambda b: b != blob[i]))
    return Case(bytes(blob[8:]), case.data_size, n=struct.unpack("<Q", blob[:8])[0], seed=case.seed)


CORRUPTIONS = {f.__name__: f for f in (
    shift_offset, swap_offsets, overlap, overlap_shifted, hole, trailing_bytes, truncated_file, header_length,
    duplicate_key, wrong_type, strings_for_ints, float_ints, deep_nesting, missing_field, non_object_entry,
    lenient_forms, bad_dtype, size_mismatch, overflow, metadata_wrong, json_numbers, surrogates, not_utf8, whitespace,
    not_an_object, byte_flip)}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
@SETTINGS
@given(model=models(), data=st.data())
def test_corruptions_refused_exactly_when_safe_open_refuses(corruption: str, model: Model, data: Any, shard: Path) -> None:
    _check(CORRUPTIONS[corruption](data, model), shard)


@pytest.mark.parametrize("text, data, words", [
    ('{"a":{"dtype":"F32","shape":[1],"data_offsets":["0","4"]}}', 4, "data_offsets ['0', '4']"),
    ('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', 4,
     "key 'a' appears twice"),
    ('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[2,6]}}', 6,
     "overlaps tensor 'a'"),
    ('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}', 12,
     "hole of 4 bytes after tensor 'a'"),
    ('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', 5, "1 trailing bytes"),
    ('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":' + "[" * 200 + "]" * 200 + "}}", 4, "nests over 127"),
    ('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":' + "[" * 50_000 + "]" * 50_000 + "}}", 4, "nested too deeply"),
    ('{"a":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}', 4, "shape [True]"),
    ('{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}', 4, "shape [-1]"),
    ('{"a":{"dtype":"f32","shape":[1],"data_offsets":[0,4]}}', 4, "dtype 'f32'"),
    ('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4,4]}}', 4, "data_offsets [0, 4, 4]"),
    ('{"__metadata__":{"k":1}}', 0, "'__metadata__' is {'k': 1}"),
    ('{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}', 2, "does not fill whole bytes"),
    # Rust's checked product overflows before it reaches the zero dimension (found by hypothesis)
    ('{"a":{"dtype":"F32","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}}', 0, "overflows 64 bits"),
    ('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,8]}}', 4, "truncated"),
])
def test_refusals_are_one_clear_line(text: str, data: int, words: str, shard: Path) -> None:
    Case(text.encode(), data).write(shard)
    msg = _ours(shard)
    assert isinstance(msg, str) and words in msg and "re-" in msg, msg


@pytest.mark.parametrize("blob, words", [
    (b"", "truncated"), (b"\x05\x00", "truncated"), (struct.pack("<Q", 0), "header length is 0"),
    (struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}", "over the 100 MB limit"),
    (struct.pack("<Q", 100) + b"{}", "more than the 2 bytes after it"),
    (struct.pack("<Q", 4) + b'{"\xff"', "not UTF-8"),
])
def test_bad_length_prefix_or_encoding(blob: bytes, words: str, shard: Path) -> None:
    shard.write_bytes(blob)
    assert _reference(shard) is None
    msg = _ours(shard)
    assert isinstance(msg, str) and words in msg, msg


# --------------------------------------------------------------------------------------------
# Indexes: checked both ways; shard names stay inside the folder
# --------------------------------------------------------------------------------------------

def _sharded(root: Path, layout: dict[str, list[str]]) -> dict[str, str]:
    """Shards holding the named tensors (written by safetensors itself); returns the true weight_map."""
    root.mkdir(parents=True, exist_ok=True)
    wm = {}
    for i, (fname, names) in enumerate(layout.items()):
        save_file({n: torch.full((2, 3), float(i)) for n in names}, str(root / fname))
        wm.update(dict.fromkeys(names, fname))
    return wm


def _index(root: Path, weight_map: Any, **extra: Any) -> Path:
    path = root / "model.safetensors.index.json"
    path.write_text(json.dumps({"metadata": {"total_size": 0}, **extra, "weight_map": weight_map}))
    return path


LAYOUT = {"model-00001-of-00002.safetensors": ["a", "b"], "model-00002-of-00002.safetensors": ["c", "d"]}


def _drop(wm: dict) -> dict:
    return {k: v for k, v in wm.items() if k != "b"}


@pytest.mark.parametrize("edit, words", [
    (_drop, "does not list tensor 'b', which shard model-00001-of-00002.safetensors holds"),
    (lambda wm: {k: v for k, v in wm.items() if k in "ab"}, "does not name shard model-00002-of-00002.safetensors"),
    (lambda wm: {**wm, "z": "model-00009-of-00009.safetensors"}, "model-00009-of-00009.safetensors named by"),
    (lambda wm: {**wm, "z": "model-00002-of-00002.safetensors"}, "puts tensor 'z' in model-00002-of-00002.safetensors"),
    (lambda wm: {**wm, "c": "model-00001-of-00002.safetensors"}, "puts tensor 'c' in model-00001-of-00002.safetensors"),
    (lambda wm: {**wm, "a": "../outside.safetensors"}, "'../outside.safetensors', not a plain .safetensors file name"),
    (lambda wm: {**wm, "a": "sub/x.safetensors"}, "'sub/x.safetensors', not a plain"),
    (lambda wm: {**wm, "a": "..\\x.safetensors"}, "not a plain"),
    (lambda wm: {**wm, "a": "/etc/x.safetensors"}, "'/etc/x.safetensors', not a plain"),
    (lambda wm: {**wm, "a": ".."}, "'..', not a plain"),
    (lambda wm: {**wm, "a": "config.json"}, "'config.json', not a plain .safetensors"),
    (lambda wm: {**wm, "a": 3}, "puts tensor 'a' in 3"),
    (lambda wm: {**wm, "a": None}, "puts tensor 'a' in None"),
    (lambda wm: list(wm.items()), "'weight_map' [["),
    (lambda wm: "model-00001-of-00002.safetensors", "'weight_map' 'model-"),
    (lambda wm: None, "'weight_map' None"),
    (lambda wm: {}, "'weight_map' {}"),
])
def test_index_inconsistent_with_shards(edit: Any, words: str, tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    wm = _sharded(root, LAYOUT)
    save_file({"a": torch.zeros(1)}, str(tmp_path / "outside.safetensors"))  # what a hostile index points at
    index = _index(root, edit(wm))
    with pytest.raises(CheckpointError) as info:
        Checkpoint(root)
    msg = str(info.value)
    assert words in msg and str(root) in msg and "\n" not in msg, msg
    assert str(index) in msg or "missing" in msg


@pytest.mark.parametrize("text, words", [
    ("[1]", "not a JSON object"), ('{"weight_map":{"a":"x.safetensors","a":"y.safetensors"}}', "key 'a' appears twice"),
    ("{", "not valid JSON"), ('{"weight_map":{"a":"m.safetensors"},"metadata":[]}', "'metadata' is []"),
    ("[" * 100_000, "nested too deeply"),
])
def test_index_not_a_valid_json_object(text: str, words: str, tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    _sharded(root, {"m.safetensors": ["a"]})
    (root / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError, match="corrupted index") as info:
        Checkpoint(root)
    assert words in str(info.value), info.value


def test_other_safetensors_files_beside_an_index_are_left_alone(tmp_path: Path) -> None:
    """Only a forgotten shard of the index's own set (same stem, same -of-N) is refused, not other files."""
    root = tmp_path / "ckpt"
    wm = _sharded(root, LAYOUT)
    _index(root, wm)
    for other in ("consolidated.safetensors", "model-00001-of-00003.safetensors", "model.fp16-00001-of-00002.safetensors"):
        save_file({"x": torch.zeros(1)}, str(root / other))
    with open_checkpoint(root) as ckpt:
        assert {n: i.file.name for n, i in ckpt.infos.items()} == wm


def test_tensor_stored_in_two_shards(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    wm = _sharded(root, {"m1.safetensors": ["a", "b"], "m2.safetensors": ["b", "c"]})
    _index(root, {**wm, "b": "m2.safetensors"})
    with pytest.raises(CheckpointError, match="tensor 'b' is stored twice: in .*m1.safetensors and .*m2.safetensors"):
        Checkpoint(root)


@SETTINGS
@given(layout=st.lists(st.lists(st.sampled_from("abcdefgh"), min_size=1, max_size=4, unique=True), min_size=1, max_size=3),
       data=st.data())
def test_index_accepted_iff_it_matches_the_shards(layout: list[list[str]], data: Any,
                                                  tmp_path_factory: pytest.TempPathFactory) -> None:
    """Any weight_map other than the exact truth (a key dropped, added, or moved to another shard, a whole shard
    forgotten) is refused."""
    root = tmp_path_factory.mktemp("index")
    seen: set[str] = set()
    groups = [g for g in ([n for n in names if not (n in seen or seen.add(n))] for names in layout) if g]
    truth = _sharded(root, {f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors": g for i, g in enumerate(groups)})
    files = sorted(set(truth.values()))
    wm = dict(truth)
    for _ in range(data.draw(st.integers(0, 3))):
        key = data.draw(st.sampled_from("abcdefghz"))
        if data.draw(st.booleans()):
            wm.pop(key, None)
        else:
            wm[key] = data.draw(st.sampled_from(files))
    _index(root, wm)
    event("index matches" if wm == truth else "index differs")
    if wm == truth:
        with open_checkpoint(root) as ckpt:
            assert {n: i.file.name for n, i in ckpt.infos.items()} == truth
    else:
        with pytest.raises(CheckpointError, match="model.safetensors.index.json|named by"):
            Checkpoint(root)
    shutil.rmtree(root)


# --------------------------------------------------------------------------------------------
# End to end: protect_checkpoint and the CLI refuse before any work, and leave nothing behind
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("llama") / "src"
    tiny_llama(seed=0, layers=2).save_pretrained(str(src), max_shard_size="60KB")
    assert len(list(src.glob("model-*.safetensors"))) >= 2
    return src


def _rewrite(shard: Path, edit: Any) -> None:
    """Rewrite the header of ``shard`` (as a dict, or as text where ``edit`` returns a str); the data stays."""
    blob = shard.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    header, data = json.loads(blob[8:8 + n]), blob[8 + n:]
    new = edit(header, data)
    if isinstance(new, tuple):
        new, data = new
    raw = (new if isinstance(new, str) else json.dumps(new)).encode()
    raw += b" " * (-len(raw) % 8)
    shard.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _tensors_by_offset(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


def _overlap(header: dict, data: bytes) -> dict:
    first, second = _tensors_by_offset(header)[:2]
    b0 = header[first]["data_offsets"][0]
    size = header[second]["data_offsets"][1] - header[second]["data_offsets"][0]
    header[second]["data_offsets"] = [b0, b0 + size]  # over the first one's bytes
    return header


def _hole(header: dict, data: bytes) -> tuple[dict, bytes]:
    names = _tensors_by_offset(header)
    at = header[names[0]]["data_offsets"][1]
    for k in names[1:]:
        header[k]["data_offsets"] = [o + 8 for o in header[k]["data_offsets"]]
    return header, data[:at] + bytes(8) + data[at:]


def _duplicate(header: dict, data: bytes) -> str:
    """The adversary's duplicate key: one entry written twice, identical (safetensors itself accepts this)."""
    name = _tensors_by_offset(header)[0]
    text = json.dumps(header)
    return text[:-1] + f", {json.dumps(name)}: {json.dumps(header[name])}}}"


CORRUPT_SHARD = {"overlap": _overlap, "hole": _hole, "duplicate_key": _duplicate}


def _damage(src: Path, case: str) -> tuple[str, str]:
    """Damage a copy of the checkpoint; returns (the file to name, a word of the message)."""
    shard = sorted(src.glob("model-*.safetensors"))[1]
    if case == "missing_from_index":
        index = src / "model.safetensors.index.json"
        data = json.loads(index.read_text())
        with safe_open(str(shard), framework="pt") as f:
            dropped = sorted(f.keys())[0]
        del data["weight_map"][dropped]
        index.write_text(json.dumps(data))
        return index.name, f"does not list tensor {dropped!r}"
    _rewrite(shard, CORRUPT_SHARD[case])
    return shard.name, {"overlap": "overlaps", "hole": "hole of 8 bytes", "duplicate_key": "appears twice"}[case]


@pytest.mark.parametrize("forward_check", [True, False], ids=["small-model", "large-model-path"])
@pytest.mark.parametrize("case", [*sorted(CORRUPT_SHARD), "missing_from_index"])
def test_protect_refuses_a_corrupted_checkpoint(case: str, forward_check: bool, llama_src: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import hf_specdef.protection.streaming as streaming
    from hf_specdef.cli import main

    if not forward_check:  # as for any checkpoint over 64 MiB: no final forward check to catch it
        monkeypatch.setattr(streaming, "FORWARD_CHECK_MAX_BYTES", 0)
    src = tmp_path / "src"
    shutil.copytree(llama_src, src)
    named, words = _damage(src, case)
    dst = tmp_path / "out" / "dst"
    dst.parent.mkdir()
    with pytest.raises(CheckpointError) as info:
        protect_checkpoint(src, dst, verify=True, progress=False)
    msg = str(info.value)
    assert named in msg and words in msg and "\n" not in msg, msg
    assert sorted(dst.parent.iterdir()) == []  # no dst, no .dst.specdef-tmp-* beside it

    capsys.readouterr()
    assert main(["protect", str(src), str(dst)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and named in err[0] and words in err[0], err
    assert sorted(dst.parent.iterdir()) == []


def test_the_undamaged_copy_protects_on_the_large_model_path(llama_src: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: what the corruptions above change is what is refused."""
    import hf_specdef.protection.streaming as streaming

    monkeypatch.setattr(streaming, "FORWARD_CHECK_MAX_BYTES", 0)
    report = protect_checkpoint(llama_src, tmp_path / "dst", verify=True, progress=False)
    assert report.deviation is None and report.tensor_error is not None
    with open_checkpoint(tmp_path / "dst") as ckpt:
        assert set(ckpt.infos) == set(Checkpoint(llama_src).infos)
