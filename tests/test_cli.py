"""The ``hf-specdef`` command line: protect / inspect / verify end to end on a tiny checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_llama

from hf_specdef.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("cli") / "src"
    tiny_llama(seed=0, layers=2).save_pretrained(str(src), max_shard_size="100KB")
    return src


@pytest.fixture(scope="module")
def protected(ckpt, tmp_path_factory) -> tuple[Path, dict]:
    dst = tmp_path_factory.mktemp("cli-out") / "dst"
    out = subprocess.run(
        [sys.executable, "-m", "hf_specdef", "protect", str(ckpt), str(dst), "--alpha", "1024", "--mode", "axis",
         "--sites", "attn.vo,attn.qk,mlp,norm", "--record", "full", "--json", "--no-progress"],
        capture_output=True, text=True, timeout=180, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return dst, json.loads(out.stdout)


def test_protect_via_subprocess(protected):
    dst, report = protected
    assert report["num_pairs"] == 14 and report["max_relative_deviation"] == 0.0
    assert report["sites"] == {"norm": 4, "attn.qk": 4, "attn.vo": 4, "mlp": 2}
    record = json.loads((dst / "config.json").read_text())["specdef"]
    assert record["config"]["mode"] == "axis" and len(record["pairs"]) == 14  # --record full


def test_inspect_flags_protected_and_not_original(ckpt, protected, capsys):
    dst, _ = protected
    assert main(["inspect", str(dst), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["architecture_known"] and rep["hot_coverage"] > 0.5
    assert "model.layers.0.self_attn.o_proj.weight" in rep["deformed"]
    assert main(["inspect", str(ckpt), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["deformed"] == []
    assert main(["inspect", str(dst)]) == 0
    assert "coverage" in capsys.readouterr().out


def test_verify_ok_and_mismatch(ckpt, protected, tmp_path, capsys):
    dst, _ = protected
    assert main(["verify", str(ckpt), str(dst), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["ok"] and res["max_relative_deviation"] <= 1e-4 and res["protected_record"]
    other = tmp_path / "other"
    tiny_llama(seed=1, layers=2).save_pretrained(str(other))
    assert main(["verify", str(ckpt), str(other)]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_protect_in_process_and_errors_are_one_line(ckpt, tmp_path, capsys):
    dst = tmp_path / "dst"
    assert main(["protect", str(ckpt), str(dst), "--sites", "attn.vo", "--layers", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "SpecDef protection: 2 pairs" in out and "attn.vo" in out
    # existing destination: exit 1, one line naming the fix, no traceback
    assert main(["protect", str(ckpt), str(dst), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("hf-specdef protect: error:") and "--overwrite" in err[-1]
    assert not any("Traceback" in line for line in err)
    # already protected source
    assert main(["protect", str(dst), str(tmp_path / "again"), "--no-progress"]) == 1
    assert "--force" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()
    # missing source, bad config value
    assert main(["protect", str(tmp_path / "nope"), str(tmp_path / "x"), "--no-progress"]) == 1
    assert main(["protect", str(ckpt), str(tmp_path / "x"), "--alpha", "0.5", "--no-progress"]) == 1
    assert "alpha" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["protect", str(ckpt), str(tmp_path / "x"), "--sites", "attn.zz"])
    assert info.value.code == 2
    assert not (tmp_path / "x").exists()
