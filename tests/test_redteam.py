"""The red team: suite, data, learning-rate search, Trainer runs (single process and DDP), the CLI and its output."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import byte_tokenizer

from hf_specdef.research.redteam import attacks as atk
from hf_specdef.research.redteam.config import RedTeamConfig
from hf_specdef.research.redteam.data import AttackDataError, build_attack_data, default_corpus
from hf_specdef.research.redteam.search import grid_lr, loss_at_key, search_lr, steps_key
from hf_specdef.research.redteam.suite import RedTeamError, median_slowdown, run_redteam, slowdown
from hf_specdef.research.redteam.training import Run


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny_lm")
    tok = byte_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# --------------------------------------------------------------------------------------------------------- the suite
def test_suite_has_at_least_12_uninformed_attacks_and_the_informed_ones():
    uninformed = [a for a in atk.SUITE.values() if not a.informed]
    assert len(uninformed) >= 12
    kinds = {(a.train, a.optim) for a in uninformed}
    assert {("full", "adamw_torch"), ("full", "sgd"), ("full", "adafactor"), ("lora", "adamw_torch")} <= kinds
    assert any(a.bf16 for a in uninformed) and any(a.clip for a in uninformed)
    assert {a.schedule for a in uninformed} >= {"constant", "cosine"}
    assert any(a.r == 64 and a.targets == "all-linear" for a in uninformed)
    informed = {a.name for a in atk.SUITE.values() if a.informed}
    assert informed == {"specundo-blind", "specundo-recipe", "merge-undo", "bypass"}
    assert all(atk.SUITE[a.baseline] and not atk.SUITE[a.baseline].informed for a in atk.SUITE.values() if a.informed)


def test_linears_attack_trains_linear_weights_only(tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    from hf_specdef.research.redteam.prepare import prepare_model

    work = prepare_model(AutoModelForCausalLM.from_pretrained(tiny_lm_dir), atk.SUITE["linears-adamw"], 0)
    trained = {n for n, p in work.named_parameters() if p.requires_grad}
    assert trained and all(n.endswith(("_proj.weight", "lm_head.weight")) for n in trained)
    assert not any("norm" in n or "embed" in n for n in trained)


def test_outlier_frozen_attack_freezes_where_two_pairs_compensated_sides_meet(tiny_lm_dir):
    """With no knowledge of SpecDef, freezing the tensors whose gradient peaks far above the rest finds k_proj on a
    protected model (its rows compensate the query/key pair and its columns the norm pair: alpha^2) and nothing on
    the original."""
    from transformers import AutoModelForCausalLM

    from hf_specdef import SpecDefConfig, protect
    from hf_specdef.research.redteam.prepare import prepare_model

    batch = build_attack_data(byte_tokenizer(), seq_len=16, eval_windows=4).train[:4]
    attack = atk.SUITE["full-adamw-freeze-outliers"]
    plain = prepare_model(AutoModelForCausalLM.from_pretrained(tiny_lm_dir), attack, 0, first_batch=batch)
    assert all(p.requires_grad for p in plain.parameters())
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    protect(model, SpecDefConfig(alpha=65536.0, mode="axis"), progress=False)
    work = prepare_model(model, attack, 0, first_batch=batch)
    frozen = {n for n, p in work.named_parameters() if not p.requires_grad}
    assert frozen and {n.split(".")[-2] for n in frozen} == {"k_proj"}
    assert all(p.grad is None for p in work.parameters())
    with pytest.raises(ValueError, match="first_batch"):
        prepare_model(model, attack, 0)
    again = prepare_model(model, attack, 1, measured=frozen)  # measured once per model: the red team passes it on
    assert {n for n, p in again.named_parameters() if not p.requires_grad} == frozen


def test_outlier_masked_attack_masks_the_lines_protection_shrank(tiny_lm_dir):
    """Per linear weight, the rows/columns whose gradient norm stands out are the ones axis protection shrank (the
    compensated, fast sides): none on the original; one AdamW step leaves them and only them unchanged."""
    from transformers import AutoModelForCausalLM

    from hf_specdef import SpecDefConfig, protect
    from hf_specdef.research.redteam.prepare import gradient_outlier_lines, prepare_model

    batch = build_attack_data(byte_tokenizer(), seq_len=16, eval_windows=4).train[:4]
    assert gradient_outlier_lines(AutoModelForCausalLM.from_pretrained(tiny_lm_dir), batch) == {}
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    protect(model, SpecDefConfig(alpha=1024.0, mode="axis"), progress=False)
    masks = gradient_outlier_lines(model, batch)
    assert {n.split(".")[-2] for n in masks} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"}
    found = shrunk_lines = 0
    for n, p in model.named_parameters():
        if n.endswith("_proj.weight"):
            ratio = p.detach() / original[n]
            mask = masks.get(n, torch.zeros_like(p, dtype=torch.bool))
            for dim in (1, 0):  # rows, then columns
                shrunk, masked = ratio.median(dim=dim).values < 0.5, mask.all(dim=dim)
                assert not (masked & ~shrunk).any(), (n, dim)  # only lines protection shrank
                found, shrunk_lines = found + int(masked.sum()), shrunk_lines + int(shrunk.sum())
    assert found >= 0.8 * shrunk_lines  # nearly all of them (a line whose own gradient is tiny may hide)
    work = prepare_model(model, atk.SUITE["full-adamw-mask-outlier-lines"], 0, measured=masks)
    before = {n: p.detach().clone() for n, p in work.named_parameters()}
    opt = torch.optim.AdamW(work.parameters(), lr=1e-3, weight_decay=0.0)
    work(input_ids=batch, labels=batch).loss.backward()
    opt.step()
    for n, p in work.named_parameters():
        moved = p.detach() != before[n]
        if n in masks:
            assert not moved[masks[n]].any() and moved[~masks[n]].float().mean() > 0.9, n


def test_outlier_projected_attack_finds_dense_deformation_directions(tiny_lm_dir):
    """Spectral protection deforms along dense directions, which no row/column mask isolates; the outlier singular
    directions of each weight's gradient do (the consumer side of every attn.vo pair, >= 0.7 captured), and the
    gradient hook keeps the weights from moving along them."""
    from transformers import AutoModelForCausalLM

    from hf_specdef import SpecDefConfig, protect
    from hf_specdef.research.redteam.prepare import gradient_outlier_directions, prepare_model

    batch = build_attack_data(byte_tokenizer(), seq_len=16, eval_windows=4).train[:4]
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    report = protect(model, SpecDefConfig(alpha=1000.0, mode="spectral", precision="float32", sites=("attn.vo",)),
                     progress=False)
    directions = gradient_outlier_directions(model, batch)
    params = dict(model.named_parameters())
    captured = []
    for result in report.results:
        for b in result.pair.consumers:  # o_proj columns of one head: the input side
            e = torch.zeros(params[b.name].shape[1])
            e[b.start:b.stop] = result.deformation.basis[:, 0].float()
            v = directions[b.name][1]
            captured.append(float((v.T @ e).norm()))
    assert min(captured) >= 0.5 and sum(captured) / len(captured) >= 0.7, captured
    work = prepare_model(model, atk.SUITE["full-adamw-mask-outlier-directions"], 0, measured=directions)
    name = report.results[0].pair.consumers[0].name
    before = dict(work.named_parameters())[name].detach().clone()
    opt = torch.optim.AdamW(work.parameters(), lr=1e-3, weight_decay=0.0)
    work(input_ids=batch, labels=batch).loss.backward()
    grad = dict(work.named_parameters())[name].grad
    v = directions[name][1]
    assert float((grad @ v).abs().max()) <= 1e-6 * float(grad.abs().max())
    opt.step()  # Adam's per-coordinate step leaves the gradient's subspace; the next forward projects it back
    work(input_ids=batch)
    moved = dict(work.named_parameters())[name].detach() - before
    assert float(moved.abs().max()) > 1e-5 and float((moved @ v).abs().max()) <= 1e-5 * float(moved.abs().max())


def test_get_attacks_adds_baselines_first_and_rejects_unknown_names():
    names = [a.name for a in atk.get_attacks(["specundo-blind"])]
    assert names == ["lora16-qkvo", "specundo-blind"]
    with pytest.raises(ValueError, match="unknown attack.*nope"):
        atk.get_attacks(["nope"])


@pytest.mark.parametrize("field,value,match", [
    ("variants", ("bogus",), "variants"), ("seeds", (), "seeds"), ("budget_factor", 1, "budget_factor"),
    ("fraction", 0.0, "fraction"), ("batch_size", 0, "batch_size"), ("variants", ("custom",), "protection"),
])
def test_config_names_the_bad_field(field, value, match):
    with pytest.raises(ValueError, match=f"RedTeamConfig.{match}"):
        RedTeamConfig(**{field: value})


# ---------------------------------------------------------------------------------------------------------- the data
def test_shipped_corpus_is_fixed_and_split_interleaved():
    text = default_corpus()
    assert len(text) > 100_000 and text.startswith("Apache License")
    data = build_attack_data(byte_tokenizer(), seq_len=32, eval_windows=8)
    assert data.train.shape[1] == data.eval.shape[1] == 32 and len(data.eval) == 8
    again = build_attack_data(byte_tokenizer(), seq_len=32, eval_windows=8)
    assert torch.equal(data.train, again.train) and torch.equal(data.eval, again.eval)
    train_rows = {tuple(r.tolist()) for r in data.train}
    assert not any(tuple(r.tolist()) in train_rows for r in data.eval)  # held out


def test_user_data_txt_jsonl_and_errors(tmp_path):
    tok = byte_tokenizer()
    rows = [{"text": f"Clause {i}. The licensee shall keep every notice intact. " * 4} for i in range(60)]
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows))
    data = build_attack_data(tok, jl, seq_len=32, eval_windows=4)
    assert "jsonl" in data.source and len(data.train) >= 16
    small = tmp_path / "small.txt"
    small.write_text("too short")
    with pytest.raises(AttackDataError, match="too few"):
        build_attack_data(tok, small, seq_len=32)
    with pytest.raises(AttackDataError, match="is not a file"):
        build_attack_data(tok, tmp_path / "missing.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(AttackDataError, match="no string field 'text'"):
        build_attack_data(tok, bad)


# ------------------------------------------------------------------------------------------------- search and ratios
def _fake_run(optimum: float, calls: list[float], budget: int = 100):
    """Steps to target grow with the log-distance of lr from ``optimum``; very large lrs diverge."""
    def run(lr: float, stop: int | None) -> Run:
        calls.append(lr)
        steps = int(10 + 30 * abs(math.log10(lr / optimum)))
        diverged = lr > optimum * 30
        hit = None if diverged or steps > (stop or budget) else steps
        last = min(stop or budget, steps)
        return Run("a", lr, 0, budget, [(0, 5.0), (last, 4.0 if hit else 4.5)], 4.2, hit, diverged, last)
    return run


def test_search_brackets_the_optimum_at_three_points_per_decade():
    calls: list[float] = []
    found = search_lr(_fake_run(3e-6, calls), 1e-4, steps_key, prune=True)
    assert found.best.lr == pytest.approx(2.15e-6, rel=0.01)
    best = found.best.lr
    assert any(lr == pytest.approx(best * 10 ** (1 / 3), rel=0.02) for lr in found.grid)
    assert any(lr == pytest.approx(best / 10 ** (1 / 3), rel=0.02) for lr in found.grid)
    assert len(calls) == len(set(calls)) <= 10  # no lr run twice


def test_fine_steps_look_first_towards_the_better_decade_neighbour():
    # the quick red team's freeze-outliers search: start 2.15e-5 reaches in 57 steps, 2.15e-4 diverges, 2.15e-6 is
    # slower; the optimum 9.98e-6 lies below the start, 4.63e-5 runs long without diverging
    table = {2.15e-5: 57, 9.98e-6: 33, 4.63e-6: 40, 2.15e-6: 70, 4.63e-5: 90, 9.98e-7: 95}
    calls: list[tuple[float, int | None]] = []

    def run(lr, stop):
        calls.append((lr, stop))
        if lr > 1e-4:
            return Run("a", lr, 0, 80, [(0, 4.0), (1, 9.0)], 3.0, None, True, 1)
        need = table.get(lr, 99)
        hit = need if need <= (stop or 80) else None
        last = hit or (stop or 80)
        return Run("a", lr, 0, 80, [(0, 4.0), (last, 3.0 if hit else 3.5)], 3.0, hit, False, last)

    found = search_lr(run, 2.15e-5, steps_key, prune=True)
    assert found.best.lr == 9.98e-6 and found.best.steps_to_target == 33
    order = [lr for lr, _ in calls]
    assert order.index(9.98e-6) == 3  # right after the decade neighbours, before any rate above the start
    assert 4.63e-5 not in order  # the best's neighbours (2.15e-5 and 4.63e-6) bracket it: never needed
    assert dict(calls)[4.63e-6] == 33  # pruned at the better run's steps


def test_search_moves_down_when_every_run_diverges():
    calls: list[float] = []

    def run(lr, stop):  # diverges above 1e-7 in one step; below, reaches the target in 20 steps
        calls.append(lr)
        if lr > 1.5e-7:
            return Run("a", lr, 0, 100, [(0, 5.0), (1, 9.0)], 4.2, None, True, 1)
        return Run("a", lr, 0, 100, [(0, 5.0), (20, 4.1)], 4.2, 20, False, 20)

    found = search_lr(run, 4.64e-4, steps_key, prune=True)
    assert found.best.reached and found.best.lr <= 1.5e-7
    assert min(calls) < found.best.lr  # and the optimum is bracketed from below too


def test_search_prunes_runs_at_the_best_steps_so_far():
    seen: list[int | None] = []
    base = _fake_run(1e-3, [])

    def run(lr, stop):
        seen.append(stop)
        return base(lr, stop)

    search_lr(run, 1e-3, steps_key, prune=True)
    assert seen[0] is None and all(s == 10 for s in seen[1:])


def test_loss_at_key_prefers_lower_loss_and_penalises_divergence():
    good = Run("a", 1e-3, 0, 10, [(0, 5.0), (4, 4.0)], stopped_at=4)
    diverged = Run("a", 1e-2, 0, 10, [(0, 5.0), (2, 3.0)], diverged=True, stopped_at=2)
    key = loss_at_key(4)
    assert key(good) < key(diverged)
    assert grid_lr(1e-4, 1, 3) == 2.15e-4 and grid_lr(1e-4, -3, 3) == 1e-5


def test_slowdown_is_a_lower_bound_when_the_target_is_never_reached():
    assert slowdown(30, 10, 100) == {"ratio": 3.0, "lower_bound": False}
    assert slowdown(None, 10, 100) == {"ratio": 10.1, "lower_bound": True}
    m = median_slowdown([slowdown(30, 10, 100), slowdown(None, 10, 100), slowdown(20, 10, 100)])
    assert m["ratio"] == 3.0 and m["min"] == 2.0 and m["max"] == 10.1 and not m["lower_bound"]
    assert m["max_lower_bound"] and not m["min_lower_bound"]
    from hf_specdef.research.redteam.report import _range

    assert _range(m) == "2.00 to >=10.10"  # never reached within the budget: only a lower bound is proven
    m2 = median_slowdown([slowdown(40, 10, 100), slowdown(30, 10, 100)])
    assert m2["ratio"] == 3.0  # the lower median: conservative for the defence


# ------------------------------------------------------------------------------------------------- Trainer and CLI
def test_run_attack_on_trainer_stops_at_the_target(tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    from hf_specdef.research.redteam.prepare import prepare_model
    from hf_specdef.research.redteam.training import eval_loss, run_attack

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    data = build_attack_data(byte_tokenizer(), seq_len=16, eval_windows=4)
    l0 = eval_loss(model, data.eval)
    attack = atk.SUITE["full-adamw"]
    r = run_attack(prepare_model(model, attack, 0), attack, data, lr=1e-2, seed=0, budget=40, target=l0 - 0.3)
    assert r.reached and 1 < r.steps_to_target < 40 and r.stopped_at == r.steps_to_target
    assert r.curve[0] == (0, pytest.approx(l0)) and r.curve[-1][1] <= l0 - 0.3
    assert r.trainable_params == sum(p.numel() for p in model.parameters())
    assert torch.equal(next(model.parameters()), next(AutoModelForCausalLM.from_pretrained(tiny_lm_dir).parameters()))


def test_run_attack_trains_full_madam_with_multiplicative_adam_through_the_trainer(tiny_lm_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    from hf_specdef.research.redteam import optimizers
    from hf_specdef.research.redteam.prepare import prepare_model
    from hf_specdef.research.redteam.training import eval_loss, run_attack

    steps: list[float] = []

    class Spy(optimizers.MultiplicativeAdam):
        def step(self, closure=None):
            steps.append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setitem(optimizers.CUSTOM_OPTIMIZERS, "madam", Spy)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    data = build_attack_data(byte_tokenizer(), seq_len=16, eval_windows=4)
    l0 = eval_loss(model, data.eval)
    attack = atk.SUITE["full-madam"]
    r = run_attack(prepare_model(model, attack, 0), attack, data, lr=0.05, seed=0, budget=30, target=l0 - 0.2)
    assert r.reached and len(steps) == r.steps_to_target and steps[0] == pytest.approx(0.05)  # constant schedule


def test_redteam_cli_tiny_writes_results_with_the_worst_case(tiny_lm_dir, tmp_path):
    from hf_specdef.cli import main

    out = tmp_path / "rt"
    assert main(["redteam", str(tiny_lm_dir), "--out", str(out), "--tiny", "--no-progress",
                 "--attacks", "full-adamw,bypass"]) == 0
    res = json.loads((out / "results.json").read_text())
    s = res["summary"]
    assert s["worst_case_attack"] == "full-adamw" and s["worst_case_slowdown"] > 0
    assert s["undo_attack"] == "bypass" and "undo_slowdown" in s
    base = res["unprotected"]["full-adamw"]
    assert base["steps"]["0"] >= 2  # not the first step (a random tiny model learns its unigram table fast)
    grid = base["search"]["grid"]
    best = base["best_lr"]
    assert sum(best / 10 ** 0.5 <= lr <= best * 10 ** 0.5 for lr in grid) >= 3  # >= 3 points in the decade around it
    entry = res["variants"]["default"]["attacks"]["full-adamw"]
    assert entry["median"]["ratio"] == pytest.approx(s["worst_case_slowdown"])
    assert {"results.md", "worst_attack_loss.png", "slowdown_default.png"} <= {p.name for p in out.iterdir()}
    assert "Worst case over 1 uninformed" in (out / "results.md").read_text()


def test_a_baseline_added_for_an_informed_attack_runs_on_the_unprotected_model_only(tiny_lm_dir):
    res = run_redteam(tiny_lm_dir, None, RedTeamConfig.preset_config("tiny", attacks=("bypass",), max_runs=4),
                      progress=False)
    assert set(res["unprotected"]) == {"full-adamw"}  # bypass's baseline: its target and unprotected steps
    assert set(res["variants"]["default"]["attacks"]) == {"bypass"}
    entry = res["variants"]["default"]["attacks"]["bypass"]
    assert entry["target"] == pytest.approx(res["unprotected"]["full-adamw"]["target"])
    assert "worst_case_slowdown" not in res["summary"] and res["summary"]["undo_attack"] == "bypass"


def test_quick_preset_runs_the_strongest_uninformed_attack_and_the_undo():
    cfg = RedTeamConfig.preset_config("quick")
    assert cfg.attacks == ("full-madam", "specundo-blind") and cfg.budget == 80


def test_redteam_attacks_a_given_protected_model_reusing_the_unprotected_baselines(tiny_lm_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_specdef import SpecDefConfig, protect
    from hf_specdef.research.redteam.suite import run_redteam

    cfg = RedTeamConfig.preset_config("tiny", attacks=("full-adamw",), max_runs=4)
    first = run_redteam(tiny_lm_dir, None, cfg, progress=False)
    mine = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    protect(mine, SpecDefConfig(alpha=64.0, mode="axis", sites=("norm",)), progress=False)
    mine.save_pretrained(tmp_path / "mine")
    res = run_redteam(tiny_lm_dir, tmp_path / "out", RedTeamConfig.preset_config("tiny", attacks=("full-adamw", "bypass"),
                                                                               variants=(), max_runs=4),
                      protected={"mine": tmp_path / "mine"}, reuse_unprotected=first, progress=False)
    assert res["reused_unprotected"] == ["full-adamw"]
    assert res["unprotected"]["full-adamw"]["target"] == first["unprotected"]["full-adamw"]["target"]
    v = res["variants"]["mine"]
    assert res["summary"]["variant"] == "mine" and v["deviation_float32"] <= 1e-4 and v["bf16_exact"]
    assert v["frozen_by_bypass"] == 2 * (1 + 3 + 1 + 2)  # 2 layers: 2 norms + q,k,v + gate,up readers
    assert "bypass" in v["attacks"] and "full-adamw" in v["attacks"]
    with pytest.raises(RedTeamError, match="differs in"):
        run_redteam(tiny_lm_dir, None, RedTeamConfig.preset_config("tiny", attacks=("full-adamw",), reference_steps=3),
                    reuse_unprotected=first, progress=False)
    with pytest.raises(RedTeamError, match="does not compute the original"):
        other = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
        torch.nn.init.normal_(other.model.layers[0].mlp.down_proj.weight)
        run_redteam(tiny_lm_dir, None, cfg, protected={"broken": other}, progress=False)


def test_variant_protected_in_bfloat16_keeps_the_float32_function(tiny_lm_dir):
    """The copy is protected as a bf16 release; casting the whole model would also round the rotary inv_freq buffer
    (a different function, 1.4e-3 on SmolLM2): only the parameters are cast."""
    from transformers import AutoModelForCausalLM

    from hf_specdef.research.redteam.suite import protect_variant

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).to(torch.bfloat16).float()  # bf16-valued weights
    model.model.rotary_emb.inv_freq.mul_(1.0 + 1e-6)  # not a bf16 value: a buffer cast would change it
    ids = build_attack_data(byte_tokenizer(), seq_len=16, eval_windows=4).eval
    protected, info = protect_variant(model, "default", RedTeamConfig(), ids, torch.bfloat16)
    assert info["release_dtype"] == "bfloat16" and info["precision"]["used"] == "axis"
    assert info["deviation_float32"] == 0.0 and info["deviation_bfloat16"] == 0.0
    assert torch.equal(protected.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    assert all(p.dtype == torch.float32 for p in protected.parameters())


def test_redteam_bad_inputs_leave_nothing(tiny_lm_dir, tmp_path):
    from hf_specdef.research.redteam.suite import run_redteam

    cfg = RedTeamConfig.preset_config("tiny", attacks=("full-adamw",))
    with pytest.raises(RedTeamError, match="not a model folder"):
        run_redteam(tmp_path, tmp_path / "o1", cfg)
    existing = tmp_path / "full"
    existing.mkdir()
    (existing / "x").write_text("keep")
    with pytest.raises(RedTeamError, match="already exists"):
        run_redteam(tiny_lm_dir, existing, cfg)
    small = tmp_path / "small.txt"
    small.write_text("a few words")
    with pytest.raises(AttackDataError, match="too few"):
        run_redteam(tiny_lm_dir, tmp_path / "o2", RedTeamConfig.preset_config("tiny", attacks=("full-adamw",),
                                                                             data=str(small)))
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "small.txt"]


def test_redteam_refuses_an_already_protected_model(tiny_lm_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_specdef import SpecDefConfig, protect
    from hf_specdef.research.redteam.suite import run_redteam

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    protect(model, SpecDefConfig(), progress=False)
    with pytest.raises(RedTeamError, match="already protected"):
        run_redteam(model, None, RedTeamConfig.preset_config("tiny"), tokenizer=byte_tokenizer())


DDP_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    sys.path.insert(0, sys.argv[3])
    from test_redteam import byte_tokenizer
    from hf_specdef.research.redteam import attacks
    from hf_specdef.research.redteam.data import build_attack_data
    from hf_specdef.research.redteam.prepare import prepare_model
    from hf_specdef.research.redteam.training import eval_loss, is_main_process, run_attack, world_size
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    data = build_attack_data(byte_tokenizer(), seq_len=16, eval_windows=4)
    a = attacks.SUITE["full-adamw"]
    r = run_attack(prepare_model(model, a, 0), a, data, lr=1e-2, seed=0, budget=30,
                   target=eval_loss(model, data.eval) - 0.3)
    if is_main_process():
        json.dump({"steps": r.steps_to_target, "curve": r.curve, "world": world_size()}, open(sys.argv[2], "w"))
""")


def test_accelerate_launch_ddp_reproduces_single_process_steps(tiny_lm_dir, tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    tests_dir = os.path.dirname(__file__)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    single = tmp_path / "single.json"
    subprocess.run([sys.executable, str(script), str(tiny_lm_dir), str(single), tests_dir], check=True, env=env,
                   capture_output=True, timeout=300)
    ddp = tmp_path / "ddp.json"
    # accelerate 1.15's "--cpu --num_processes 2" needs mpirun (without it: one process); its torchrun launcher
    # ("--multi_gpu") starts 2 processes, and the Trainer (use_cpu where no accelerator) joins them over gloo
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
                           str(tiny_lm_dir), str(ddp), tests_dir], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = json.loads(single.read_text()), json.loads(ddp.read_text())
    assert b["world"] == 2 and a["world"] == 1
    assert a["steps"] is not None and a["steps"] == b["steps"]
    for (sa, la), (sb, lb) in zip(a["curve"], b["curve"], strict=True):
        assert sa == sb and la == pytest.approx(lb, rel=1e-4)


def test_interrupted_redteam_resumes_from_its_journal_without_rerunning_finished_runs(tiny_lm_dir, tmp_path,
                                                                                     monkeypatch):
    from hf_specdef.research.redteam import suite
    from hf_specdef.research.redteam.journal import JournalError, journal_path

    cfg = RedTeamConfig.preset_config("tiny", attacks=("full-adamw",), max_runs=4)
    whole = suite.run_redteam(tiny_lm_dir, tmp_path / "whole", cfg, progress=False)
    assert not journal_path(tmp_path / "whole").exists()  # removed once the results are written
    real, calls = suite.run_attack, []

    def interrupted_after_3(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(kwargs["lr"])
        return real(*args, **kwargs)

    monkeypatch.setattr(suite, "run_attack", interrupted_after_3)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        suite.run_redteam(tiny_lm_dir, out, cfg, progress=False)
    journal = journal_path(out)
    assert not out.exists() and len(journal.read_text().splitlines()) == 1 + 3  # header + the 3 finished runs
    with pytest.raises(JournalError, match="--resume"):
        suite.run_redteam(tiny_lm_dir, out, cfg, progress=False)
    with pytest.raises(JournalError, match="other settings"):
        suite.run_redteam(tiny_lm_dir, out, RedTeamConfig.preset_config("tiny", attacks=("full-adamw",), max_runs=5),
                          progress=False, resume=True)
    monkeypatch.setattr(suite, "run_attack", lambda *a, **k: calls.append(k["lr"]) or real(*a, **k))
    res = suite.run_redteam(tiny_lm_dir, out, cfg, progress=False, resume=True)
    total = len(whole["unprotected"]["full-adamw"]["search"]["runs"]) + \
        len(whole["variants"]["default"]["attacks"]["full-adamw"]["search"]["runs"])
    assert len(calls) == total  # the 3 journalled runs were not trained again
    assert res["summary"]["worst_case_slowdown"] == whole["summary"]["worst_case_slowdown"]
    assert res["unprotected"]["full-adamw"]["best_lr"] == whole["unprotected"]["full-adamw"]["best_lr"]
    assert (out / "results.json").is_file() and not journal.exists()
    assert 0 < res["resumed_train_seconds"] and "resumed from the journal" in (out / "results.md").read_text()
    assert whole["resumed_train_seconds"] == 0.0


def test_report_describes_a_given_checkpoint_without_a_record_and_a_resolved_precision():
    """A protection made elsewhere (no SpecDef record) must not crash the report at the end of an hour's run."""
    from hf_specdef.research.redteam.report import describe_protection

    assert describe_protection({"config": {}, "pairs": None}) == "a given checkpoint without a SpecDef record"
    text = describe_protection({"config": {"alpha": 1000.0, "mode": "spectral"}, "pairs": 270,
                                "precision": {"requested": "auto", "used": "axis", "factors": [1024.0],
                                              "storage_dtype": "bfloat16", "exact_dtypes": ["bfloat16", "float32"]}})
    assert "used axis, alpha 1024" in text and text.endswith("270 pairs")


def test_headline_of_a_bit_exact_protection_without_the_scale_invariant_attack_says_it_would_not_slow():
    from hf_specdef.research.redteam.report import headline

    def results(attacks: tuple[str, ...], dev32: float, dev16: float) -> dict:
        summary = {"variant": "default", "worst_case_slowdown": 9.4, "worst_case_attack": attacks[0],
                   "worst_case_lower_bound": False, "uninformed_attacks": len(attacks), "seeds": 3}
        variant = {"deviation_float32": dev32, "deviation_bfloat16": dev16, "attacks": {a: {} for a in attacks}}
        return {"summary": summary, "variants": {"default": variant}}

    text = headline(results(("full-adamw",), 0.0, 0.0))  # axis mode: every weight rescaled by a power of two
    assert text.startswith("Worst case over 1 uninformed attacks") and "9.40x" in text
    assert "Caveat" in text and "full-madam" in text and "1.00x" in text
    assert "Caveat" not in headline(results(("full-madam", "full-adamw"), 0.0, 0.0))  # measured: its figure stands
    assert "Caveat" not in headline(results(("full-adamw",), 4.8e-5, 0.89))  # spectral mode mixes coordinates


def test_cli_stopped_by_sigterm_keeps_its_journal_and_says_resume(tiny_lm_dir, tmp_path):
    """A scheduler's time limit (SIGTERM) stops the red team like Ctrl-C: finished runs kept, --resume named."""
    import signal
    import subprocess
    import sys
    import time

    from hf_specdef.research.redteam.journal import journal_path

    out = tmp_path / "rt"
    proc = subprocess.Popen([sys.executable, "-m", "hf_specdef", "redteam", str(tiny_lm_dir), "--out", str(out),
                             "--tiny", "--attacks", "full-adamw", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    journal, deadline = journal_path(out), time.monotonic() + 240
    while not journal.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert journal.exists(), "no run finished"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    # the CLI handles SIGTERM for every command: exit 128 + SIGTERM, as a shell reports a terminated command
    assert proc.returncode == 128 + signal.SIGTERM and "--resume" in err and "terminated (SIGTERM)" in err
    assert journal.exists() and len(journal.read_text().splitlines()) >= 2 and not out.exists()


def test_cut_takes_an_earlier_run_only_where_it_is_the_run_asked_for():
    from hf_specdef.research.redteam.reuse import cut
    from hf_specdef.research.redteam.training import Run

    long = Run("full-adamw", 1e-3, 0, 20, [(s, 5.0 - 0.1 * s) for s in range(11)], target=3.5, stopped_at=10)
    short = cut(long, 6)
    assert short.stopped_at == 6 and short.curve[-1] == (6, pytest.approx(4.4)) and not short.reached
    assert cut(long, 12) is None  # it stopped at 10: whether it reaches the target by 12 is unknown
    reached = long.with_target(4.65)  # first at or below 4.65: step 4
    reached.stopped_at = 4
    assert cut(reached, 12) is reached and cut(reached, 3).steps_to_target is None
    diverged = Run("full-adamw", 1.0, 0, 20, [(0, 5.0), (1, 9.0)], diverged=True, stopped_at=1)
    assert cut(diverged, 8) is diverged


def test_reuse_runs_adds_a_seed_and_an_attack_training_only_the_new_runs(tiny_lm_dir, tmp_path, monkeypatch):
    from hf_specdef.research.redteam import suite

    cfg = RedTeamConfig.preset_config("tiny", attacks=("full-adamw",), max_runs=4)
    first = suite.run_redteam(tiny_lm_dir, None, cfg, progress=False)
    real, calls = suite.run_attack, []
    monkeypatch.setattr(suite, "run_attack", lambda *a, **k: calls.append((a[1].name, k["seed"])) or real(*a, **k))
    more = RedTeamConfig.preset_config("tiny", attacks=("full-adamw", "bypass"), seeds=(0, 1), max_runs=4)
    res = suite.run_redteam(tiny_lm_dir, tmp_path / "more", more, reuse_runs=[first],
                            progress=False)
    bypass_runs = len(res["variants"]["default"]["attacks"]["bypass"]["search"]["runs"])
    assert sorted(calls) == sorted([("full-adamw", 1)] * 2 + [("bypass", 0)] * bypass_runs + [("bypass", 1)])
    old, new = first["variants"]["default"]["attacks"]["full-adamw"], res["variants"]["default"]["attacks"]["full-adamw"]
    assert new["best_lr"] == old["best_lr"] and new["steps"][0] == old["steps"][0]
    assert set(new["slowdown"]) == {0, 1} and res["summary"]["seeds"] == 2
    assert res["reused_runs"]["runs_taken"] == len(old["search"]["runs"]) + \
        len(first["unprotected"]["full-adamw"]["search"]["runs"])
    with pytest.raises(RedTeamError, match="differs in"):
        suite.run_redteam(tiny_lm_dir, None, RedTeamConfig.preset_config("tiny", attacks=("full-adamw",),
                                                                        reference_steps=3),
                          reuse_runs=first, progress=False)
