"""Batched deformation engine (issue 18): the same result as the pair-by-pair engine, in fewer, larger operations."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_MODELS, tiny_llama

from hf_specdef import SpecDefConfig
from hf_specdef.deformation import batched, engine
from hf_specdef.protection.in_memory import Backup, ParamTensors, model_pairs

CONFIGS = {
    "default": SpecDefConfig(alpha=1000.0),
    "axis-k2": SpecDefConfig(alpha=1024.0, mode="axis", top_k=2),
    "spectral-k3": SpecDefConfig(alpha=100.0, sites=("attn.vo", "attn.qk"), top_k=3),
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


MODELS = {**TINY_MODELS, "wide_llama": wide_llama}


@pytest.mark.parametrize("cfg_name", sorted(CONFIGS))
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_same_result_as_the_pair_by_pair_engine(model_name, cfg_name):
    cfg = CONFIGS[cfg_name]
    original = MODELS[model_name]()
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
    for a, b in zip(expected, got, strict=True):
        assert a.pair == b.pair and a.mode == b.mode and a.deformation.factor == b.deformation.factor
        if a.deformation.is_axis:
            assert torch.equal(a.deformation.indices.cpu(), b.deformation.indices.cpu())
        else:
            torch.testing.assert_close(a.deformation.dense(), b.deformation.dense(), rtol=0, atol=1e-9)
        assert b.sigma_before == pytest.approx(a.sigma_before, rel=1e-5)
        assert b.sigma_after == pytest.approx(a.sigma_after, rel=1e-5)
    for name in t1:  # every tensor equal to float rounding (several steps rounded once instead of one by one)
        torch.testing.assert_close(t2[name], t1[name], rtol=2e-6, atol=1e-7, msg=name)
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
