"""Quantization round trips and the quantization-safe deformation (issue #20)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from hf_specdef import SpecDefConfig, protect
from hf_specdef.analysis.quantized import compare_quantized
from hf_specdef.config import QUANTIZATION_FORMATS
from hf_specdef.quantization import FORMATS, UnsupportedShapeError, fake_quantize, stored_values
from hf_specdef.quantization.formats import max_exact_factor

ALL = tuple(FORMATS)


def llama_256(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny Llama whose widths fit quantization groups: hidden 256 (two 128-groups), head_dim 64, GQA 4/2."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    with torch.no_grad():  # trained norms are not all ones
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.to(dtype).eval()


def test_format_table_matches_config():
    assert tuple(FORMATS) == QUANTIZATION_FORMATS


@pytest.mark.parametrize("fmt", ALL)
def test_round_trip_error_and_group_invariance(fmt):
    torch.manual_seed(0)
    w = torch.randn(8, 256) * 0.05
    q = fake_quantize(w, fmt)
    assert q.shape == w.shape and q.dtype == torch.float32
    bits = FORMATS[fmt].bits
    assert 0 < (q - w).abs().max() <= w.abs().max() * 2.0 ** (1 - bits) * 1.01
    block = FORMATS[fmt].block
    for f in (1024.0, 1 / 8):  # a whole aligned group scaled by a power of two (scales stay normal float16)
        s = w.clone()
        s[:, block: 2 * block] *= f
        expected = q.clone()
        expected[:, block: 2 * block] *= f
        assert torch.equal(fake_quantize(s, fmt), expected)
    s = w.clone()  # one column of a group: the others round differently
    s[:, 3] *= 1024
    assert not torch.equal(fake_quantize(s, fmt)[:, :3], q[:, :3])


def test_gguf_matches_the_reference_quantizer_and_axes():
    import gguf

    torch.manual_seed(1)
    w = torch.randn(4, 64)
    ref = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q4_0),
                                 gguf.GGMLQuantizationType.Q4_0)
    assert torch.equal(fake_quantize(w, "q4_0"), torch.from_numpy(ref))
    assert torch.equal(fake_quantize(w.T.contiguous(), "q4_0", in_axis=0), torch.from_numpy(ref).T)  # Conv1D layout


def test_shapes_that_do_not_fit():
    with pytest.raises(UnsupportedShapeError, match="not a multiple of the q8_0 block"):
        fake_quantize(torch.randn(2, 48), "q8_0")
    w = torch.randn(3, 192)  # int-g128: a trailing group of 64
    assert stored_values(w, "int4-g128").shape == (3, 2, 1)
    s = w.clone()
    s[:, 128:] *= 8
    expected = fake_quantize(w, "int4-g128")
    expected[:, 128:] *= 8
    assert torch.equal(fake_quantize(s, "int4-g128"), expected)


def test_float16_scale_range_bounds_the_factor():
    w = torch.full((1, 32), 0.01)
    d = stored_values(w, "q8_0")  # 0.01 / 127 ~ 7.9e-5, just above float16's smallest normal
    assert max_exact_factor(d, grow=False) == 1.0 and max_exact_factor(d, grow=True) >= 256
    small = w / 4  # its scale is subnormal: no scaling is exact, and dividing it breaks the round trip
    assert max_exact_factor(stored_values(small, "q8_0"), grow=True) == 1.0
    assert not torch.equal(fake_quantize(w / 1024, "q8_0"), fake_quantize(w, "q8_0") / 1024)


def test_config_field():
    cfg = SpecDefConfig(alpha=1024.0, quantization_safe="q4_0")
    assert cfg.quantization_safe == ("q4_0",)
    assert SpecDefConfig.from_json_string(cfg.to_json_string()) == cfg
    assert json.loads(cfg.to_json_string())["quantization_safe"] == ["q4_0"]
    assert SpecDefConfig(alpha=1024.0, quantization_safe="all").quantization_safe == QUANTIZATION_FORMATS
    assert "quantization_safe" not in SpecDefConfig().to_dict()  # records of other protections unchanged
    with pytest.raises(ValueError, match="quantization_safe"):
        SpecDefConfig(alpha=1024.0, quantization_safe=("q3_k",))
    with pytest.raises(ValueError, match="alpha.*power-of-two"):
        SpecDefConfig(alpha=1000.0, quantization_safe=("q8_0",))


@pytest.fixture(scope="module")
def safe_pair():
    """(original, quantization-safe protected copy, report) for every format."""
    original = llama_256()
    model = copy.deepcopy(original)
    report = protect(model, SpecDefConfig(alpha=1024.0, mode="axis", record="full", quantization_safe="all"),
                     progress=False)
    return original, model, report


def test_quantization_safe_protection_survives_every_format(safe_pair):
    original, model, report = safe_pair
    assert report.deviation == 0.0
    assert report.quantization == {f: 0.0 for f in QUANTIZATION_FORMATS}
    rec = model.config.specdef
    assert rec["quantization"]["safe_formats"] == list(QUANTIZATION_FORMATS)
    assert rec["config"]["quantization_safe"] == list(QUANTIZATION_FORMATS)
    for fmt in ("q8_0", "q4_1", "int4-g128"):
        q = compare_quantized(original, model, fmt, tolerance=1e-6)
        assert q.ok and q.deviation == 0.0 and q.protected_error == q.quantization_error > 0
    norms = [r for r in report.results if r.pair.site == "norm"]
    assert norms and all(r.deformation.factor == 1 / 1024 and r.deformation.k == 128 for r in norms)
    assert all(r.sigma_after > 100 * r.sigma_before for r in norms)  # the readers' columns grew
    # head_dim 64 holds no whole 128-group: attn.vo is skipped with the reason, never deformed
    assert not any(r.pair.site == "attn.vo" for r in report.results)
    assert any("attn.vo" in s and "no whole" in s for s in report.skipped)


def test_default_protection_breaks_under_quantization():
    original = llama_256()
    model = copy.deepcopy(original)
    protect(model, SpecDefConfig(alpha=1024.0, mode="axis"), progress=False)
    q = compare_quantized(original, model, "q8_0", tolerance=1e-3)
    assert not q.ok and q.deviation > 0.05


def test_bf16_release_is_exact_in_float_and_quantized():
    original = llama_256(dtype=torch.bfloat16)
    model = copy.deepcopy(original)
    report = protect(model, SpecDefConfig(alpha=1024.0, mode="axis", quantization_safe=("q4_0",)), progress=False)
    assert report.deviation == 0.0 and report.quantization == {"q4_0": 0.0}
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        assert torch.equal(original(ids).logits, model(ids).logits)  # bit-exact bf16 path


def test_recipe_and_blind_undo(safe_pair):
    from hf_specdef.undo.detection import detect_deformations
    from hf_specdef.undo.merge import recipe_sites, undo_in_place

    original, model, _ = safe_pair
    restored = copy.deepcopy(model)
    undo_in_place(restored, knowledge="recipe")
    assert all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), restored.state_dict().values(),
                                                 strict=True))
    assert len(recipe_sites(model.config.specdef)) == len(model.config.specdef["pairs"])
    only_norm = copy.deepcopy(original)
    protect(only_norm, SpecDefConfig(alpha=1024.0, sites=("norm",), quantization_safe="q8_0"), progress=False)
    found = detect_deformations(only_norm, progress=False)
    assert {s.pair.key for s in found.sites} == {k for k in (p.key for p in _norm_pairs(only_norm))}
    assert all(s.deformation.factor == 1 / 1024 and s.deformation.k % 32 == 0 for s in found.sites)
    undo_in_place(only_norm, knowledge="blind")
    assert all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), only_norm.state_dict().values(),
                                                 strict=True))


def _norm_pairs(model):
    from hf_specdef.undo.detection import candidate_pairs

    return [p for p in candidate_pairs(model) if p.site == "norm"]


def test_verify_cli_quantize(tmp_path, capsys):
    from hf_specdef.cli import main

    original = llama_256()
    original.save_pretrained(tmp_path / "orig")
    safe = copy.deepcopy(original)
    protect(safe, SpecDefConfig(alpha=1024.0, quantization_safe=("q8_0", "int4-g128")), progress=False)
    safe.save_pretrained(tmp_path / "safe")
    plain = copy.deepcopy(original)
    protect(plain, SpecDefConfig(alpha=1024.0, mode="axis"), progress=False)
    plain.save_pretrained(tmp_path / "plain")
    assert main(["verify", str(tmp_path / "orig"), str(tmp_path / "safe"), "--quantize", "q8_0,int4-g128"]) == 0
    assert "q8_0       OK" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "orig"), str(tmp_path / "plain"), "--quantize", "q8_0", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and not out["all_ok"] and out["quantized"][0]["deviation"] > 0.05
    assert main(["verify", str(tmp_path / "orig"), str(tmp_path / "safe"), "--quantize", "q2_k"]) == 1
    assert "--quantize 'q2_k'" in capsys.readouterr().err


def test_streaming_refuses_with_the_supported_paths(tmp_path):
    from hf_specdef import protect_checkpoint

    llama_256().save_pretrained(tmp_path / "src")
    with pytest.raises(ValueError, match="in-memory protection"):
        protect_checkpoint(tmp_path / "src", tmp_path / "dst", SpecDefConfig(alpha=1024.0, quantization_safe="q8_0"))
    assert not (tmp_path / "dst").exists()


def test_save_protected_writes_a_quantization_safe_release(tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_specdef import save_protected

    original = llama_256()
    before = copy.deepcopy(original.state_dict())
    report = save_protected(original, tmp_path / "out", SpecDefConfig(alpha=1024.0, quantization_safe="q5_0"),
                            progress=False)
    assert report.quantization == {"q5_0": 0.0}
    assert all(torch.equal(a, before[k]) for k, a in original.state_dict().items())  # in memory: unchanged
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert compare_quantized(original, loaded, "q5_0", tolerance=0.0).deviation == 0.0


def test_publish_card_states_the_quantizations(tmp_path):
    from hf_specdef.publishing.publish import publish

    src = tmp_path / "src"
    llama_256().save_pretrained(src)
    res = publish(src, "me/q", SpecDefConfig(alpha=1024.0, quantization_safe=("q4_0",)), dry_run=True,
                  output_dir=tmp_path / "out", progress=False, quantize=("q8_0",))
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Quantization" in card and "| q4_0 (promised) | 0.00e+00 |" in card and "keeps the model intact" in card
    assert res.max_relative_deviation == 0.0
    plain = publish(src, "me/p", SpecDefConfig(alpha=1024.0, mode="axis"), dry_run=True, output_dir=tmp_path / "p",
                    progress=False, quantize=("q8_0",))
    assert plain.max_relative_deviation == 0.0
    assert "**breaks it**" in (tmp_path / "p" / "README.md").read_text()
