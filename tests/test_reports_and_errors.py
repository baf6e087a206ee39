"""Reports and verdicts state what was done and the evidence used; model-level bad inputs give one clear error.

* a config the site registry cannot read (head counts zero, negative, not integers, not dividing, missing), a
  weight whose shape does not match its site (stored transposed), a weight too large to deform, an inspect
  threshold that is not a finite ratio > 1: ``hf-specdef protect / inspect / verify`` exit 1 with one line naming the
  file, field or tensor and the value, never the raw Python/torch text, and leave nothing behind;
* the protection report's header states the mode, the factor actually applied ("requested alpha 1000 -> factor
  1024"), the precision, and the output deviation or why it was not measured;
* every verdict of ``inspect`` follows from the numbers it prints and the rule it documents.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file, save_file

from hf_specdef import SpecDefConfig, inspect_model, protect, protect_checkpoint
from hf_specdef.analysis.inspection import BLOCK_CRITERIA, MATRIX_CRITERIA
from hf_specdef.cli import main
from hf_specdef.errors import SpecDefError

# raw Python/torch texts (as words: "eigh" is inside "weights"), and the CLI's mark of an error that is not ours
RAW = re.compile(r"\b(division|modulo|exceeds dimension|eigh|linalg|failed to converge|traceback|unexpected|nonetype|"
                 r"object cannot|index out of range|unsupported operand)\b", re.IGNORECASE)
V = "model.layers.0.self_attn.v_proj.weight"
UP = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pristine")
    tiny_llama(seed=0, layers=2).save_pretrained(str(root / "f32"))
    tiny_llama(seed=0, layers=2).to(torch.bfloat16).save_pretrained(str(root / "bf16"))
    return root


def _edit_config(folder: Path, **changes) -> None:
    conf = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is _DROP:
            conf.pop(k, None)
        else:
            conf[k] = v
    (folder / "config.json").write_text(json.dumps(conf))


_DROP = object()


def _edit_tensor(folder: Path, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    tensors[name] = fn(tensors[name]).contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})


def _huge(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = 1e38
    return t


# id -> (how to break the folder, what the one line must name)
CONFIG_CASES: dict[str, tuple[dict, tuple[str, ...]]] = {
    "heads-zero": (dict(num_attention_heads=0), ("num_attention_heads=0", "positive integer")),
    "heads-negative": (dict(num_attention_heads=-4), ("num_attention_heads=-4", "positive integer")),
    "heads-float": (dict(num_attention_heads=4.5), ("num_attention_heads=4.5", "positive integer")),
    "heads-string": (dict(num_attention_heads="four"), ("num_attention_heads='four'", "positive integer")),
    "heads-missing": (dict(num_attention_heads=_DROP), ("num_attention_heads", "missing")),
    "kv-heads-zero": (dict(num_key_value_heads=0), ("num_key_value_heads=0", "positive integer")),
    "kv-heads-not-dividing": (dict(num_key_value_heads=3), ("num_key_value_heads=3", "num_attention_heads=4", "divide")),
    "head-dim-zero": (dict(head_dim=0), ("head_dim=0", "positive integer")),
    "hidden-not-divisible": (dict(num_attention_heads=3, num_key_value_heads=3, head_dim=_DROP),
                             ("hidden_size=64", "num_attention_heads=3", "divisible")),
    "hidden-missing": (dict(hidden_size=_DROP, head_dim=_DROP), ("hidden_size", "missing")),
    "heads-not-matching-weights": (dict(num_attention_heads=3, num_key_value_heads=3),  # head_dim=16 kept: 48 rows
                                   ("num_attention_heads=3", "q_proj", "(64, 64)", "(48, 64)")),
}


def _run(argv: list[str], capsys) -> tuple[int, list[str], str]:
    capsys.readouterr()
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.err.strip().splitlines(), captured.out


def _assert_one_clear_line(rc: int, err: list[str], command: str, named: tuple[str, ...]) -> str:
    assert rc == 1, err
    assert len(err) == 1, err  # ONE line
    line = err[0]
    assert line.startswith(f"hf-specdef {command}: error: "), line
    for text in named:
        assert text in line, (text, line)
    assert not RAW.search(line), line
    return line


def _nothing_left(tmp_path: Path, dst: Path) -> None:
    assert not dst.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{dst.name}.specdef-tmp")]
    assert not [p.name for p in tmp_path.iterdir() if ".specdef-" in p.name]


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_is_one_clear_error(case, pristine, tmp_path, capsys):
    changes, named = CONFIG_CASES[case]
    src = tmp_path / "src"
    shutil.copytree(pristine / "f32", src)
    _edit_config(src, **changes)
    dst = tmp_path / "dst"
    rc, err, _ = _run(["protect", str(src), str(dst), "--no-progress"], capsys)
    line = _assert_one_clear_line(rc, err, "protect", named)
    assert "config.json" in line and ("set" in line or "fix" in line or "add" in line.lower())
    _nothing_left(tmp_path, dst)
    rc, err, _ = _run(["inspect", str(src)], capsys)
    _assert_one_clear_line(rc, err, "inspect", named)
    rc, err, _ = _run(["verify", str(pristine / "f32"), str(src)], capsys)
    _assert_one_clear_line(rc, err, "verify", named)


def test_bad_config_errors_are_specdef_errors(pristine, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(pristine / "f32", src)
    _edit_config(src, num_attention_heads=0)
    with pytest.raises(SpecDefError, match=r"config\.json: num_attention_heads=0") as info:
        protect_checkpoint(src, tmp_path / "dst", progress=False)
    assert isinstance(info.value, ValueError) and str(src / "config.json") in str(info.value)


def test_transposed_weight_names_tensor_shape_and_fix(pristine, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(pristine / "f32", src)
    _edit_tensor(src, V, lambda t: t.t())
    dst = tmp_path / "dst"
    named = (V, "(64, 32)", "(32, 64)", "transposed")
    rc, err, _ = _run(["protect", str(src), str(dst), "--no-progress"], capsys)
    line = _assert_one_clear_line(rc, err, "protect", named)
    assert "model.safetensors" in line and "re-save" in line
    _nothing_left(tmp_path, dst)
    rc, err, _ = _run(["inspect", str(src)], capsys)
    _assert_one_clear_line(rc, err, "inspect", named)
    rc, err, _ = _run(["verify", str(pristine / "f32"), str(src)], capsys)
    _assert_one_clear_line(rc, err, "verify", named)


@pytest.mark.parametrize("name", [UP, "model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                                  "model.layers.0.post_attention_layernorm.weight"])
def test_weight_of_another_shape_than_its_site_is_refused_before_any_work(name, pristine, tmp_path, capsys):
    """Every tensor a pair touches is checked against its site on the headers, before anything is read."""
    src = tmp_path / "src"
    shutil.copytree(pristine / "f32", src)
    _edit_tensor(src, name, lambda t: t.t() if t.dim() == 2 else t[:-8])
    dst = tmp_path / "dst"
    rc, err, _ = _run(["protect", str(src), str(dst), "--no-progress"], capsys)
    shape = tuple(load_file(str(src / "model.safetensors"))[name].shape)
    line = _assert_one_clear_line(rc, err, "protect", ("model.safetensors", f"tensor {name!r} has shape {shape}"))
    assert "implies (" in line and ("re-save" in line or "fix" in line), line
    _nothing_left(tmp_path, dst)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("name", [UP, "model.layers.0.self_attn.q_proj.weight", "model.layers.0.input_layernorm.weight"])
def test_weight_too_large_to_deform_names_the_tensor(name, dtype, pristine, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(pristine / dtype, src)
    _edit_tensor(src, name, _huge)
    dst = tmp_path / "dst"
    rc, err, _ = _run(["protect", str(src), str(dst), "--no-progress"], capsys)
    line = _assert_one_clear_line(rc, err, "protect", (name, "too large to deform", "non-finite intermediate"))
    assert re.search(r"values up to (1e\+38|9\.9\de\+37)", line), line  # the stored value, as the file holds it
    _nothing_left(tmp_path, dst)


def test_weight_too_large_in_memory_is_a_clear_error_and_restored():
    model = tiny_llama()
    w = dict(model.named_parameters())[UP]
    with torch.no_grad():
        w.view(-1)[0] = 1e38
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(SpecDefError, match="too large to deform") as info:
        protect(model, SpecDefConfig(alpha=1000.0), progress=False)
    assert UP in str(info.value) and not RAW.search(str(info.value))
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # every change restored


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1", "0.5", "-3"])
def test_inspect_refuses_a_threshold_that_is_not_a_finite_ratio_above_1(value, pristine, capsys):
    rc, err, out = _run(["inspect", str(pristine / "f32"), f"--threshold={value}"], capsys)
    line = _assert_one_clear_line(rc, err, "inspect", ("--threshold", "finite", "> 1"))
    assert f"--threshold {float(value):g}" in line and not out


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 1.0, 0.0])
def test_inspect_model_refuses_a_bad_threshold(value):
    with pytest.raises(SpecDefError, match=r"threshold=.*finite ratio > 1"):
        inspect_model(tiny_llama(), threshold=value)


# --------------------------------------------------------------------------------------------
# The report states the configuration used
# --------------------------------------------------------------------------------------------

def test_report_header_states_the_factor_used_and_why_no_deviation(pristine, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("hf_specdef.protection.streaming.FORWARD_CHECK_MAX_BYTES", 0)  # as for any model over 64 MiB
    dst = tmp_path / "dst"
    rc, err, out = _run(["protect", str(pristine / "bf16"), str(dst), "--alpha", "1000", "--no-progress"], capsys)
    assert rc == 0, err
    header = out[out.index("SpecDef protection:"):].splitlines()[:3]
    text = "\n".join(header)
    assert "alpha=1000" not in text and "None" not in text
    assert "mode axis" in header[0] and "requested alpha 1000 -> factor 1024" in header[0]
    assert "used axis, alpha 1024 (stored in bfloat16)" in header[1]
    assert header[2].startswith("max relative output deviation: not measured (forward check skipped: model ")
    assert "> 0 MiB" in header[2] and "every deformed tensor checked" in header[2]
    assert re.search(r"max relative error \d\.\d\de[+-]\d\d", header[2])

    report = protect_checkpoint(pristine / "bf16", tmp_path / "dst2", SpecDefConfig(alpha=1000.0), progress=False)
    d = report.to_dict()
    assert d["factors"] == [1024.0] and d["modes"] == ["axis"] and d["max_relative_deviation"] is None
    assert d["deviation_status"].startswith("not measured (forward check skipped")
    assert d["forward_check_skipped"].startswith("forward check skipped: model")
    assert d["config"]["alpha"] == 1000.0 and d["num_pairs"] == len(d["pairs"])  # the existing keys stay
    assert {p["factor"] for p in d["pairs"]} == {1024.0}


def test_report_header_with_the_forward_check_and_mixed_modes(pristine, tmp_path):
    report = protect_checkpoint(pristine / "f32", tmp_path / "dst", SpecDefConfig(alpha=1000.0), progress=False)
    header = str(report).splitlines()[:3]
    assert "modes axis (10 pairs: norm, attn.qk, mlp), spectral (4 pairs: attn.vo)" in header[0]
    assert "factor 1000 (as requested)" in header[0]
    assert re.fullmatch(r"max relative output deviation: \d\.\d\de-\d\d \(measured: .*\)", header[2]), header[2]
    assert report.to_dict()["modes"] == ["axis", "spectral"] and report.to_dict()["forward_check_skipped"] is None

    unverified = protect_checkpoint(pristine / "f32", tmp_path / "dst2", SpecDefConfig(alpha=1000.0), progress=False,
                                    verify=False)
    assert "not measured (verification skipped" in str(unverified).splitlines()[2]


def test_in_memory_report_header():
    report = protect(tiny_llama().to(torch.bfloat16), SpecDefConfig(alpha=1000.0), progress=False)
    first, _, dev = str(report).splitlines()[:3]
    assert "factor 1024 (requested alpha 1000 -> factor 1024)" in first and "alpha=1000" not in first
    assert dev.startswith("max relative output deviation: ") and "None" not in dev
    off = protect(tiny_llama(), SpecDefConfig(alpha=1000.0), progress=False, verify=False)
    assert "not measured (protected with verify=False" in str(off)
    assert off.to_dict()["factors"] == [1000.0] and off.to_dict()["deviation_status"].startswith("not measured")


# --------------------------------------------------------------------------------------------
# inspect: every verdict follows from the printed numbers and the documented rule
# --------------------------------------------------------------------------------------------

ROW = re.compile(r"^(?P<name>\S+)\s+(?P<shape>\d+(?:x\d+)*)\s+(?P<sigma>\S+)\s+(?P<gap>\S+)\s+(?P<evidence>\S+)\s+"
                 r"(?P<criterion>\S+)(?:\s+(?P<role>hot|cold))?(?:\s+(?P<verdict>YES))?\s*$")


def _check_table(out: str, known: bool) -> tuple[int, int]:
    """Every row's verdict against its printed evidence and the printed rule; returns (YES, NO) counts."""
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("tensor "))
    threshold = float(re.search(r"deformed \(evidence >= ([\d.e+]+)\)", lines[head]).group(1))
    end = next(i for i, line in enumerate(lines) if line.startswith("deformed matrices:"))
    rule = next(line for line in lines if line.startswith("rule (threshold"))
    criteria = BLOCK_CRITERIA if known else MATRIX_CRITERIA
    assert f"rule (threshold {threshold:g}): deformed = YES when the evidence column" in rule
    assert all(c in rule for c in criteria)
    yes = no = 0
    for line in lines[head + 1:end]:
        m = ROW.match(line)
        assert m, line
        verdict = m["verdict"] == "YES"
        if m["evidence"] == "-":  # not judged: a matrix in no site
            assert known and m["criterion"] == "-" and not verdict and not m["role"], line
            no += 1
            continue
        value = float(m["evidence"])
        assert m["criterion"] in criteria, line
        if abs(value - threshold) > 1e-3 * threshold:  # away from the printed precision of the threshold
            assert verdict == (value >= threshold), line
        yes, no = yes + verdict, no + (not verdict)
    assert re.search(rf"deformed matrices: {yes}/{yes + no};", lines[end]), lines[end]
    return yes, no


def test_inspect_verdicts_follow_from_the_printed_evidence(pristine, tmp_path, capsys):
    dst = tmp_path / "dst"
    assert main(["protect", str(pristine / "f32"), str(dst), "--no-progress"]) == 0
    rc, err, out = _run(["inspect", str(dst)], capsys)
    assert rc == 0, err
    yes, no = _check_table(out, known=True)
    assert yes == 14 and no == 2  # every projection of both layers; embeddings and lm_head in no site
    # a threshold inside the evidence's range splits the rows: both verdicts are still read off the numbers
    rc, err, out = _run(["inspect", str(dst), "--threshold", "1000"], capsys)
    assert rc == 0, err
    yes, no = _check_table(out, known=True)
    assert yes > 0 and no > 2
    rc, err, out = _run(["inspect", str(pristine / "f32")], capsys)
    assert _check_table(out, known=True) == (0, 16)

    rc, _, out = _run(["inspect", str(dst), "--json"], capsys)
    rep = json.loads(out)
    assert rep["rule"] and rep["threshold"] == 20
    for t in rep["tensors"]:
        assert t["deformed"] == (t["score"] is not None and t["score"] >= rep["threshold"]), t["name"]
        assert t["score"] is None or t["evidence"][t["criterion"]] == t["score"]
        assert t["score"] is None or t["score"] == max(v for k, v in t["evidence"].items() if k in BLOCK_CRITERIA)


def test_inspect_unknown_architecture_uses_matrix_evidence(pristine, tmp_path, capsys):
    """Without a config the registry knows, the printed matrix-level evidence decides (a bare safetensors file)."""
    dst = tmp_path / "dst"
    assert main(["protect", str(pristine / "f32"), str(dst), "--no-progress"]) == 0
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(dst / "model.safetensors", bare / "model.safetensors")
    rc, err, out = _run(["inspect", str(bare / "model.safetensors")], capsys)
    assert rc == 0, err
    yes, _ = _check_table(out, known=False)
    assert yes > 0 and "architecture not in the site registry" in out
    assert math.isfinite(float(re.search(r"coverage ([\d.]+)%", out).group(1)))
