"""SpecUndo through PEFT's own adapter lifecycle, in the style of PEFT's ``test_custom_models.py`` matrix.

Matrix: tiny protected models {Llama (RoPE/GQA/SwiGLU, nn.Linear), GPT-2 (fused Conv1D)} x knowledge {"recipe"
(protected with ``record="full"``), "blind" (protected with the default minimal record: the attacker has only the
weights)} x lifecycle operations: fresh no-op, training, ``disable_adapter``, ``merge_adapter``/``unmerge_adapter``,
``merge_and_unload`` (plain and ``safe_merge``), ``unload``, several adapters (``add_adapter``/``set_adapter``/
``delete_adapter``), ``save_pretrained``/``PeftModel.from_pretrained``/``load_adapter``, parameter counts and the
export to a plain LoRA that stock PEFT loads with hf-specdef blocked.

Tolerances: a merge adds a float32 update into weights inflated by alpha=1000, so merged outputs match the unmerged
adapter to ~1e-4 relative (measured <= 9e-5); checked at 1e-3. Unmerged or never-merged paths are exact (<= 1e-6).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from hf_specdef import SpecDefConfig, SpecUndoConfig, SpecUndoModel, protect
from hf_specdef.tuners.specundo import SpecUndoLayer, export_lora

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
BASE_CLASS = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}
CASES = [(name, knowledge) for name in MODELS for knowledge in ("recipe", "blind")]
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(7))
R = 4
MERGE_TOL = 1e-3  # float32 merge into alpha-inflated weights (measured <= 9e-5)
EXACT_TOL = 1e-6
# r x sum(in + out) over the deformed linear modules SpecUndo targets by default:
#   llama: 2 layers x (q 128 + k 96 + v 96 + o 128 + gate/up/down 3 x 192) x 4 = 8,192
#   gpt2:  2 layers x (c_attn 64+192 + attn.c_proj 64+64 + c_fc 64+256) x 4 = 5,632 (mlp.c_proj sits after GELU: no pair)
TRAINABLE_R4 = {"llama": 8192, "gpt2": 5632}
NUM_TARGETS = {"llama": 14, "gpt2": 6}

matrix = pytest.mark.parametrize("name,knowledge", CASES, ids=[f"{n}-{k}" for n, k in CASES])


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matmuls: one thread is as fast alone and ~40x faster than two on a busy 2-core machine (OpenMP spin)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def out(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@functools.cache
def _protected(name: str, knowledge: str, layers: int = 2) -> torch.nn.Module:
    model = tiny_llama(layers=layers) if name == "llama" else MODELS[name]()
    record = "full" if knowledge == "recipe" else "minimal"  # blind: nothing but the weights
    protect(model, SpecDefConfig(alpha=1000.0, record=record), progress=False)
    return model


def protected(name: str, knowledge: str, layers: int = 2) -> torch.nn.Module:
    """A fresh copy of the protected tiny model (protection itself runs once per model)."""
    return copy.deepcopy(_protected(name, knowledge, layers))


def cfg(knowledge: str, **kw) -> SpecUndoConfig:
    return SpecUndoConfig(**{"r": R, "lora_alpha": 8, "knowledge": knowledge, **kw})


def wrapped(name: str, knowledge: str, **kw) -> tuple[torch.Tensor, PeftModel]:
    """(protected base outputs, fresh SpecUndo PeftModel on a copy of that base)."""
    base = protected(name, knowledge)
    ref = out(base)
    return ref, get_peft_model(base, cfg(knowledge, **kw))


def train(pm: PeftModel, steps: int = 3, lr: float = 1e-2, seed: int = 0) -> None:
    """A few Adam steps of causal-LM loss on random tokens (enough to move the outputs by O(1))."""
    params = [p for p in pm.parameters() if p.requires_grad]
    assert params
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    pm.train()
    for _ in range(steps):
        ids = torch.randint(0, 128, (4, 12), generator=gen)
        loss = pm(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    pm.eval()


def trained(name: str, knowledge: str) -> tuple[torch.Tensor, PeftModel, torch.Tensor]:
    ref, pm = wrapped(name, knowledge)
    train(pm)
    y = out(pm)
    assert rel(y, ref) > 1e-2  # the adapter does change the function
    return ref, pm, y


def layers(pm: torch.nn.Module) -> dict[str, SpecUndoLayer]:
    return {n: m for n, m in pm.named_modules() if isinstance(m, SpecUndoLayer)}


def base_weights(pm: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.get_base_layer().weight.detach().clone() for n, m in layers(pm).items()}


# --------------------------------------------------------------------------------------------
# Creation and training
# --------------------------------------------------------------------------------------------

@matrix
def test_fresh_adapter_is_a_noop(name: str, knowledge: str) -> None:
    ref, pm = wrapped(name, knowledge)
    assert isinstance(pm.base_model, SpecUndoModel)
    ls = layers(pm)
    assert len(ls) == NUM_TARGETS[name]
    for mod in ls.values():
        assert not mod.specundo_B["default"].weight.any()  # B = 0, as LoRA
        assert mod.specundo_A["default"].weight.abs().sum() > 0
        assert mod.undo_ops["default"]  # every default target carries a frozen M̂
    assert rel(out(pm), ref) < EXACT_TOL


@matrix
def test_training_moves_only_the_adapter(name: str, knowledge: str) -> None:
    ref, pm = wrapped(name, knowledge)
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in pm.named_buffers() if "specundo_" in n}
    assert buffers  # the frozen M̂ (factor / basis / index)
    train(pm)
    for n, p in pm.named_parameters():
        if p.requires_grad:
            assert "specundo_A" in n or "specundo_B" in n, n
            assert not torch.equal(p, before[n]), n  # B moves off zero, A moves
        else:
            assert torch.equal(p, before[n]), n  # the protected base is frozen
    for n, b in pm.named_buffers():
        if n in buffers:
            assert torch.equal(b, buffers[n]), n  # M̂ is frozen
    assert rel(out(pm), ref) > 1e-2


@matrix
def test_disable_adapter_context(name: str, knowledge: str) -> None:
    ref, pm, y = trained(name, knowledge)
    with pm.disable_adapter():
        assert rel(out(pm), ref) < EXACT_TOL
    assert rel(out(pm), y) < EXACT_TOL  # re-enabled


# --------------------------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------------------------

@matrix
def test_merge_adapter_then_unmerge(name: str, knowledge: str) -> None:
    ref, pm, y = trained(name, knowledge)
    w0 = base_weights(pm)
    pm.merge_adapter()
    assert all(m.merged for m in layers(pm).values())
    assert all(not torch.equal(w, w0[n]) for n, w in base_weights(pm).items())  # the update went into the weights
    assert rel(out(pm), y) < MERGE_TOL
    pm.unmerge_adapter()
    assert not any(m.merged for m in layers(pm).values())
    assert rel(out(pm), y) < MERGE_TOL
    for n, w in base_weights(pm).items():
        assert rel(w, w0[n]) < 1e-5, n  # base weights restored (float32 round trip)
    with pm.disable_adapter():
        assert rel(out(pm), ref) < MERGE_TOL


@matrix
def test_disable_adapter_while_merged_unmerges(name: str, knowledge: str) -> None:
    ref, pm, y = trained(name, knowledge)
    pm.merge_adapter()
    with pm.disable_adapter():
        assert rel(out(pm), ref) < MERGE_TOL
    assert rel(out(pm), y) < MERGE_TOL


@matrix
@pytest.mark.parametrize("safe_merge", [False, True], ids=["plain", "safe"])
def test_merge_and_unload(name: str, knowledge: str, safe_merge: bool) -> None:
    _, pm, y = trained(name, knowledge)
    n_base = sum(p.numel() for p in _protected(name, knowledge).parameters())
    merged = pm.merge_and_unload(safe_merge=safe_merge)
    assert type(merged).__name__ == BASE_CLASS[name]
    assert not any(isinstance(m, SpecUndoLayer) for m in merged.modules())
    assert not any("specundo" in k or "base_layer" in k for k in merged.state_dict())
    assert sum(p.numel() for p in merged.parameters()) == n_base
    assert rel(out(merged), y) < MERGE_TOL


@matrix
def test_safe_merge_raises_on_nan(name: str, knowledge: str) -> None:
    """As LoRA: ``safe_merge=True`` refuses a broken adapter and leaves the weights as they were."""
    _, pm, _ = trained(name, knowledge)
    w0 = base_weights(pm)
    with torch.no_grad():
        for mod in layers(pm).values():
            mod.specundo_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        pm.merge_and_unload(safe_merge=True)
    for n, w in base_weights(pm).items():
        assert torch.equal(w, w0[n]), n


@matrix
def test_unload_returns_the_protected_base(name: str, knowledge: str) -> None:
    ref, pm, _ = trained(name, knowledge)
    plain = pm.unload()
    assert type(plain).__name__ == BASE_CLASS[name]
    assert not any(isinstance(m, SpecUndoLayer) for m in plain.modules())
    assert rel(out(plain), ref) < EXACT_TOL


# --------------------------------------------------------------------------------------------
# Several adapters
# --------------------------------------------------------------------------------------------

@matrix
def test_several_adapters(name: str, knowledge: str) -> None:
    ref, pm, y1 = trained(name, knowledge)
    pm.add_adapter("second", cfg(knowledge, r=2))
    assert pm.active_adapters == ["default"]
    assert rel(out(pm), y1) < EXACT_TOL  # adding does not activate
    pm.set_adapter("second")
    assert rel(out(pm), ref) < EXACT_TOL  # the fresh second adapter is a no-op
    first = {n: p.detach().clone() for n, p in pm.named_parameters() if ".default." in n}
    assert not any(p.requires_grad for n, p in pm.named_parameters() if ".default." in n)
    train(pm, seed=1)
    y2 = out(pm)
    assert rel(y2, ref) > 1e-2 and rel(y2, y1) > 1e-2  # outputs differ per adapter
    for n, p in pm.named_parameters():
        if n in first:
            assert torch.equal(p, first[n]), n  # training "second" left "default" alone
    pm.set_adapter("default")
    assert rel(out(pm), y1) < EXACT_TOL
    pm.set_adapter("second")
    assert rel(out(pm), y2) < EXACT_TOL

    with pytest.warns(UserWarning, match="second was active"):  # PEFT falls back to the remaining adapter
        pm.delete_adapter("second")
    assert "second" not in pm.peft_config
    assert pm.active_adapters == ["default"]
    for n, mod in layers(pm).items():
        for attr in mod.adapter_layer_names + mod.other_param_names:
            assert "second" not in getattr(mod, attr), (n, attr)
    assert not any("second" in n for n, _ in pm.named_parameters())
    assert not any("second" in n for n, _ in pm.named_buffers())
    assert rel(out(pm), y1) < EXACT_TOL  # the remaining adapter still works
    pm.merge_adapter()
    assert rel(out(pm), y1) < MERGE_TOL


@matrix
def test_delete_adapter_drops_its_undo_ops(name: str, knowledge: str) -> None:
    _, pm = wrapped(name, knowledge)
    pm.add_adapter("second", cfg(knowledge))
    pm.delete_adapter("second")
    for n, mod in layers(pm).items():
        assert "second" not in mod.undo_ops, n


# --------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------

ADAPTER_SUFFIXES = ("specundo_A.weight", "specundo_B.weight", "specundo_factor", "specundo_basis", "specundo_index")


@matrix
def test_save_load_roundtrip(name: str, knowledge: str, tmp_path) -> None:
    _, pm, y = trained(name, knowledge)
    pm.save_pretrained(tmp_path / "su")
    saved = json.loads((tmp_path / "su" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SPECUNDO" and saved["knowledge"] == knowledge
    assert len(saved["undo_plan"]) == NUM_TARGETS[name]
    tensors = load_file(tmp_path / "su" / "adapter_model.safetensors")
    targets = set(layers(pm))
    expected = {f"base_model.model.{t.removeprefix('base_model.model.')}.{s}" for t in targets for s in ADAPTER_SUFFIXES}
    assert set(tensors) == expected  # adapter tensors only: LoRA factors + the frozen M̂, no base weight
    n_adapter = sum(t.numel() for t in tensors.values())
    assert n_adapter < 0.2 * sum(p.numel() for p in _protected(name, knowledge).parameters())

    loaded = PeftModel.from_pretrained(protected(name, knowledge), tmp_path / "su")
    assert isinstance(loaded.base_model, SpecUndoModel)
    assert loaded.base_model.detection_report["default"] is None  # the saved plan, no re-detection
    assert rel(out(loaded), y) < EXACT_TOL
    assert loaded.get_nb_trainable_parameters()[0] == 0  # inference mode by default

    again = PeftModel.from_pretrained(protected(name, knowledge), tmp_path / "su", is_trainable=True)
    assert again.get_nb_trainable_parameters()[0] == TRAINABLE_R4[name]
    train(again, steps=1, seed=3)  # keeps training from the saved state
    assert rel(out(again), y) > 1e-4

    pm.load_adapter(tmp_path / "su", adapter_name="reloaded")
    pm.set_adapter("reloaded")
    assert rel(out(pm), y) < EXACT_TOL


# --------------------------------------------------------------------------------------------
# Parameter counts
# --------------------------------------------------------------------------------------------

@matrix
def test_trainable_parameter_counts(name: str, knowledge: str, capsys: pytest.CaptureFixture) -> None:
    _, pm = wrapped(name, knowledge)
    trainable, total = pm.get_nb_trainable_parameters()
    assert trainable == TRAINABLE_R4[name] == sum(R * (m.in_features + m.out_features) for m in layers(pm).values())
    assert total - trainable == sum(p.numel() for p in _protected(name, knowledge).parameters())
    pm.print_trainable_parameters()
    assert f"trainable params: {trainable:,} || all params: {total:,} ||" in capsys.readouterr().out
    _, pm8 = wrapped(name, knowledge, r=8)
    assert pm8.get_nb_trainable_parameters()[0] == 2 * trainable  # linear in r


@pytest.mark.parametrize("knowledge", ["recipe", "blind"])
def test_trainable_parameters_linear_in_depth(knowledge: str) -> None:
    counts = [get_peft_model(protected("llama", knowledge, n), cfg(knowledge)).get_nb_trainable_parameters()[0]
              for n in (2, 4)]
    assert counts == [8192, 16384]


# --------------------------------------------------------------------------------------------
# Export to a plain LoRA, loaded by stock PEFT with hf_specdef blocked
# --------------------------------------------------------------------------------------------

STOCK_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.modules["hf_specdef"] = None  # hf-specdef is not importable here
    try:
        import hf_specdef  # noqa: F401
        raise SystemExit("hf_specdef importable")
    except ImportError:
        pass
    import torch
    from peft import LoraConfig, PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM
    res = {}
    for case, d in json.loads(sys.argv[1]).items():
        exp = torch.load(d + "/expected.pt")
        assert isinstance(LoraConfig.from_pretrained(d + "/lora"), LoraConfig)
        base = AutoModelForCausalLM.from_pretrained(d + "/base")
        m = PeftModel.from_pretrained(base, d + "/lora").eval()
        with torch.no_grad():
            y = m(input_ids=exp["ids"]).logits
        n_lora = sum(isinstance(x, LoraLayer) for x in m.modules())
        res[case] = {"rel": float((y - exp["y"]).abs().max() / exp["y"].abs().max()), "lora_layers": n_lora,
                     "peft_type": str(m.peft_config["default"].peft_type.value)}
    assert "hf_specdef" not in [k for k, v in sys.modules.items() if v is not None]
    print("RESULT" + json.dumps(res))
""")


@pytest.fixture(scope="module")
def stock_peft_exports(tmp_path_factory) -> dict[str, dict]:
    """Train and export every case, then load all of them in one fresh interpreter (one start-up cost)."""
    root = tmp_path_factory.mktemp("export")
    dirs, local = {}, {}
    for name, knowledge in CASES:
        case = f"{name}-{knowledge}"
        d = root / case
        protected(name, knowledge).save_pretrained(d / "base")
        _, pm, y = trained(name, knowledge)
        torch.save({"ids": IDS, "y": y}, d / "expected.pt")
        export_lora(pm, d / "lora")
        local[case] = {"config": json.loads((d / "lora" / "adapter_config.json").read_text()),
                       "keys": sorted(load_file(d / "lora" / "adapter_model.safetensors")), "targets": len(layers(pm))}
        dirs[case] = str(d)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", STOCK_SCRIPT, json.dumps(dirs)], capture_output=True, text=True,
                          timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    remote = json.loads(proc.stdout.split("RESULT")[-1])
    return {case: {**local[case], **remote[case]} for case in dirs}


@matrix
def test_export_lora_loads_with_stock_peft(name: str, knowledge: str, stock_peft_exports: dict) -> None:
    res = stock_peft_exports[f"{name}-{knowledge}"]
    assert res["config"]["peft_type"] == "LORA"
    assert res["config"]["fan_in_fan_out"] is (name == "gpt2")
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in res["keys"])
    assert len(res["keys"]) == 2 * res["targets"] == 2 * NUM_TARGETS[name]
    assert res["peft_type"] == "LORA" and res["lora_layers"] == NUM_TARGETS[name]
    assert res["rel"] < 1e-4  # A' = A R̂, B' = L̂ B: the same update, no merge involved
