"""Batched deformation engine: the same result as the pair-by-pair engine, in fewer, larger operations.

One deformation engine: the pair-by-pair, the batched and the streaming paths run the same variants
(:mod:`hf_specdef.deformation.variants`) and the same step kernels, so their tensors agree bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_MODELS, tiny_llama
from tiny_archs import tiny_mixtral

from hf_specdef import SpecDefConfig
from hf_specdef.deformation import batched, engine
from hf_specdef.protection.in_memory import Backup, ParamTensors, model_pairs

CONFIGS = {
    "default": SpecDefConfig(alpha=1000.0),
    "axis-k2": SpecDefConfig(alpha=1024.0, mode="axis", top_k=2),
    "spectral-k3": SpecDefConfig(alpha=100.0, sites=("attn.vo", "attn.qk"), top_k=3),
    "bf16-default": SpecDefConfig(),  # the model in bfloat16: precision="auto" gives bit-exact axis mode
}


def plans_of(model: torch.nn.Module, cfg: SpecDefConfig) -> tuple[ParamTensors, list[engine.Plan]]:
    tensors = ParamTensors(model)
    pairs, _ = model_pairs(model, cfg, tensors)
    return tensors, engine.plan_pairs(pairs, tensors, cfg)


def wide_llama():  # blocks wider than 256 on both sides: the power-iteration path of axis pairs (mlp)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=288, intermediate_size=576, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()


MODELS = {**TINY_MODELS, "wide_llama": wide_llama, "mixtral": tiny_mixtral}


@pytest.mark.parametrize("cfg_name", sorted(CONFIGS))
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_same_result_as_the_pair_by_pair_engine(model_name, cfg_name):
    cfg = CONFIGS[cfg_name]
    original = MODELS[model_name]()
    if cfg_name == "bf16-default":
        original = original.to(torch.bfloat16)
    one, many = copy.deepcopy(original), copy.deepcopy(original)
    t1, plans1 = plans_of(one, cfg)
    t2, plans2 = plans_of(many, cfg)
    with torch.no_grad():
        expected = engine.deform(plans1, t1, cfg)
        backup = Backup()
        got = batched.deform(plans2, t2, cfg, save=backup.add)
    assert len(batched.waves(plans2)) <= max(3, len(plans2) / 4)  # really batched: a few waves, not one per pair
    kinds = {(batched._kind(p, engine.producer_block(p.pair, t2), cfg) or ("alone",))[0] for p in plans2}
    if model_name == "wide_llama" and cfg_name != "spectral-k3":
        assert "axis-large" in kinds  # the batched power iterations were used
    assert len(expected) == len(got)
    for a, b in zip(expected, got, strict=True):  # the same decisions, bit for bit
        assert a.pair == b.pair and a.mode == b.mode and a.deformation.factor == b.deformation.factor
        if a.deformation.is_axis:
            assert torch.equal(a.deformation.indices.cpu(), b.deformation.indices.cpu())
        else:
            assert torch.equal(a.deformation.basis, b.deformation.basis)
        assert (b.sigma_before, b.sigma_after) == (a.sigma_before, a.sigma_after)
    for name in t1:  # every tensor bit-identical (one engine: the same math alone and in a batch)
        assert torch.equal(t2[name], t1[name]), name
    changed = [n for n in t1 if not torch.equal(t1[n], dict(original.named_parameters())[n])]
    assert changed
    backup.restore(t2)  # the backup restores the original exactly
    for name, p in original.named_parameters():
        assert torch.equal(t2[name], p.data), name


def test_waves_respect_reads_after_writes():
    cfg = SpecDefConfig(alpha=1000.0)
    _, plans = plans_of(tiny_llama(layers=3), cfg)
    index = {id(p): i for i, p in enumerate(plans)}
    wave_of = {i: w for w, members in enumerate(batched.waves(plans)) for i in members}
    assert sorted(wave_of) == list(range(len(plans)))
    for y in plans:
        for x in plans[:index[id(y)]]:
            writes = x.pair.producers + x.pair.consumers
            if any(batched._overlap(w, r) for w in writes for r in y.pair.producers):
                assert wave_of[index[id(x)]] < wave_of[index[id(y)]]
            elif any(batched._overlap(w, o) for w in y.pair.producers + y.pair.consumers
                     for o in writes + x.pair.producers):
                assert wave_of[index[id(x)]] <= wave_of[index[id(y)]]


def _ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference of two float tensors in units in the last place of ``a``."""
    a64, b64 = a.double(), b.double()
    spacing = (torch.nextafter(a.abs(), torch.full_like(a, float("inf"))).double() - a.abs().double())
    return float(((a64 - b64).abs() / spacing).max()) if a.numel() else 0.0


STREAM_CASES = {  # (model, dtype, config, largest difference in ulps)
    "llama-bf16-axis": (tiny_llama, torch.bfloat16, SpecDefConfig(), 0),
    "gpt2-bf16-axis": (lambda: TINY_MODELS["gpt2"](), torch.bfloat16, SpecDefConfig(), 0),
    "llama-spectral": (tiny_llama, torch.float32, SpecDefConfig(alpha=100.0, sites=("attn.vo", "attn.qk"), top_k=3), 1),
    "gpt2-spectral": (lambda: TINY_MODELS["gpt2"](), torch.float32, SpecDefConfig(alpha=1000.0), 1),
}


@pytest.mark.parametrize("case", sorted(STREAM_CASES))
def test_streaming_equals_in_memory_bit_for_bit(case, tmp_path):
    """Streaming records the variant's steps and applies them chunk by chunk with the in-memory kernels: the axis-mode
    (bfloat16) default agrees bit for bit, spectral mode to at most 1 ulp."""
    from safetensors.torch import load_file

    from hf_specdef import protect
    from hf_specdef.protection.streaming import protect_checkpoint

    build, dtype, cfg, max_ulps = STREAM_CASES[case]
    model = build().to(dtype)
    model.save_pretrained(tmp_path / "src", safe_serialization=True)
    streamed_report = protect_checkpoint(tmp_path / "src", tmp_path / "dst", cfg, progress=False)
    report = protect(model, cfg, progress=False)
    assert [r.pair.key for r in report.results] == [r.pair.key for r in streamed_report.results]
    streamed = {}
    for f in sorted((tmp_path / "dst").glob("*.safetensors")):
        streamed.update(load_file(str(f)))
    params = dict(model.named_parameters())
    worst, compared = 0.0, 0
    for name, t in streamed.items():
        p, compared = params[name].data, compared + 1
        if max_ulps == 0:
            assert torch.equal(t, p), name
        else:
            worst = max(worst, _ulps(p, t))
    assert worst <= max_ulps
    assert compared == len(params)
