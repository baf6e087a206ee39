"""In-memory protect / verify / inspect on tiny models of every registered architecture."""

import copy
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_MODELS, tiny_llama

from hf_specdef import (
    AlreadyProtectedError,
    NoSitesError,
    PrecisionBudgetError,
    SpecDefConfig,
    VerificationError,
    inspect_model,
    protect,
    verify,
)
from hf_specdef.analysis import probe as probe_mod
from hf_specdef.deformation import engine
from hf_specdef.protection.in_memory import ParamTensors


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_default_protect_keeps_function_and_inflates(name):
    model = TINY_MODELS[name]()
    reference = copy.deepcopy(model)
    report = protect(model, SpecDefConfig(alpha=1000.0), progress=False)
    assert report.deviation <= 1e-4
    assert verify(reference, model).max_relative_deviation <= 1e-4
    assert any(r.mode == "spectral" for r in report.results), "default config deforms attention spectrally"
    for r in report.results:
        assert r.sigma_after > 10 * r.sigma_before
    assert model.config.specdef["num_pairs"] == len(report.results)


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_sigma_of_producer_blocks_measured_on_the_weights(name):
    """sigma_1 of every deformed producer block, recomputed from the weights, is alpha times the original."""
    model = TINY_MODELS[name]()
    before = _snapshot(model)
    report = protect(model, SpecDefConfig(alpha=1000.0, sites=("attn.vo", "attn.qk")), progress=False)
    after = ParamTensors(model)
    for r in report.results:
        s0 = torch.linalg.matrix_norm(engine.producer_block(r.pair, before).double(), ord=2)
        s1 = torch.linalg.matrix_norm(engine.producer_block(r.pair, after).double(), ord=2)
        if r.mode == "spectral":  # exact top-k inflation (within 1%)
            assert float(s1 / s0) == pytest.approx(1000.0, rel=0.01)
        else:  # rotary axis pairs: the scaled rows dominate
            assert float(s1 / s0) > 100
    # the consumer (hot) side of every attention pair is the output projection / key
    assert any(m.endswith(("o_proj", "out_proj", "c_proj", "output.dense")) for m in report.hot_modules)


def test_llama_every_projection_is_hot():
    model = tiny_llama()
    report = protect(model, SpecDefConfig(), progress=False)
    hot = {m.rsplit(".", 1)[-1] for m in report.hot_modules}
    assert hot == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_rope_qk_is_rotary_axis_only():
    model = tiny_llama()
    ref = copy.deepcopy(model)
    report = protect(model, SpecDefConfig(sites=("attn.qk",), mode="spectral"), progress=False)
    d = model.config.hidden_size // model.config.num_attention_heads
    for r in report.results:
        assert r.pair.rotary and r.mode == "axis"
        idx = sorted(r.deformation.indices.tolist())
        assert idx[len(idx) // 2:] == [i + d // 2 for i in idx[: len(idx) // 2]]
    assert verify(ref, model).max_relative_deviation <= 1e-5


def test_dense_map_on_rope_would_break_the_function():
    """Why the registry forbids it: a spectral M on RoPE q/k changes the outputs a lot."""
    from hf_specdef.sites import pairs_for

    model = tiny_llama()
    ref = copy.deepcopy(model)
    tensors = ParamTensors(model)
    qk = [p for p in pairs_for(model.config, tensors.shapes(), SpecDefConfig()) if p.site == "attn.qk"]
    with torch.no_grad():
        for p in qk:
            engine.apply_pair(p, tensors, engine.linalg.spectral_deformation(engine.producer_block(p, tensors), 1, 1000.0))
    assert verify(ref, model).max_relative_deviation > 1e-2


def test_bf16_spectral_is_refused_with_the_options():
    model = tiny_llama().to(torch.bfloat16)
    before = _snapshot(model)
    with pytest.raises(PrecisionBudgetError) as e:
        protect(model, SpecDefConfig(alpha=1000.0, precision="refuse"), progress=False)
    msg = str(e.value)
    assert "bfloat16" in msg and "precision='float32'" in msg and "mode='axis'" in msg and "precision='auto'" in msg
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert getattr(model.config, "specdef", None) is None


def test_bf16_axis_power_of_two_is_bit_identical():
    model = tiny_llama().to(torch.bfloat16)
    inputs = probe_mod.probe_inputs(model)
    ref = probe_mod.run_probe(model, inputs)
    report = protect(model, SpecDefConfig(alpha=1024.0, mode="axis"), progress=False)
    assert report.deviation == 0.0
    assert torch.equal(probe_mod.run_probe(model, inputs), ref)
    assert all(r.sigma_after > 100 * r.sigma_before for r in report.results)


def test_bf16_opt_in_policies():
    for precision in ("axis", "float32"):
        model = tiny_llama().to(torch.bfloat16)
        report = protect(model, SpecDefConfig(alpha=1000.0, precision=precision), progress=False)
        assert report.deviation <= 1e-4 and report.notes


def test_failed_verification_restores_exactly(monkeypatch):
    model = tiny_llama()
    before = _snapshot(model)
    monkeypatch.setattr(probe_mod, "max_relative_deviation", lambda ref, out: 0.5)  # as if the model broke
    with pytest.raises(VerificationError, match="every change was restored"):
        protect(model, SpecDefConfig(alpha=1000.0), progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert getattr(model.config, "specdef", None) is None


def test_double_protection_refused():
    model = tiny_llama()
    protect(model, SpecDefConfig(), progress=False)
    with pytest.raises(AlreadyProtectedError, match="force=True"):
        protect(model, SpecDefConfig(), progress=False)
    # force: a second (exact, power-of-two axis) protection on top is allowed
    protect(model, SpecDefConfig(alpha=16.0, mode="axis", sites=("mlp",)), progress=False, force=True)


class Mystery(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.config = SimpleNamespace(model_type="mystery")
        self.up, self.down = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.down(self.up(x))


def test_unknown_architecture_names_the_site_map():
    with pytest.raises(NoSitesError, match="site_map"):
        protect(Mystery(), SpecDefConfig(), verify=False, progress=False)


def test_explicit_site_map():
    model, x = Mystery(), torch.randn(3, 8)
    ref = model(x)
    site_map = [{"site": "attn.vo", "producers": [{"name": "up.weight", "axis": 0, "start": 0, "stop": 16},
                                                  {"name": "up.bias", "axis": 0, "start": 0, "stop": 16}],
                 "consumers": [{"name": "down.weight", "axis": 1, "start": 0, "stop": 16}]}]
    report = protect(model, SpecDefConfig(site_map=site_map), inputs={"x": x}, progress=False)
    assert len(report.results) == 1 and report.deviation <= 1e-4
    assert probe_mod.max_relative_deviation(ref.detach(), model(x).detach()) <= 1e-4
    assert model.up.weight.abs().max() > 100 * model.down.weight.abs().max()


def test_sites_that_match_nothing():
    with pytest.raises(NoSitesError, match="matches no pair"):
        protect(TINY_MODELS["bert"](), SpecDefConfig(sites=("mlp",)), progress=False)


def test_layer_selection():
    model = tiny_llama(layers=4)
    report = protect(model, SpecDefConfig(layers=[1, 3]), progress=False)
    assert {r.pair.layer for r in report.results} == {1, 3}
    a = protect(tiny_llama(layers=4), SpecDefConfig(layers="random:2", seed=5), progress=False)
    b = protect(tiny_llama(layers=4), SpecDefConfig(layers="random:2", seed=5), progress=False)
    assert {r.pair.layer for r in a.results} == {r.pair.layer for r in b.results} and len({r.pair.layer for r in a.results}) == 2


def test_tied_weights_are_not_deformed_through_the_tie():
    model = TINY_MODELS["gpt2"]()
    assert model.lm_head.weight is model.transformer.wte.weight
    n = model.config.n_embd
    site_map = [{"site": "attn.vo", "producers": [{"name": "transformer.wte.weight", "axis": 1, "start": 0, "stop": n}],
                 "consumers": [{"name": "transformer.h.0.attn.c_attn.weight", "axis": 0, "start": 0, "stop": n}]}]
    with pytest.raises(NoSitesError):
        protect(model, SpecDefConfig(site_map=site_map), progress=False)


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_inspect_flags_exactly_the_deformed_matrices(name):
    model = TINY_MODELS[name]()
    assert inspect_model(model).deformed == []
    before = _snapshot(model)
    protect(model, SpecDefConfig(alpha=1000.0), progress=False)
    changed = sorted(n for n, p in model.named_parameters() if p.dim() == 2 and not torch.equal(p, before[n]))
    report = inspect_model(model)
    assert report.deformed == changed
    assert 0 < report.hot_coverage <= report.coverage < 1
    assert "coverage" in str(report) and report.to_dict()["deformed"] == changed


def test_inspect_flags_axis_mode():
    model = tiny_llama()
    before = _snapshot(model)
    protect(model, SpecDefConfig(alpha=128.0, mode="axis"), progress=False)
    changed = sorted(n for n, p in model.named_parameters() if p.dim() == 2 and not torch.equal(p, before[n]))
    assert inspect_model(model).deformed == changed
