"""The red team's own optimizers: Madam (multiplicative Adam) ignores every exact, bit-exact SpecDef deformation."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_llama

from hf_specdef import SpecDefConfig, protect
from hf_specdef.research.redteam.optimizers import MultiplicativeAdam


def test_madam_update_of_a_rescaled_weight_is_the_rescaled_update():
    torch.manual_seed(0)
    w, g = torch.randn(8, 4), torch.randn(8, 4)
    s = torch.tensor([2.0 ** 20, 2.0 ** -12, 1.0, 2.0 ** 5])[None, :]  # per column, as axis mode scales a consumer
    a, b = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w * s)
    opt_a, opt_b = MultiplicativeAdam([a], lr=0.05), MultiplicativeAdam([b], lr=0.05)
    for step in range(3):
        a.grad, b.grad = g * (step + 1), g * (step + 1) / s  # the chain rule: w' = s w has gradient g / s
        opt_a.step()
        opt_b.step()
    assert torch.equal(b.detach(), a.detach() * s)  # powers of two: bit-exact
    assert not torch.equal(a.detach(), w)


def _train(model: torch.nn.Module, make_opt, batches: list[torch.Tensor]) -> list[float]:
    model.train()
    opt, losses = make_opt(model.parameters()), []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses


def _wide_llama() -> torch.nn.Module:  # whole quantization groups per channel block, as quantization_safe needs
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


@pytest.mark.parametrize("config, build", [
    (dict(alpha=1024.0, mode="axis", top_k=2), tiny_llama),  # the bf16-exact default's kind
    (dict(alpha=65536.0, mode="axis"), tiny_llama),
    (dict(alpha=1024.0, mode="axis", quantization_safe="all"), _wide_llama),
], ids=["axis-1024", "axis-65536", "quant-safe"])
def test_madam_fine_tunes_a_bit_exact_protection_exactly_as_the_original_and_adamw_does_not(config, build):
    original = build()
    protected = copy.deepcopy(original)
    report = protect(protected, SpecDefConfig(**config), progress=False)
    assert len(report.results) > 0
    batches = [torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))] * 6  # memorise one batch

    def madam(params):
        return MultiplicativeAdam(params, lr=0.1)

    def adamw(params):
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)

    ref, got = _train(copy.deepcopy(original), madam, batches), _train(copy.deepcopy(protected), madam, batches)
    assert ref[-1] < ref[0] - 0.5  # it does fine-tune
    assert got == pytest.approx(ref, rel=1e-6, abs=1e-6)  # and the protection changes nothing
    ref, got = _train(copy.deepcopy(original), adamw, batches), _train(copy.deepcopy(protected), adamw, batches)
    assert max(abs(x - y) for x, y in zip(ref[1:], got[1:], strict=True)) > 0.05  # AdamW's absolute steps do see the deformation


def test_madam_refuses_what_would_break_its_invariance():
    p = [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError, match="weight_decay=0.01"):
        MultiplicativeAdam(p, weight_decay=0.01)
    with pytest.raises(ValueError, match="lr=0"):
        MultiplicativeAdam(p, lr=0)
