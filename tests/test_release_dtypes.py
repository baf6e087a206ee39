"""Release-safe protection (docs/precision.md): ``precision="auto"`` per storage dtype, the downcast guard, ``verify --dtype``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file

from hf_specdef import PrecisionBudgetError, SpecDefConfig, protect, protect_checkpoint
from hf_specdef.analysis import probe
from hf_specdef.analysis.downcast import DowncastError
from hf_specdef.tensor_math.exact_scaling import exact_division_log2, in_range_log2


def coarse_fp16_llama(seed: int = 0) -> torch.nn.Module:
    """A tiny Llama in float16 whose weights have 8 significant bits (as a bfloat16 release converted to float16) and
    magnitudes >= 2^-6: the per-pair float16-exact factors reach 2^10. (Random float16 weights do not allow that.)"""
    model = tiny_llama(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.where(p.abs() < 2**-6, torch.where(p < 0, -(2**-6), 2**-6), p))
    return model.to(torch.bfloat16).half()


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _run_auto(model: torch.nn.Module):
    inputs = probe.probe_inputs(model)
    ref = probe.run_probe(model, inputs)
    report = protect(model, SpecDefConfig(), progress=False)
    return report, ref, probe.run_probe(model, inputs)


# ------------------------------------------------------------------------------------------------ auto per dtype


def test_auto_is_the_default_float32_spectral_is_float32_only():
    assert SpecDefConfig().precision == "auto"
    report, ref, out = _run_auto(tiny_llama())
    info = report.precision
    assert {r.mode for r in report.results} == {"spectral", "axis"}
    assert info["requested"] == "auto" and info["used"] == "spectral" and info["exact_dtypes"] == ["float32"]
    assert info["float32_only"] and info["expected"]["bfloat16"] > 1  # alpha x unit roundoff
    assert probe.max_relative_deviation(ref, out) <= 1e-3
    assert "requested auto -> used spectral" in str(report) and "FLOAT32-ONLY" in str(report)


def test_auto_bfloat16_is_power_of_two_axis_and_bit_exact():
    model = tiny_llama().to(torch.bfloat16)
    report, ref, out = _run_auto(model)
    assert torch.equal(ref, out) and report.deviation == 0.0
    assert {(r.mode, r.deformation.factor) for r in report.results} == {("axis", 1024.0)}
    assert all(r.sigma_after > 100 * r.sigma_before for r in report.results)
    rec = model.config.specdef["precision"]
    assert rec["requested"] == "auto" and rec["used"] == "axis" and rec["exact_dtypes"] == ["float32", "bfloat16"]
    assert not rec["float32_only"] and "requested auto -> used axis, alpha 1024" in str(report)


def test_auto_float16_exact_factors_or_a_clear_refusal():
    model = coarse_fp16_llama()
    report, ref, out = _run_auto(model)
    assert torch.equal(ref, out)  # exact weights and no shrunk activation: bit-identical in float16
    assert report.precision["used"] == "axis-float16" and "float16" in report.precision["exact_dtypes"]
    factors = {r.deformation.factor for r in report.results}
    assert factors and all(64 <= f <= 1024 and f == 2 ** round(torch.log2(torch.tensor(f)).item()) for f in factors)
    assert "attn.qk" not in report.sites and any("'attn.qk'" in s and "subnormal" in s for s in report.skipped)

    # random float16 weights (full 11-bit significands, tiny entries) cannot be scaled exactly: refused, untouched
    plain = tiny_llama().half()
    before = _weights(plain)
    with pytest.raises(PrecisionBudgetError, match="float16 cannot hold this protection exactly") as e:
        protect(plain, SpecDefConfig(), progress=False)
    assert "bfloat16" in str(e.value) and "precision='float32'" in str(e.value)
    assert all(torch.equal(p, before[n]) for n, p in plain.named_parameters())
    assert getattr(plain.config, "specdef", None) is None
    with pytest.raises(PrecisionBudgetError, match="no pair can be deformed exactly"):  # only attn.qk asked for
        protect(coarse_fp16_llama(), SpecDefConfig(sites=("attn.qk",)), progress=False)


def test_exact_scaling_primitives():
    rows = torch.tensor([[1.0, 0.5, 2**-4], [1.5 * 2**-14, 1.0, 1.0], [2**-14 + 2**-24, 1.0, 1.0], [0.0, 0.0, 0.0]],
                        dtype=torch.float16)
    j = exact_division_log2(rows, torch.float16, 10)
    assert j[0] == 10  # 2^-4 / 2^10 = 2^-14: the smallest normal, exact
    assert j[1] == 9  # 3 x 2^-15 / 2^j must stay a multiple of 2^-24 (the subnormal spacing): j <= 9
    assert j[2] == 0  # its last bit is 2^-24 already: no division is exact
    assert j[3] == 10  # zeros always divide exactly
    big = torch.tensor([[60000.0], [1.0]], dtype=torch.float16)
    assert in_range_log2(big, torch.float16, 10).tolist() == [0, 10]


def test_streaming_auto_equals_in_memory_bf16_and_fp16(tmp_path):
    for name, model in (("bf16", tiny_llama().to(torch.bfloat16)), ("fp16", coarse_fp16_llama())):
        src = tmp_path / name
        model.save_pretrained(src, max_shard_size="60KB")
        rep = protect_checkpoint(src, tmp_path / f"{name}-out", SpecDefConfig(), progress=False)
        assert rep.deviation == 0.0 and rep.tensor_error == 0.0
        protect(model, SpecDefConfig(), progress=False)
        written = {k: v for f in sorted((tmp_path / f"{name}-out").glob("*.safetensors")) for k, v in load_file(f).items()}
        assert all(torch.equal(written[n], p) for n, p in model.state_dict().items() if n in written)
        conf = json.loads((tmp_path / f"{name}-out" / "config.json").read_text())
        assert conf["dtype"] == str(model.dtype).replace("torch.", "")  # a 16-bit-exact release keeps its dtype
        assert rep.precision["used"] in ("axis", "axis-float16") and not conf["specdef"]["precision"]["float32_only"]


def test_streaming_float32_only_release_says_float32_in_its_config(tmp_path):
    src = tmp_path / "f32"
    tiny_llama().save_pretrained(src)
    conf = json.loads((src / "config.json").read_text())
    conf["dtype"] = "bfloat16"  # a float32 checkpoint whose config invites a downcast
    (src / "config.json").write_text(json.dumps(conf))
    protect_checkpoint(src, tmp_path / "out", SpecDefConfig(sites=("attn.vo",)), progress=False)
    conf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert conf["dtype"] == "float32" and conf["specdef"]["precision"]["float32_only"]


# ------------------------------------------------------------------------------------------------ the guard


@pytest.fixture(scope="module")
def releases(tmp_path_factory) -> dict[str, Path]:
    """The original, a float32-only (spectral) release and a bfloat16-exact (axis, alpha 1024) release."""
    root = tmp_path_factory.mktemp("releases")
    out = {"original": root / "original", "f32only": root / "f32only", "bf16exact": root / "bf16exact"}
    tiny_llama().save_pretrained(out["original"])
    for key, cfg in (("f32only", SpecDefConfig()), ("bf16exact", SpecDefConfig(mode="axis", alpha=1024.0))):
        model = tiny_llama()
        protect(model, cfg, progress=False)
        model.save_pretrained(out[key])
    return out


def test_guard_transformers_refuses_resolves_auto_and_can_be_forced(releases, tmp_path, caplog):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    path = releases["f32only"]
    for cls in (AutoModelForCausalLM, LlamaForCausalLM):
        for kw in ({"dtype": torch.bfloat16}, {"torch_dtype": torch.float16}, {"dtype": "bfloat16"}):
            with pytest.raises(DowncastError) as e:
                cls.from_pretrained(path, **kw)
            msg = str(e.value)
            assert str(path) in msg and "exact only in float32" in msg and "factors 1000" in msg
            assert "load it in float32" in msg and "specdef_allow_downcast=True" in msg and "HF_SPECDEF_ALLOW_DOWNCAST" in msg
    path = Path(shutil.copytree(path, tmp_path / "edited"))
    conf = json.loads((path / "config.json").read_text())
    conf["dtype"] = "bfloat16"  # even if the config asks for a downcast, "auto" (the default) loads float32
    (path / "config.json").write_text(json.dumps(conf))
    assert AutoModelForCausalLM.from_pretrained(path).dtype == torch.float32
    assert LlamaForCausalLM.from_pretrained(path, dtype="auto").dtype == torch.float32
    caplog.set_level("WARNING", logger="hf_specdef")
    forced = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, specdef_allow_downcast=True)
    assert forced.dtype == torch.bfloat16 and "forced" in caplog.text
    # a bfloat16-exact release loads in bfloat16 without a word; float16 is refused too (SmolLM2: non-finite there)
    caplog.clear()
    assert AutoModelForCausalLM.from_pretrained(releases["bf16exact"], dtype=torch.bfloat16).dtype == torch.bfloat16
    assert "hf-specdef" not in caplog.text
    with pytest.raises(DowncastError, match=r"exact only in float32, bfloat16.*load it in float32 or bfloat16"):
        AutoModelForCausalLM.from_pretrained(releases["bf16exact"], dtype=torch.float16)


GUARD_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    if sys.argv[2] == "stock":
        sys.modules["hf_specdef"] = None  # hf-specdef not installed
    else:
        import hf_specdef  # noqa: F401
    from transformers import AutoModelForCausalLM

    def load():
        try:
            m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
            print("LOADED", m.dtype, AutoModelForCausalLM.from_pretrained(sys.argv[1]).dtype)
        except Exception as e:
            print("REFUSED", type(e).__name__)

    load()
    if sys.argv[2] != "stock":
        os.environ["HF_SPECDEF_ALLOW_DOWNCAST"] = "1"  # read at each load
        load()
""")


def test_guard_in_fresh_processes_with_and_without_hf_specdef(releases, tmp_path):
    def run(mode: str) -> list[str]:
        env = {k: v for k, v in os.environ.items() if k != "HF_SPECDEF_ALLOW_DOWNCAST"}
        proc = subprocess.run([sys.executable, "-c", GUARD_SCRIPT, str(releases["f32only"]), mode], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300,
                              env={**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        return [x for x in proc.stdout.splitlines() if x.startswith(("LOADED", "REFUSED"))]

    assert run("import") == ["REFUSED DowncastError", "LOADED torch.bfloat16 torch.float32"]
    # without hf-specdef nothing can stop an explicit downcast; the saved dtype keeps the default load in float32
    assert run("stock") == ["LOADED torch.bfloat16 torch.float32"]


def test_guard_diffusers_model_and_pipeline(tmp_path):
    pytest.importorskip("diffusers")
    from diffusers import DiffusionPipeline, UNet2DConditionModel
    from test_diffusers import tiny_pipeline, tiny_unet

    unet = tiny_unet()
    protect(unet, SpecDefConfig(), progress=False)
    unet.save_pretrained(tmp_path / "unet")
    with pytest.raises(DowncastError, match="exact only in float32"):
        UNet2DConditionModel.from_pretrained(tmp_path / "unet", torch_dtype=torch.float16)
    assert UNet2DConditionModel.from_pretrained(tmp_path / "unet", torch_dtype="auto").dtype == torch.float32
    assert UNet2DConditionModel.from_pretrained(tmp_path / "unet", dtype=torch.bfloat16,
                                                specdef_allow_downcast=True).dtype == torch.bfloat16
    pipe = tiny_pipeline(tmp_path)
    protect(pipe, SpecDefConfig(), progress=False)
    pipe.save_pretrained(tmp_path / "pipe")
    with pytest.raises(DowncastError, match=r"'unet': torch.float32") as e:
        DiffusionPipeline.from_pretrained(tmp_path / "pipe", torch_dtype=torch.float16)
    assert "components refused" in str(e.value)
    mixed = DiffusionPipeline.from_pretrained(tmp_path / "pipe", torch_dtype={
        "unet": torch.float32, "text_encoder": torch.float32, "default": torch.float16})
    assert mixed.unet.dtype == torch.float32 and mixed.vae.dtype == torch.float16


# ------------------------------------------------------------------------------------------------ verify --dtype


def test_verify_cli_dtype(releases, capsys):
    from hf_specdef.cli import main

    orig = str(releases["original"])
    assert main(["verify", orig, str(releases["f32only"]), "--dtype", "bfloat16"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "bfloat16" in out and "for scale" in out and "load it in float32" in out
    assert main(["verify", orig, str(releases["bf16exact"]), "--dtype", "bfloat16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["max_relative_deviation"] == 0.0 and result["dtype"] == "bfloat16"
    assert main(["verify", orig, str(releases["f32only"])]) == 0  # float32: fine


def test_save_time_precision_float32_on_a_16_bit_model_is_refused_untouched(tmp_path):
    pytest.importorskip("diffusers")
    from test_diffusers import tiny_unet

    from hf_specdef import save_protected

    for model in (tiny_unet().to(torch.bfloat16), tiny_llama().to(torch.bfloat16)):
        before = _weights(model)
        with pytest.raises(ValueError, match="would change"):
            save_protected(model, tmp_path / "out", SpecDefConfig(precision="float32"), progress=False)
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
