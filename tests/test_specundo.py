"""SpecUndo (docs/integrations.md): blind detection, merge undo, the PEFT tuner, LoRA export, and the attack's speed-up."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_bert, tiny_clip_text, tiny_gpt2, tiny_llama
from peft import LoraConfig, PeftModel, PeftType, get_peft_model

import hf_specdef  # noqa: F401  (registers the tuner)
from hf_specdef import SpecDefConfig, SpecUndoConfig, SpecUndoModel, protect
from hf_specdef.deformation.record import get_record
from hf_specdef.tuners.specundo import export_lora
from hf_specdef.undo.detection import detect_deformations
from hf_specdef.undo.merge import undo_in_place

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert, "clip_text": tiny_clip_text}
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(7))


def out(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        o = model(input_ids=ids)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def protected(name: str = "llama", **cfg_kw):
    model = MODELS[name]()
    original = copy.deepcopy(model)
    report = protect(model, SpecDefConfig(**{"alpha": 1000.0, "record": "full", **cfg_kw}), progress=False)
    return original, model, report


def randomize_adapter(peft_model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


# --------------------------------------------------------------------------------------------
# Blind detection
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("mode,alpha", [("spectral", 100.0), ("axis", 128.0)])
def test_blind_detection_finds_every_site_and_nothing_else(name: str, mode: str, alpha: float) -> None:
    model = MODELS[name]()
    assert detect_deformations(model, progress=False).sites == []  # unprotected: nothing
    report = protect(model, SpecDefConfig(alpha=alpha, mode=mode), progress=False)
    found = detect_deformations(model, progress=False)
    truth = {r.pair.key: r for r in report.results}
    assert set(found.keys) == set(truth), (set(truth) ^ set(found.keys))
    for s in found.sites:
        assert 0.5 * alpha < s.deformation.factor < 2.0 * alpha, (s.pair.key, s.deformation.factor)
        assert s.deformation.k == truth[s.pair.key].deformation.k
        assert s.mode == truth[s.pair.key].mode
    assert "deformed site" in str(found)


def test_blind_estimates_match_the_recipe() -> None:
    _, model, report = protected("llama")
    found = {s.pair.key: s for s in detect_deformations(model, progress=False).sites}
    for r in report.results:
        est = found[r.pair.key].deformation
        if r.deformation.is_axis:
            assert torch.equal(torch.sort(est.indices).values, torch.sort(r.deformation.indices).values)
        else:  # same direction up to sign
            cos = (est.basis.T.double() @ r.deformation.basis.double()).abs()
            assert float(cos.min()) > 0.999


def test_detection_threshold_validated() -> None:
    with pytest.raises(ValueError, match="threshold"):
        detect_deformations(tiny_llama(), threshold=1.0)


# --------------------------------------------------------------------------------------------
# Merge undo
# --------------------------------------------------------------------------------------------

def _sigma(t: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(t.detach().double(), 2)) if t.dim() == 2 else float(t.detach().abs().max())


@pytest.mark.parametrize("knowledge", ["blind", "recipe"])
def test_merge_undo_keeps_function_and_restores_spectra(knowledge: str) -> None:
    original, model, _ = protected("llama")
    ref = out(model)
    before = {n: _sigma(p) for n, p in model.named_parameters()}
    res = undo_in_place(model, knowledge, progress=False)
    assert res.num_sites == 14
    assert rel(out(model), ref) < 1e-3
    orig = dict(original.named_parameters())
    for n, p in model.named_parameters():
        s0, s1 = _sigma(orig[n]), _sigma(p)
        assert s1 < 2.0 * s0, (n, s0, before[n], s1)  # inflated ~1000x before, back to the original scale
        if knowledge == "recipe":
            torch.testing.assert_close(p, orig[n], rtol=1e-4, atol=1e-4)
    assert any(before[n] > 100 * _sigma(orig[n]) for n in before)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_blind_merge_undo_is_bit_exact_in_axis_mode(name: str) -> None:
    """Axis mode with a power-of-two alpha: the blind factor estimate snaps to it and the undo is exact."""
    original, model, _ = protected(name, alpha=1024.0, mode="axis")
    res = undo_in_place(model, "blind", progress=False)
    assert {s.deformation.factor for s in res.sites} == {1024.0}
    for (n, p), q in zip(model.named_parameters(), original.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_recipe_errors() -> None:
    with pytest.raises(ValueError, match="no 'specdef' key"):
        undo_in_place(tiny_llama(), "recipe")
    _, model, _ = protected("llama", record="minimal")
    with pytest.raises(ValueError, match="record='full'"):
        undo_in_place(model, "recipe")
    with pytest.raises(ValueError, match="knowledge"):
        SpecUndoConfig(knowledge="oracle")
    with pytest.raises(ValueError, match="no deformed linear module"):
        get_peft_model(tiny_llama(), SpecUndoConfig())


# --------------------------------------------------------------------------------------------
# The PEFT tuner
# --------------------------------------------------------------------------------------------

def test_registered_with_peft(capsys: pytest.CaptureFixture) -> None:
    assert PeftType("SPECUNDO") is PeftType.SPECUNDO
    _, model, _ = protected("llama")
    ref = out(model)
    pm = get_peft_model(model, SpecUndoConfig(r=4, knowledge="blind"))
    assert isinstance(pm.base_model, SpecUndoModel)
    assert rel(out(pm), ref) < 1e-6  # B = 0: the adapter starts as the identity
    pm.print_trainable_parameters()
    # r=4 x (in+out) per module: 2 layers x (q 128 + k 96 + v 96 + o 128 + gate/up/down 3 x 192) x 4 = 8,192
    assert "trainable params: 8,192 ||" in capsys.readouterr().out
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("specundo_A" in n or "specundo_B" in n for n in trainable)
    assert not any(b.requires_grad for b in pm.buffers())
    assert len(pm.base_model.detection_report["default"].sites) == 14


@pytest.mark.parametrize("knowledge", ["recipe", "blind"])
def test_adapter_is_lora_in_the_original_geometry(knowledge: str) -> None:
    """L̂ B A R̂ on the protected model == B A on the original: same outputs for the same factors."""
    original, model, _ = protected("llama")
    ref = out(model)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    su = get_peft_model(model, SpecUndoConfig(r=4, lora_alpha=8, target_modules=targets, knowledge=knowledge))
    lora = get_peft_model(original, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    randomize_adapter(su, 1)
    src = dict(su.named_parameters())
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if p.requires_grad:
                p.copy_(src[n.replace("lora_", "specundo_")])
    tol = 1e-4 if knowledge == "recipe" else 0.3  # blind: factors are estimates (the geometry is ~ right)
    assert rel(out(su), out(lora)) < tol
    assert rel(out(su), ref) > 1e-2  # the adapter does change the function


def test_overhead_is_linear() -> None:
    _, model, _ = protected("llama")
    pm = get_peft_model(model, SpecUndoConfig(r=16, knowledge="blind"))
    ov = pm.base_model.undo_overhead()
    assert ov["within_bound"] and ov["modules"]
    for name, row in ov["modules"].items():
        assert row["values"] <= row["bound"], (name, row)
    assert ov["total"] == 268  # 14 modules; vs 2 x (7 weights) x k(m+n)


def test_save_load_merge_roundtrip(tmp_path) -> None:
    _, model, _ = protected("llama")
    base_state = copy.deepcopy(model.state_dict())
    pm = get_peft_model(model, SpecUndoConfig(r=4, knowledge="blind"))
    randomize_adapter(pm, 2)
    y = out(pm)
    pm.save_pretrained(tmp_path / "su")
    saved = json.loads((tmp_path / "su" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SPECUNDO" and saved["undo_plan"]
    fresh = tiny_llama()
    fresh.load_state_dict(base_state)
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "su")
    assert isinstance(loaded.base_model, SpecUndoModel)
    torch.testing.assert_close(out(loaded), y, rtol=0, atol=1e-6)
    merged = loaded.merge_and_unload()
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any("specundo" in n for n, _ in merged.named_parameters())
    assert rel(out(merged), y) < 1e-3  # float32 merge into alpha-inflated weights


def test_export_lora_loads_with_stock_peft_without_hf_specdef(tmp_path) -> None:
    _, model, _ = protected("llama")
    model.save_pretrained(tmp_path / "base")
    pm = get_peft_model(model, SpecUndoConfig(r=4, knowledge="blind", target_modules=["q_proj", "v_proj", "o_proj"]))
    randomize_adapter(pm, 3)
    torch.save({"ids": IDS, "y": out(pm)}, tmp_path / "expected.pt")
    export_lora(pm, tmp_path / "lora")
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    script = textwrap.dedent(f"""
        import sys
        sys.modules["hf_specdef"] = None  # hf-specdef is not importable here
        import torch
        from transformers import AutoModelForCausalLM
        from peft import PeftModel
        exp = torch.load({str(tmp_path / "expected.pt")!r})
        base = AutoModelForCausalLM.from_pretrained({str(tmp_path / "base")!r})
        m = PeftModel.from_pretrained(base, {str(tmp_path / "lora")!r}).eval()
        with torch.no_grad():
            y = m(input_ids=exp["ids"]).logits
        err = float((y - exp["y"]).abs().max() / exp["y"].abs().max())
        assert "hf_specdef" not in [k for k, v in sys.modules.items() if v is not None]
        print("REL", err)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    err = float(proc.stdout.split("REL")[-1])
    assert err < 1e-4


def test_undo_merge_mode_through_peft() -> None:
    original, model, _ = protected("llama")
    ref = out(model)
    pm = get_peft_model(model, SpecUndoConfig(r=4, knowledge="recipe", undo="merge"))
    assert pm.peft_config["default"].undo_plan == {}
    assert rel(out(pm), ref) < 1e-3
    v = "model.layers.0.self_attn.v_proj.weight"
    w = dict(pm.get_base_model().named_parameters())[f"{v[:-7]}.base_layer.weight"]
    torch.testing.assert_close(w, dict(original.named_parameters())[v], rtol=1e-4, atol=1e-4)


def test_undo_merge_adapter_reloads_from_a_protected_checkpoint(tmp_path) -> None:
    """undo='merge' re-runs the in-place undo on load, so the saved adapter applies to a fresh protected base."""
    _, model, _ = protected("llama")
    model.save_pretrained(tmp_path / "base")
    pm = get_peft_model(model, SpecUndoConfig(r=4, knowledge="recipe", undo="merge"))
    randomize_adapter(pm, 6)
    y = out(pm)
    pm.save_pretrained(tmp_path / "su")
    from transformers import AutoModelForCausalLM

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "su")
    assert rel(out(loaded), y) < 1e-5


def test_second_adapter_on_a_wrapped_model() -> None:
    _, model, _ = protected("llama")
    pm = get_peft_model(model, SpecUndoConfig(r=4, target_modules=["q_proj", "v_proj"]))
    pm.add_adapter("second", SpecUndoConfig(r=2))
    assert len(pm.base_model.detection_report["second"].sites) == 14
    assert len(pm.peft_config["second"].undo_plan) == 14


def test_gpt2_conv1d_adapter_matches_lora_on_original() -> None:
    original, model, _ = protected("gpt2")
    su = get_peft_model(model, SpecUndoConfig(r=4, knowledge="recipe"))
    targets = sorted(su.peft_config["default"].target_modules)
    assert any(t.endswith("c_attn") for t in targets)
    lora = get_peft_model(original, LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=True))
    su.peft_config["default"].lora_alpha = 8
    for mod in su.modules():
        if hasattr(mod, "scaling") and isinstance(mod.scaling, dict):
            mod.scaling["default"] = 8 / 4
    randomize_adapter(su, 4)
    src = dict(su.named_parameters())
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if p.requires_grad:
                p.copy_(src[n.replace("lora_", "specundo_")])
    assert rel(out(su), out(lora)) < 1e-4


def test_attaches_to_a_diffusers_unet() -> None:
    from test_diffusers import tiny_unet

    unet = tiny_unet()
    original = copy.deepcopy(unet)
    protect(unet, SpecDefConfig(alpha=128.0, mode="axis", record="full"), progress=False)
    assert get_record(unet)["pairs"]
    g = torch.Generator().manual_seed(0)
    inputs = {"sample": torch.randn(1, 4, 8, 8, generator=g), "timestep": torch.tensor([10]),
              "encoder_hidden_states": torch.randn(1, 5, 32, generator=g)}

    def run(m):
        with torch.no_grad():
            return m(**inputs).sample

    ref = run(unet)
    for knowledge in ("recipe", "blind"):
        su = get_peft_model(copy.deepcopy(unet), SpecUndoConfig(r=4, knowledge=knowledge))
        assert rel(run(su), ref) < 1e-5
        assert any(n.endswith("attn2.to_k") for n in su.base_model.targeted_module_names)
    targets = sorted(su.base_model.targeted_module_names)
    lora = get_peft_model(original, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    su = get_peft_model(unet, SpecUndoConfig(r=4, lora_alpha=8, knowledge="recipe"))
    randomize_adapter(su, 5)
    src = dict(su.named_parameters())
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if p.requires_grad:
                p.copy_(src[n.replace("lora_", "specundo_")])
    assert rel(run(su), run(lora)) < 1e-4


# --------------------------------------------------------------------------------------------
# The attack: steps to a target loss (docs/threat-model.md)
# --------------------------------------------------------------------------------------------

VOCAB, SEQ, BATCH = 128, 16, 16


def chain_batch(perm: torch.Tensor, gen: torch.Generator, batch: int = BATCH) -> torch.Tensor:
    """Sequences that follow a fixed permutation of the vocabulary: x[t+1] = perm[x[t]]."""
    cols = [torch.randint(0, VOCAB, (batch, 1), generator=gen)]
    for _ in range(SEQ - 1):
        cols.append(perm[cols[-1]])
    return torch.cat(cols, 1)


def steps_to_target(model: torch.nn.Module, perm: torch.Tensor, lr: float, target: float, budget: int,
                    eval_ids: torch.Tensor, every: int = 2, seed: int = 2) -> int | None:
    """Adam on the model's trainable parameters; first step (checked every ``every``) whose eval loss <= target."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(1, budget + 1):
        ids = chain_batch(perm, gen)
        loss = model(input_ids=ids, labels=ids).loss
        if not torch.isfinite(loss):
            return None
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0:
            with torch.no_grad():
                if model(input_ids=eval_ids, labels=eval_ids).loss.item() <= target:
                    return step
    return None


def best_steps(model0: torch.nn.Module, make_cfg, perm, lrs, target, budget, eval_ids) -> tuple[int | None, dict]:
    res = {}
    for lr in lrs:
        torch.manual_seed(0)
        pm = get_peft_model(copy.deepcopy(model0), make_cfg())
        res[lr] = steps_to_target(pm, perm, lr, target, budget, eval_ids)
    done = [s for s in res.values() if s is not None]
    return (min(done) if done else None), res


def test_specundo_restores_fast_finetuning(record_property) -> None:
    g = torch.Generator().manual_seed(0)
    perm_a = torch.randperm(VOCAB, generator=g)
    perm_b = perm_a.clone()  # the fine-tuning task: a quarter of the transitions changed
    idx = torch.randperm(VOCAB, generator=g)[: VOCAB // 4]
    perm_b[idx] = perm_a[idx[torch.randperm(len(idx), generator=g)]]
    base = tiny_llama(seed=0)
    opt = torch.optim.Adam(base.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(150):  # pretrain on task A
        ids = chain_batch(perm_a, gen)
        loss = base(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    base.eval()
    prot = copy.deepcopy(base)
    protect(prot, SpecDefConfig(alpha=1000.0), progress=False)  # the default config

    eval_ids = chain_batch(perm_b, torch.Generator().manual_seed(99), 32)
    target, lrs = 0.5, [1e-3, 3e-3, 1e-2, 3e-2]
    qkvo = ["q_proj", "k_proj", "v_proj", "o_proj"]
    lora = lambda: LoraConfig(r=16, lora_alpha=16, target_modules=qkvo)  # noqa: E731
    undo = lambda: SpecUndoConfig(r=16, lora_alpha=16, target_modules=qkvo, knowledge="blind")  # noqa: E731

    unprot, unprot_all = best_steps(base, lora, perm_b, lrs, target, 200, eval_ids)
    assert unprot is not None
    budget = 6 * unprot  # >= 5x the unprotected steps
    prot_lora, prot_all = best_steps(prot, lora, perm_b, lrs, target, budget, eval_ids)
    spec, spec_all = best_steps(prot, undo, perm_b, lrs, target, int(1.5 * unprot), eval_ids)
    msg = f"unprotected LoRA {unprot_all}, protected LoRA {prot_all} (budget {budget}), protected SpecUndo {spec_all}"
    print(msg)
    record_property("steps", msg)
    assert prot_lora is None or prot_lora >= 5 * unprot, msg
    assert spec is not None and spec <= 1.5 * unprot, msg
