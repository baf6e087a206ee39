"""Bad inputs and hostile folders against the command line, as a careful adversarial tester tries them.

Every case must be *handled*: a non-zero exit, one line on stderr that names what is wrong (not a leaked
Python/torch message: the CLI marks errors that are not hf-specdef's own as a bug), no destination and no
temporary folder left, and the source unchanged.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file, save_file

from hf_specdef.cli import main


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pristine")
    tiny_llama(seed=0, layers=2).save_pretrained(str(root / "single"))
    tiny_llama(seed=0, layers=2).save_pretrained(str(root / "sharded"), max_shard_size="60KB")
    return root


def _edit_config(folder: Path, **changes) -> None:
    conf = json.loads((folder / "config.json").read_text())
    conf.update(changes)
    (folder / "config.json").write_text(json.dumps(conf))


def _edit_tensor(folder: Path, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    tensors[name] = fn(tensors[name]).contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})


def _rewrite_header(folder: Path, fn: Callable[[dict], dict | str], trailing: bytes = b"") -> None:
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    new = fn(header)
    text = (new if isinstance(new, str) else json.dumps(new)).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data + trailing)


def _first_two(header: dict) -> tuple[str, str]:
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    return names[0], names[1]


def _overlap(h: dict) -> dict:
    a, b = _first_two(h)
    h[b]["data_offsets"] = [h[a]["data_offsets"][0], h[a]["data_offsets"][0] + h[b]["data_offsets"][1]
                            - h[b]["data_offsets"][0]]
    return h


def _offsets_as_strings(h: dict) -> dict:
    a, _ = _first_two(h)
    h[a]["data_offsets"] = [str(x) for x in h[a]["data_offsets"]]
    return h


def _duplicate_key(h: dict) -> str:
    a, _ = _first_two(h)
    text = json.dumps(h)
    return text[:-1] + f', "{a}": ' + json.dumps(h[a]) + "}"


def _deep(h: dict) -> str:
    return '{"__metadata__": ' + "[" * 100000 + "]" * 100000 + "}"


def _drop_from_index(folder: Path) -> None:
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"].pop(sorted(data["weight_map"])[0])
    index.write_text(json.dumps(data))


def _index_escapes(folder: Path) -> None:
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    name = sorted(data["weight_map"])[0]
    data["weight_map"][name] = "../single/model.safetensors"
    index.write_text(json.dumps(data))


V = "model.layers.0.self_attn.v_proj.weight"
# id -> (source folder, how to break it, extra CLI arguments, what the message must name)
PROTECT_CASES: dict[str, tuple[str, Callable[[Path], None] | None, list[str], str]] = {
    "alpha-1": ("single", None, ["--alpha", "1"], "alpha"),
    "alpha-nan": ("single", None, ["--alpha", "nan"], "alpha"),
    "alpha-negative": ("single", None, ["--alpha", "-4"], "alpha"),
    "alpha-inf": ("single", None, ["--alpha", "inf"], "alpha"),
    "top-k-0": ("single", None, ["--top-k", "0"], "top_k"),
    "tolerance-negative": ("single", None, ["--tolerance", "-1"], "tolerance"),
    "layers-out-of-range": ("single", None, ["--layers", "7"], "layer"),
    "config-not-json": ("single", lambda f: (f / "config.json").write_text("{not json"), [], "config.json"),
    "config-a-list": ("single", lambda f: (f / "config.json").write_text("[1, 2]"), [], "config.json"),
    "heads-zero": ("single", lambda f: _edit_config(f, num_attention_heads=0), [], "num_attention_heads"),
    "heads-negative": ("single", lambda f: _edit_config(f, num_attention_heads=-4), [], "num_attention_heads"),
    "heads-string": ("single", lambda f: _edit_config(f, num_attention_heads="four"), [], "num_attention_heads"),
    "kv-heads-not-dividing": ("single", lambda f: _edit_config(f, num_key_value_heads=3), [], "num_key_value_heads"),
    "hidden-not-divisible": ("single", lambda f: _edit_config(f, num_attention_heads=5, num_key_value_heads=5), [],
                             "num_attention_heads"),
    "weight-transposed": ("single", lambda f: _edit_tensor(f, V, lambda t: t.t()), [], V),
    "weight-nan": ("single", lambda f: _edit_tensor(f, V, lambda t: t.index_fill(0, torch.tensor([0]), float("nan"))),
                   [], V),
    "weight-inf": ("single", lambda f: _edit_tensor(f, V, lambda t: t.index_fill(0, torch.tensor([0]), float("inf"))),
                   [], V),
    "weight-huge": ("single", lambda f: _edit_tensor(f, "model.layers.0.self_attn.v_proj.weight",
                                                      lambda t: t.index_fill(0, torch.tensor([0]), 1e38)), [], V),
    "header-overlap": ("single", lambda f: _rewrite_header(f, _overlap), [], "model.safetensors"),
    "header-offsets-strings": ("single", lambda f: _rewrite_header(f, _offsets_as_strings), [], "model.safetensors"),
    "header-duplicate-key": ("single", lambda f: _rewrite_header(f, _duplicate_key), [], "model.safetensors"),
    "header-deeply-nested": ("single", lambda f: _rewrite_header(f, _deep), [], "model.safetensors"),
    "header-trailing-bytes": ("single", lambda f: _rewrite_header(f, lambda h: h, trailing=b"\0" * 64), [],
                              "model.safetensors"),
    "header-garbage": ("single", lambda f: (f / "model.safetensors").write_bytes(b"\xff" * 64), [], "model.safetensors"),
    "shard-truncated": ("single", lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()
                                                                                 [:-100]), [], "model.safetensors"),
    "shard-empty": ("single", lambda f: (f / "model.safetensors").write_bytes(b""), [], "model.safetensors"),
    "no-weights": ("single", lambda f: (f / "model.safetensors").unlink(), [], "safetensors"),
    "index-missing-tensor": ("sharded", _drop_from_index, [], "index"),
    "index-names-outside": ("sharded", _index_escapes, [], "index"),
    "index-missing-shard": ("sharded", lambda f: sorted(f.glob("*.safetensors"))[0].unlink(), [], "missing"),
    "index-not-json": ("sharded", lambda f: (f / "model.safetensors.index.json").write_text("{"), [], "index.json"),
    "already-protected": ("single", lambda f: _edit_config(f, specdef={"format": "hf-specdef/1", "factors": [1024.0]}),
                          [], "already protected"),
}


@pytest.mark.parametrize("forward_check", [True, False], ids=["small", "large"])
@pytest.mark.parametrize("case", sorted(PROTECT_CASES))
def test_protect_rejects_bad_input_cleanly(case, forward_check, pristine, tmp_path, capsys, monkeypatch):
    """``large``: as for any checkpoint over 64 MiB, no forward check with stock transformers backs the others up."""
    if not forward_check:
        monkeypatch.setattr("hf_specdef.protection.streaming.FORWARD_CHECK_MAX_BYTES", 0)
    kind, breaker, extra, named = PROTECT_CASES[case]
    src = tmp_path / "src"
    shutil.copytree(pristine / kind, src)
    if breaker is not None:
        breaker(src)
    before = _hashes(src)
    dst = tmp_path / "dst"
    capsys.readouterr()
    rc = main(["protect", str(src), str(dst), "--no-progress", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    errors = [line for line in err if "error:" in line]
    assert len(errors) == 1, err  # one line
    last = errors[0]
    assert "unexpected" not in last and "Traceback" not in "\n".join(err), last
    assert named.lower() in last.lower(), last
    assert not dst.exists()
    assert not [p.name for p in tmp_path.iterdir() if ".specdef-" in p.name]
    assert _hashes(src) == before


OTHER_CASES: dict[str, tuple[list[str], str]] = {
    "inspect-threshold-inf": (["inspect", "{single}", "--threshold", "inf"], "threshold"),
    "inspect-threshold-nan": (["inspect", "{single}", "--threshold", "nan"], "threshold"),
    "inspect-threshold-below-1": (["inspect", "{single}", "--threshold", "0.5"], "threshold"),
    "inspect-missing": (["inspect", "{tmp}/nowhere"], "nowhere"),
    "verify-missing": (["verify", "{single}", "{tmp}/nowhere"], "nowhere"),
    "publish-bad-repo-id": (["publish", "--model", "{single}", "--repo-id", "org/x\"); import os; print(\"",
                             "--dry-run", "--output-dir", "{tmp}/out"], "repo"),
    "publish-bad-base-model": (["publish", "--model", "{single}", "--base-model", "org/x\n**VERIFIED SAFE**",
                                "--dry-run", "--output-dir", "{tmp}/out"], "base"),
}


@pytest.mark.parametrize("case", sorted(OTHER_CASES))
def test_other_commands_reject_bad_input_cleanly(case, pristine, tmp_path, capsys):
    argv, named = OTHER_CASES[case]
    argv = [a.format(single=pristine / "single", tmp=tmp_path) for a in argv]
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error:" in line]
    assert rc != 0 and len(errors) == 1, err
    last = errors[0]
    assert "unexpected" not in last and "Traceback" not in "\n".join(err), last
    assert named.lower() in last.lower(), last
    assert not (tmp_path / "out").exists()
    assert not [p.name for p in tmp_path.iterdir() if ".specdef-" in p.name]


def test_the_cli_marks_errors_that_are_not_ours(monkeypatch, capsys):
    """The property the cases above rely on: a leaked message (a bug) is told apart from a handled error."""
    import hf_specdef.cli.inspect as inspect_cmd

    monkeypatch.setattr(inspect_cmd, "run", lambda args: 1 // 0)
    assert main(["inspect", "x"]) == 1
    assert "unexpected ZeroDivisionError" in capsys.readouterr().err


FILE_CASES = sorted(c for c in PROTECT_CASES if c.startswith(("header-", "shard-", "index-", "config-", "heads-", "kv-",
                                                              "hidden-", "weight-transposed", "no-weights")))


@pytest.mark.parametrize("command", ["inspect", "verify"])
@pytest.mark.parametrize("case", FILE_CASES)
def test_inspect_and_verify_reject_broken_folders_cleanly(case, command, pristine, tmp_path, capsys):
    """The same broken folders through the read-only commands: one clear line, nothing leaked, nothing changed."""
    kind, breaker, _, named = PROTECT_CASES[case]
    src = tmp_path / "src"
    shutil.copytree(pristine / kind, src)
    breaker(src)
    before = _hashes(src)
    argv = ["inspect", str(src)] if command == "inspect" else ["verify", str(pristine / kind), str(src)]
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error:" in line]
    assert rc != 0 and len(errors) == 1, err
    assert "unexpected" not in errors[0] and "Traceback" not in "\n".join(err), errors[0]
    assert named.lower() in errors[0].lower(), errors[0]
    assert _hashes(src) == before
