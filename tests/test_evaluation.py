"""Evaluation harness: steps-to-target, seeded runs, bypass invariance, protection slowdown, benchmark smoke run."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import tiny_llama

from hf_specdef import SpecDefConfig, protect
from hf_specdef.research.evaluation import AttackConfig, best_run, cycle, ema, run_attack, site_parameter_names, steps_to_target


def _task(vocab: int = 32, n: int = 8, batch: int = 8, seq: int = 16, seed: int = 0) -> list[torch.Tensor]:
    """A learnable next-token task: token t is always followed by perm[t]."""
    g = torch.Generator().manual_seed(seed)
    nxt = torch.randperm(vocab, generator=g)
    out = []
    for _ in range(n):
        cols = [torch.randint(0, vocab, (batch,), generator=g)]
        for _ in range(seq - 1):
            cols.append(nxt[cols[-1]])
        out.append(torch.stack(cols, 1))
    return out


def _loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch, labels=batch).loss


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama(layers=1)
    data = _task()
    cfg = SpecDefConfig(alpha=1000.0)
    protected = copy.deepcopy(model)
    protect(protected, cfg, progress=False)
    return model, protected, data, site_parameter_names(model, cfg)


def test_steps_to_target_known_curve():
    curve = [5.0, 4.0, 3.0, 2.0, 1.0]
    assert steps_to_target(curve, 2.5) == 4
    assert steps_to_target(curve, 5.0) == 1
    assert steps_to_target(curve, 1.0) == 5
    assert steps_to_target(curve, 0.5) == 6  # never reached: len + 1
    assert steps_to_target(curve, 0.5, budget=100) == 101  # never reached: budget + 1
    assert steps_to_target([float("nan"), float("-inf"), 2.0], 3.0) == 3  # non-finite values never count


def test_ema_is_bias_corrected():
    assert ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])
    assert ema([1.0, 3.0], 0.5) == pytest.approx([1.0, (0.5 * 0.5 + 0.5 * 3.0) / (1 - 0.5**2)])
    assert ema([1.0, 3.0], 0.0) == [1.0, 3.0]


def test_attack_config_validation():
    with pytest.raises(ValueError, match="train"):
        AttackConfig(train="everything")
    with pytest.raises(ValueError, match="optimizer"):
        AttackConfig(train="all", optimizer="rmsprop")
    with pytest.raises(ValueError, match="site_names"):
        AttackConfig(train="sites")
    with pytest.raises(ValueError, match="lr"):
        AttackConfig(train="all", lr=-1.0)


def test_seeded_runs_reproduce(setup):
    model, _, data, names = setup
    ac = AttackConfig(train="sites", optimizer="adam", lr=3e-3, steps=6, site_names=names, seed=1)
    a = run_attack(model, _loss, lambda s: cycle(data, s), ac)
    b = run_attack(model, _loss, lambda s: cycle(data, s), ac)
    assert a.losses == b.losses and a.curve == b.curve
    c = run_attack(model, _loss, lambda s: cycle(data, s), AttackConfig(**{**ac.__dict__, "seed": 2}))
    assert c.losses != a.losses  # another seed: another batch order
    # LoRA adapters get the same initialisation in every run with the same seed
    lc = AttackConfig(train="lora", optimizer="adam", lr=3e-3, steps=4, target_modules=["q_proj", "v_proj"], seed=1)
    la = run_attack(model, _loss, lambda s: cycle(data, s), lc)
    lb = run_attack(model, _loss, lambda s: cycle(data, s), lc)
    assert la.curve == lb.curve and la.trainable_params == 8 * (64 + 64) + 8 * (64 + 32)  # q: 64->64, v: 64->32 (GQA)
    # the original model is never trained in place
    assert torch.equal(dict(model.named_parameters())[names[0]], dict(tiny_llama(layers=1).named_parameters())[names[0]])


def test_never_reached_counts_budget_plus_one(setup):
    model, _, data, names = setup
    r = run_attack(model, _loss, lambda s: cycle(data, s),
                   AttackConfig(train="sites", lr=1e-3, steps=5, site_names=names, target=-1.0, stop_at_target=True))
    assert not r.reached and r.steps_to_target == 6 and len(r.curve) == 5
    # stop_at_target: the curve ends at the step that reached it
    r2 = run_attack(model, _loss, lambda s: cycle(data, s),
                    AttackConfig(train="sites", lr=1e-3, steps=5, site_names=names, target=1e9, stop_at_target=True))
    assert r2.reached and r2.steps_to_target == 1 and len(r2.curve) == 1
    assert r.with_target(1e9).steps_to_target == 1


def test_bypass_trains_identically_on_protected_model(setup):
    """docs/design.md: the function is unchanged, so the undeformed parameters train exactly as before."""
    model, protected, data, names = setup
    ac = AttackConfig(train="bypass", optimizer="adam", lr=1e-2, steps=8, site_names=names, smoothing=0.0)
    a = run_attack(model, _loss, lambda s: cycle(data, s), ac)
    b = run_attack(protected, _loss, lambda s: cycle(data, s), ac)
    assert a.trainable_params == b.trainable_params > 0
    assert max(abs(x - y) for x, y in zip(a.curve, b.curve, strict=True)) < 1e-3
    assert a.curve[-1] < a.curve[0] - 0.05  # and it does learn


def test_protection_slows_adam_on_sites(setup):
    """Best of a learning-rate sweep: the unprotected model reaches the target, the protected one does not."""
    model, protected, data, names = setup
    lrs = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
    runs = {}
    for key, m in (("unprotected", model), ("protected", protected)):
        runs[key] = [run_attack(m, _loss, lambda s: cycle(data, s),
                                AttackConfig(train="sites", optimizer="adam", lr=lr, steps=25, site_names=names,
                                             divergence=1.5)) for lr in lrs]
    start = runs["unprotected"][0].curve[0]
    low = min(min(r.curve) for r in runs["unprotected"])
    target = start - 0.8 * (start - low)
    u, p = best_run(runs["unprotected"], target), best_run(runs["protected"], target)
    assert u.reached and u.steps_to_target <= 25
    assert not p.reached and p.steps_to_target == 26


def test_specundo_attack_runs(setup):
    _, protected, data, _ = setup
    r = run_attack(protected, _loss, lambda s: cycle(data, s),
                   AttackConfig(train="specundo", optimizer="adam", lr=1e-3, steps=3, r=4,
                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    assert len(r.curve) == 3 and all(math.isfinite(v) for v in r.curve) and r.trainable_params > 0


def test_benchmark_smoke(tmp_path):
    """A seconds-long benchmark writes results.json with the summary keys, PNG plots and the markdown table."""
    from hf_specdef.research.evaluation.benchmark import BenchConfig, run_benchmark

    cfg = BenchConfig.preset("tiny")
    res = run_benchmark(cfg, tmp_path, progress=False)
    data = json.loads((tmp_path / "results.json").read_text())
    s = data["summary"]
    for key in ("slowdown_protected", "slowdown_undo", "slowdown_protected_sgd", "slowdown_bypass", "target_loss",
                "budget", "budget_ok"):
        assert key in s
    assert s["budget"] == 20 * cfg.reference_steps and s["budget_ok"]
    assert s["slowdown_protected"] is not None and s["slowdown_protected"] > 0
    u = data["table"]["unprotected"]["adam"]
    assert u["reached"] and u["steps_to_target"] <= cfg.reference_steps
    assert len(data["curves"]["unprotected"]["adam"]) == len(cfg.adam_lrs)
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert "loss_adam.png" in pngs and all((tmp_path / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)
    table = (tmp_path / "results.md").read_text()
    assert "| unprotected | adam |" in table and "slowdown_protected" in table
    assert res["table_markdown"].strip() == table.strip()
