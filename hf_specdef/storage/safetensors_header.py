"""Safetensors headers and shard indexes, parsed and validated as the safetensors library does (no torch needed).

:func:`read_safetensors_header` applies the rules of safetensors' own reader (``read_metadata`` and
``Metadata::validate``) to the header of one file, reading the header only (never the tensor data):

- the 8-byte little-endian header length is > 0, at most :data:`MAX_HEADER_BYTES` (100 MB) and within the file;
- the header is UTF-8, one JSON object (surrounding JSON whitespace allowed: writers pad it with spaces to an
  8-byte boundary), no NaN/Infinity, no number out of the float64 range, no lone UTF-16 surrogate escape,
  nested at most 127 arrays/objects deep (serde_json's limit);
- the optional ``__metadata__`` is ``null`` or an object of string -> string;
- every other entry is an object with ``dtype`` (a safetensors dtype name, :data:`DTYPE_BITS`), ``shape``
  (a list of non-negative 64-bit integers; not booleans, not floats such as ``1.0`` or ``-0``) and
  ``data_offsets`` (``[begin, end]``, 64-bit integers, ``begin <= end``); other fields are ignored;
- sorted by offsets, the tensors tile the data buffer (the file after the header) exactly: the first begins
  at 0, each begins where the previous one ends, the last ends at the end of the file (no hole, no overlap,
  no trailing bytes), and each spans ``numel * bits / 8`` bytes (whole bytes; no 64-bit overflow).

It is stricter than safetensors on purpose in two respects: a key repeated in any JSON object is refused
(safetensors keeps the last of a repeated tensor name or metadata key, which hides an entry), and so are the
forms no writer produces that serde happens to accept (an entry given as a JSON array
``[dtype, shape, data_offsets]``, a dtype given as ``{"F32": null}``). Everything else it accepts or refuses
exactly as ``safetensors.safe_open`` (0.8) does (``tests/test_checkpoint_validation.py`` checks this).

:func:`load_index` and :func:`check_index_covers` validate a ``*.safetensors.index.json`` file: its
``weight_map`` maps tensor names to plain ``.safetensors`` file names inside the folder (a hostile index
cannot make hf-specdef read outside it), and every tensor of every shard is listed for that shard.

Each refusal is one :class:`CheckpointError` line naming the file, the tensor or field, the bad value and the fix.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from hf_specdef.errors import SpecDefError

MAX_HEADER_BYTES = 100_000_000  # safetensors' MAX_HEADER_SIZE
#: Every dtype name safetensors knows -> its size in bits (some have no torch dtype; see ``TensorInfo.torch_dtype``).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32,
    "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}
_FIELDS = frozenset({"dtype", "shape", "data_offsets"})
_INT = frozenset({int})
_U64_MAX = (1 << 64) - 1
_I64_MIN = -(1 << 63)
_MAX_DEPTH = 128  # serde_json refuses 128 nested arrays/objects
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
FIX = "re-download or re-save the checkpoint with safetensors"
INDEX_FIX = "re-download the index or re-save the checkpoint with save_pretrained"


class CheckpointError(SpecDefError, ValueError):
    """A checkpoint folder or file is missing, truncated, corrupted or inconsistent with its index.

    Raised by :func:`~hf_specdef.protect_checkpoint`, :func:`~hf_specdef.inspect_model` (on a path) and
    :func:`~hf_specdef.publish` when the source folder does not exist or is a file, a ``.safetensors`` header or
    shard index cannot be read or parsed, a shard is truncated or missing, a tensor has a dtype torch cannot read or
    NaN/inf values, or the destination cannot be written. The message names the file and the fix. Also a
    ``ValueError``.

    Example:

    ```python
    from hf_specdef import CheckpointError, inspect_model

    try:
        inspect_model("no-such-folder")
    except CheckpointError as e:
        print(e)  # names the folder or file and what is wrong with it
    ```
    """

    docs_page = "docs/releases.md"


class HeaderEntry(NamedTuple):
    """One tensor of a safetensors header: ``[begin, end)`` is relative to the data buffer (after the header)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated safetensors header: its length, its tensors (in header order) and its ``__metadata__``."""

    header_len: int
    entries: tuple[HeaderEntry, ...]
    metadata: dict[str, str] | None

    @property
    def data_start(self) -> int:
        """Offset in the file of the first data byte."""
        return 8 + self.header_len


def _fail(source: Any, what: str) -> CheckpointError:
    return CheckpointError(f"{source}: corrupted safetensors header: {what}; {FIX}.")


class _Reject(Exception):
    """Raised inside the JSON hooks: the header is refused for the reason given."""


def _short(value: Any, limit: int = 60) -> str:
    """``repr`` of a bad value, cut to ``limit`` characters and kept on one line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Reject(f"key {_short(key)} appears twice in one JSON object (json keeps only the last)")
            seen.add(key)
    return out


def _float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _Reject(f"number {_short(text, 40)} is out of range")
    return value


def _int(text: str) -> int | float:
    # serde_json reads -0 and integers outside [i64 min, u64 max] as floats (so they are not valid sizes or offsets)
    if len(text) > 20 or text == "-0":
        return _float(text)
    value = int(text)
    return value if _I64_MIN <= value <= _U64_MAX else float(value)


def _constant(text: str) -> Any:
    raise _Reject(f"{text} is not JSON")


def strict_json_loads(text: str) -> Any:
    """Parse JSON text, refusing repeated keys in an object.

    Args:
        text: the JSON text.

    Returns:
        The parsed value.

    Raises:
        ValueError: invalid JSON, a repeated key, NaN/Infinity, a number out of range or nesting too deep for
            the parser; the message says which.
    """
    try:
        return json.loads(text, object_pairs_hook=_pairs, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except _Reject as e:
        raise ValueError(str(e)) from None
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _depth(value: Any, limit: int) -> int:
    """How many arrays/objects ``value`` nests (0 for a scalar), counting no further than ``limit``."""
    deepest, stack = 0, [(value, 1)]
    while stack and deepest < limit:
        v, d = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, list):
            deepest = max(deepest, d)
            stack.extend((x, d + 1) for x in v)
    return deepest


def _surrogate_in(value: Any) -> str | None:
    """The first string (key or value) in ``value`` holding a lone UTF-16 surrogate, if any."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                return v
        elif isinstance(v, dict):
            stack.extend(v)
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return None


def read_safetensors_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Read and validate the header of one safetensors file (the header only: tensor data is never read).

    Args:
        path: the ``.safetensors`` file.

    Returns:
        The validated :class:`SafetensorsHeader`.

    Raises:
        CheckpointError: the file is missing or unreadable, truncated, or its header breaks a rule of the
            safetensors format (see the module docstring); one line naming the file, the tensor or field,
            the bad value and the fix.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: file is truncated ({size} bytes, too short for a safetensors "
                                      "header); re-download it.")
            (n,) = struct.unpack("<Q", prefix)
            if n == 0 or n > MAX_HEADER_BYTES or n > size - 8:
                why = ("is 0" if n == 0 else f"{n} is over the 100 MB limit" if n > MAX_HEADER_BYTES
                       else f"{n} is more than the {size - 8} bytes after it")
                raise CheckpointError(f"{path}: corrupted or truncated safetensors header (the header length {why}); "
                                      f"{FIX}.")
            raw = f.read(n)
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{path}: shard file is missing; {FIX}.") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e}).") from None
    if len(raw) != n:  # the file shrank while it was read
        raise CheckpointError(f"{path}: file is truncated (header of {n} bytes, {len(raw)} read); re-download it.")
    return parse_safetensors_header(raw, size - 8 - n, path)


def parse_safetensors_header(raw: bytes, data_size: int, source: str | os.PathLike[str]) -> SafetensorsHeader:
    """Validate the header bytes of a safetensors file against the size of its data buffer.

    Args:
        raw: the header (the ``n`` bytes after the 8-byte length).
        data_size: the bytes after the header (file size - 8 - ``n``).
        source: the file, named in errors.

    Returns:
        The validated :class:`SafetensorsHeader`.

    Raises:
        CheckpointError: the header breaks a rule of the safetensors format (see the module docstring).
    """
    fail = functools.partial(_fail, source)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise fail(f"not UTF-8 (byte {e.start} of the header)") from None
    try:
        header = strict_json_loads(text)
    except ValueError as e:
        raise fail(str(e)) from None
    if not isinstance(header, dict):
        raise fail(f"the header is {_kind(header)}, not a JSON object")
    if _SURROGATE_ESCAPE.search(text) and (bad := _surrogate_in(header)) is not None:
        raise fail(f"string {_short(bad)} holds a lone UTF-16 surrogate escape")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise fail(f"'__metadata__' is {_short(metadata)}, not an object of string -> string")
    entries = tuple(_entry(name, value, fail) for name, value in header.items())
    _check_layout(entries, data_size, source, fail)
    return SafetensorsHeader(len(raw), entries, metadata)


def _u64s(value: Any) -> bool:
    """``value`` is a list of integers in [0, 2**64) (not booleans; the parser made larger integers floats)."""
    return type(value) is list and set(map(type, value)) <= _INT and (not value or min(value) >= 0)


def _entry(name: str, value: Any, fail: Callable[[str], CheckpointError]) -> HeaderEntry:
    if type(value) is not dict:
        shown = "" if value is None else f" {_short(value)}"
        raise fail(f"tensor {name!r} is {_kind(value)}{shown}, not an object with dtype, shape and data_offsets")
    try:
        dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    except KeyError as e:
        raise fail(f"tensor {name!r} has no {e.args[0]!r}") from None
    if type(dtype) is not str or dtype not in DTYPE_BITS:
        raise fail(f"tensor {name!r} has dtype {_short(dtype)}, not a safetensors dtype name "
                   f"({', '.join(DTYPE_BITS)})")
    if not _u64s(shape):
        raise fail(f"tensor {name!r} has shape {_short(shape)}, not a list of non-negative integers")
    if not (_u64s(offsets) and len(offsets) == 2):
        raise fail(f"tensor {name!r} has data_offsets {_short(offsets)}, not [begin, end] with non-negative integers")
    begin, end = offsets
    if begin > end:
        raise fail(f"tensor {name!r} has data_offsets {offsets}: it ends before it begins")
    if len(value) > 3:  # other fields: ignored, as safetensors does, but the parser's depth limit applies
        for field in value.keys() - _FIELDS:
            if _depth(value[field], _MAX_DEPTH) >= _MAX_DEPTH - 2:
                raise fail(f"field {field!r} of tensor {name!r} nests over {_MAX_DEPTH - 1} arrays/objects deep")
    return HeaderEntry(name, dtype, tuple(shape), begin, end)


def _check_layout(entries: tuple[HeaderEntry, ...], data_size: int, source: Any,
                  fail: Callable[[str], CheckpointError]) -> None:
    """The tensors, sorted by offsets, tile the data buffer exactly and each spans its own size."""
    if entries:
        last = max(entries, key=lambda e: e.end)
        if last.end > data_size:
            raise CheckpointError(f"{source}: file is truncated (or its header corrupted): tensor {last.name!r} "
                                  f"needs data bytes up to {last.end}, the file has {data_size}; re-download it.")
    start, prev = 0, None
    for e in sorted(entries, key=lambda e: (e.begin, e.end)):
        if e.begin > start:
            where = f"after tensor {prev.name!r} (ends at {start})" if prev else "at the start of the data"
            raise fail(f"hole of {e.begin - start} bytes {where}: tensor {e.name!r} begins at {e.begin}")
        if e.begin < start:
            raise fail(f"tensor {e.name!r} (data_offsets [{e.begin}, {e.end}]) overlaps tensor {prev.name!r} "
                       f"(ends at {start})")
        numel = math.prod(e.shape)
        if numel > _U64_MAX or (numel == 0 and len(e.shape) > 2):
            # as Rust's checked product: dimensions overflowing 64 bits before a zero one still overflow
            numel = 1
            for s in e.shape:
                numel *= s
                if numel > _U64_MAX:
                    break
        nbits = numel * DTYPE_BITS[e.dtype]
        if nbits > _U64_MAX:
            raise fail(f"tensor {e.name!r} has shape {list(e.shape)}: its size overflows 64 bits")
        if nbits % 8:
            raise fail(f"tensor {e.name!r} ({e.dtype}, shape {list(e.shape)}) does not fill whole bytes")
        if e.end - e.begin != nbits // 8:
            raise fail(f"tensor {e.name!r} ({e.dtype}, shape {list(e.shape)}) needs {nbits // 8} bytes, its "
                       f"data_offsets [{e.begin}, {e.end}] span {e.end - e.begin}")
        start, prev = e.end, e
    if start != data_size:
        raise fail(f"{data_size - start} trailing bytes after the last tensor (the tensors cover {start} of "
                   f"{data_size} data bytes)")
