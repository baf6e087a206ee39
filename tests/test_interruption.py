"""Interrupted runs: SIGTERM is handled like Ctrl-C, and a run killed at any point (SIGKILL) leaves the source
unchanged and the destination absent or complete; the next run removes what the killed one left behind."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

from hf_specdef import SpecDefConfig, protect_checkpoint
from hf_specdef.storage.staging import make_staging, sweep_stale

CFG = SpecDefConfig(alpha=1000.0)


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _debris(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".specdef-" in p.name)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("interrupt") / "src"
    tiny_llama(seed=0, layers=4).save_pretrained(str(root), max_shard_size="60KB")
    (root / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    return root


@pytest.fixture(scope="module")
def reference_logits(src) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(src).eval()(torch.arange(16).view(1, -1)).logits


def _check_complete(dst: Path, reference: torch.Tensor) -> None:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(dst).eval()(torch.arange(16).view(1, -1)).logits
    assert (got - reference).abs().max() / reference.abs().max() <= 1e-4
    assert (dst / "tokenizer_config.json").is_file()


def test_stale_staging_folders_of_dead_runs_are_removed_and_live_ones_kept(src, tmp_path, caplog):
    dst = tmp_path / "dst"
    dead = tmp_path / f".dst.specdef-tmp-{_dead_pid()}-0badc0de"
    (dead / "sub").mkdir(parents=True)
    (dead / "sub" / "model.safetensors").write_bytes(b"half written")
    live = make_staging(dst)  # this process's own, as a concurrent run's would be
    other = tmp_path / f".other.specdef-tmp-{_dead_pid()}-12345678"  # another destination's: not ours to touch
    other.mkdir()
    with caplog.at_level("WARNING", logger="hf_specdef"):
        protect_checkpoint(src, dst, CFG, progress=False)
    assert not dead.exists() and live.is_dir() and other.is_dir()
    assert f"removed {dead.name}" in caplog.text and f"left {live.name}" in caplog.text
    assert _debris(tmp_path) == sorted([live.name, other.name])


def test_a_destination_moved_aside_by_a_killed_replace_is_put_back(tmp_path):
    dst = tmp_path / "dst"
    old = tmp_path / f".dst.specdef-old-{_dead_pid()}-aaaa0000"
    old.mkdir()
    (old / "config.json").write_text("{}")
    notes = sweep_stale(dst)
    assert (dst / "config.json").is_file() and not old.exists()
    assert notes and notes[0].startswith(f"put back {dst}")


def _cli(src: Path, dst: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "hf_specdef", "protect", str(src), str(dst), "--alpha", "1000",
                             "--no-progress", *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_staging(proc: subprocess.Popen, parent: Path, timeout: float = 60.0) -> float:
    """Seconds until the run's staging folder appears (the protection has started), or until it ended."""
    start = time.monotonic()
    while time.monotonic() - start < timeout and proc.poll() is None:
        if any(".specdef-tmp-" in p.name for p in parent.iterdir()):
            return time.monotonic() - start
        time.sleep(0.005)
    return time.monotonic() - start


def test_sigterm_stops_like_ctrl_c_and_leaves_nothing(src, tmp_path):
    dst = tmp_path / "dst"
    proc = _cli(src, dst)
    _wait_for_staging(proc, tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:  # it finished before the signal arrived: nothing to check but completeness
        assert dst.is_dir()
    else:
        # 143 (128 + SIGTERM); CPython may report an interrupted exit as killed by SIGINT when the KeyboardInterrupt
        # also reached an ignored finalizer
        assert proc.returncode in (128 + signal.SIGTERM, -signal.SIGINT), err
        assert "terminated (SIGTERM)" in err and "Traceback" not in err
        assert not dst.exists()
    assert _debris(tmp_path) == []


def test_killed_at_random_points_source_unchanged_destination_absent_or_complete(src, tmp_path, reference_logits):
    """SIGKILL and SIGTERM at random moments of a protection run: the three invariants hold after each kill."""
    before = _hashes(src)
    rng = random.Random(1234)
    # how long the protection itself takes (staging folder -> exit), to spread the kill points over it
    dst = tmp_path / "timing"
    start = time.monotonic()
    proc = _cli(src, dst)
    t0 = _wait_for_staging(proc, tmp_path)
    proc.communicate(timeout=120)
    assert proc.returncode == 0
    window = max(0.05, time.monotonic() - start - t0)
    shutil.rmtree(dst)
    outcomes = []
    for i in range(6):
        dst = tmp_path / f"dst{i}"
        sig = signal.SIGKILL if i % 2 == 0 else signal.SIGTERM
        proc = _cli(src, dst)
        _wait_for_staging(proc, tmp_path)
        time.sleep(rng.uniform(0, window))
        if proc.poll() is None:
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert _hashes(src) == before  # 1. the source is never changed
        if "terminated (SIGTERM)" in err:  # SIGTERM caught: the run cleaned up after itself
            assert _debris(tmp_path) == [] and not dst.exists(), err
        if dst.exists():  # 2. the destination is absent or complete and stock-loadable
            _check_complete(dst, reference_logits)
        outcomes.append((sig.name, proc.returncode, dst.exists()))
        # 3. after the next successful run for the same destination, nothing is left behind
        again = protect_checkpoint(src, dst, CFG, progress=False, overwrite=True)
        assert again.results
        assert _debris(tmp_path) == [], outcomes
        _check_complete(dst, reference_logits)
    assert any(not done for _, _, done in outcomes) or window < 0.2, outcomes  # some kills landed mid-run

