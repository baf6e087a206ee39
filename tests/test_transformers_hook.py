"""transformers hook: from_pretrained(specdef_config=...), the "specdef" quantizer, stock-loadable saves, save_protected."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM, PreTrainedModel
from transformers.models.auto.auto_factory import _BaseAutoModelClass
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

import hf_specdef  # noqa: F401  (installs the hook)
from hf_specdef import AlreadyProtectedError, SpecDefConfig, VerificationError, protect
from hf_specdef.analysis.probe import max_relative_deviation
from hf_specdef.integrations import transformers as hook
from hf_specdef.integrations.transformers import SpecDefQuantizationConfig, save_protected
from hf_specdef.tensor_math.linalg import top_singular_values

ALPHA = 1000.0
HEAD_DIM = 16  # tiny_llama: hidden 64, 4 query heads, 2 kv heads
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def original():
    return tiny_llama(seed=0)


@pytest.fixture(scope="module")
def checkpoint(original, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny-llama"
    original.save_pretrained(path)
    return path


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS.to(model.device)).logits.to(device="cpu", dtype=torch.float64)


def v_head_sigmas(state: dict[str, torch.Tensor], layer: int) -> list[float]:
    w = state[f"model.layers.{layer}.self_attn.v_proj.weight"]
    return [float(top_singular_values(w[g * HEAD_DIM:(g + 1) * HEAD_DIM], 1)[0]) for g in range(w.shape[0] // HEAD_DIM)]


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("keyword", ["specdef_config", "quantization_config"])
@pytest.mark.parametrize("loader", [AutoModelForCausalLM, LlamaForCausalLM], ids=["auto", "llama"])
def test_both_keyword_forms_deform_and_keep_function(keyword, loader, original, checkpoint):
    cfg = SpecDefConfig(alpha=ALPHA, sites=("attn.vo",))
    model = loader.from_pretrained(checkpoint, **{keyword: cfg})
    # v-head blocks: sigma_1 inflated by alpha (recomputed from the weights) ...
    before, after = original.state_dict(), model.state_dict()
    for layer in range(2):
        for s0, s1 in zip(v_head_sigmas(before, layer), v_head_sigmas(after, layer), strict=True):
            assert s1 / s0 == pytest.approx(ALPHA, rel=1e-2)
    # ... and as the report says, for every pair
    report = model.specdef_report
    assert len(report.results) == 4 and {r.pair.site for r in report.results} == {"attn.vo"}
    for r in report.results:
        assert r.sigma_after / r.sigma_before == pytest.approx(ALPHA, rel=1e-2)
    assert max_relative_deviation(logits(original), logits(model)) <= 1e-4
    # the quantizer left no trace: plain model, record as the plain "specdef" key
    assert not hasattr(model.config, "quantization_config") and not model.is_quantized
    assert not hasattr(model, "hf_quantizer")
    assert model.config.specdef["sites"] == ["attn.vo"]


@pytest.mark.parametrize("device_map", ["cpu", "auto"])
def test_default_config_with_device_map(device_map, original, checkpoint):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, specdef_config=SpecDefConfig(), device_map=device_map)
    report = model.specdef_report
    assert set(report.sites) == {"attn.vo", "attn.qk", "mlp", "norm"}
    assert report.deviation is not None and report.deviation <= 1e-4
    # every attention and MLP projection is a hot side somewhere
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(m.endswith(name) for m in report.hot_modules), name
    assert max_relative_deviation(logits(original), logits(model)) <= 1e-4


STOCK_LOADER = textwrap.dedent(
    """
    import sys
    sys.modules["hf_specdef"] = None  # hf-specdef must not be importable here
    try:
        import hf_specdef  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("hf_specdef was importable")
    import torch
    from transformers import AutoModelForCausalLM
    src, ids_path, out_path = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(src)
    assert "hf_specdef" not in type(model).__module__
    with torch.no_grad():
        torch.save(model(input_ids=torch.load(ids_path)).logits, out_path)
    # without the hook, stock transformers rejects the keyword: the hook is what makes it work
    try:
        AutoModelForCausalLM.from_pretrained(src, specdef_config=object())
    except TypeError as e:
        print("rejected:", e)
    else:
        raise SystemExit("stock transformers accepted specdef_config")
    """
)


def test_saved_protected_model_loads_with_stock_transformers(original, checkpoint, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, specdef_config=SpecDefConfig(record="full"))
    out = tmp_path / "protected"
    model.save_pretrained(out)
    conf = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in conf
    assert conf["specdef"]["format"] == "hf-specdef/1" and len(conf["specdef"]["pairs"]) == 14
    torch.save(IDS, tmp_path / "ids.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    proc = subprocess.run(
        [sys.executable, "-c", STOCK_LOADER, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0 and "rejected:" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    stock = torch.load(tmp_path / "logits.pt")
    assert max_relative_deviation(logits(original), stock) <= 1e-4
    # and the files really hold deformed weights
    written = load_file(out / "model.safetensors")
    ratios = [s1 / s0 for s0, s1 in zip(v_head_sigmas(original.state_dict(), 0), v_head_sigmas(written, 0), strict=True)]
    assert min(ratios) > 100


def test_save_protected_leaves_model_unchanged_and_writes_protected_files(tmp_path):
    model = tiny_llama(seed=3)
    before = params(model)
    ref = logits(model)
    out = tmp_path / "out"
    report = save_protected(model, out, SpecDefConfig(alpha=ALPHA, sites=("attn.vo", "attn.qk", "mlp")), progress=False)
    # in memory: bit-identical, no record
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert not hasattr(model.config, "specdef")
    # on disk: deformed, stock-loadable, same function, record present, no quantization_config
    written = load_file(out / "model.safetensors")
    for s0, s1 in zip(v_head_sigmas(before, 1), v_head_sigmas(written, 1), strict=True):
        assert s1 / s0 == pytest.approx(ALPHA, rel=1e-2)
    conf = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in conf and conf["specdef"]["num_pairs"] == len(report.results) == 10
    reloaded = LlamaForCausalLM.from_pretrained(out)
    assert max_relative_deviation(ref, logits(reloaded)) <= 1e-4
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left behind
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_protected(model, out, SpecDefConfig(), progress=False)


def test_save_protected_failure_writes_nothing_and_restores(tmp_path, monkeypatch):
    import hf_specdef.analysis.probe

    model = tiny_llama(seed=4)
    before = params(model)
    monkeypatch.setattr(hf_specdef.analysis.probe, "max_relative_deviation", lambda ref, out: 0.5)  # a broken deformation
    with pytest.raises(VerificationError, match="nothing was written"):
        save_protected(model, tmp_path / "out", SpecDefConfig(alpha=ALPHA), progress=False)
    assert list(tmp_path.iterdir()) == []
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_load_time_protection_keeps_no_backup_and_a_failure_returns_no_model(checkpoint, monkeypatch):
    import hf_specdef.analysis.probe
    from hf_specdef.protection.in_memory import Backup

    saved: list[str] = []
    monkeypatch.setattr(Backup, "add", lambda self, name, *a: saved.append(name))
    AutoModelForCausalLM.from_pretrained(checkpoint, specdef_config=SpecDefConfig())
    assert saved == []  # from_pretrained returns the model or raises: nothing to restore
    protect(tiny_llama(seed=6), SpecDefConfig(), progress=False)
    assert saved  # in-memory protection of a model the caller holds keeps its backup
    monkeypatch.setattr(hf_specdef.analysis.probe, "max_relative_deviation", lambda ref, out: 0.5)  # a broken deformation
    with pytest.raises(VerificationError, match="must be discarded"):
        AutoModelForCausalLM.from_pretrained(checkpoint, specdef_config=SpecDefConfig())


def test_check_deformation_refuses_undeformed_weights():
    from hf_specdef.protection.in_memory import ParamTensors, protect_model

    model = tiny_llama(seed=5)
    report = protect_model(model, SpecDefConfig(sites=("attn.vo",)), progress=False)
    tensors = ParamTensors(model)
    hook.check_deformation(report.results, tensors)  # the real deformation passes
    from hf_specdef.deformation.engine import undo

    undo(report.results, tensors)  # weights back to (about) the original: the claim no longer holds
    with pytest.raises(hook.DeformationCheckError, match="do not show the claimed deformation"):
        hook.check_deformation(report.results, tensors)


def test_double_protection_refused(checkpoint, tmp_path):
    protected = AutoModelForCausalLM.from_pretrained(checkpoint, specdef_config=SpecDefConfig(sites=("attn.vo",)))
    out = tmp_path / "protected"
    protected.save_pretrained(out)
    with pytest.raises(AlreadyProtectedError, match="already protected.*force=True"):
        AutoModelForCausalLM.from_pretrained(out, specdef_config=SpecDefConfig())
    with pytest.raises(AlreadyProtectedError, match="already protected"):
        LlamaForCausalLM.from_pretrained(out, quantization_config=SpecDefConfig())
    with pytest.raises(AlreadyProtectedError, match="already protected"):
        save_protected(protected, tmp_path / "again", SpecDefConfig(), progress=False)
    # insisting works (a bit-exact axis deformation on top, so the tolerance still holds)
    twice = AutoModelForCausalLM.from_pretrained(
        out, specdef_config=SpecDefQuantizationConfig(SpecDefConfig(alpha=4.0, mode="axis", sites=("mlp",)), force=True)
    )
    assert twice.config.specdef["sites"] == ["mlp"] and len(twice.specdef_report.results) == 2


def test_specdef_with_another_quantization_config_is_an_error(checkpoint):
    from transformers import BitsAndBytesConfig

    with pytest.raises(ValueError, match="both specdef_config= and quantization_config=BitsAndBytesConfig"):
        AutoModelForCausalLM.from_pretrained(
            checkpoint, specdef_config=SpecDefConfig(), quantization_config=BitsAndBytesConfig(load_in_8bit=True)
        )
    with pytest.raises(ValueError, match="must be a hf_specdef.SpecDefConfig"):
        AutoModelForCausalLM.from_pretrained(checkpoint, specdef_config={"alpha": 10})


def test_bad_config_fails_before_loading(checkpoint):
    with pytest.raises(ValueError, match="layers"):
        AutoModelForCausalLM.from_pretrained(checkpoint, specdef_config=SpecDefConfig(layers=[7]))


def test_disk_offload_is_refused_before_loading(checkpoint, tmp_path):
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    with pytest.raises(ValueError, match="protect_checkpoint"):
        AutoModelForCausalLM.from_pretrained(checkpoint, specdef_config=SpecDefConfig(), device_map=device_map,
                                             offload_folder=str(tmp_path))


def test_install_is_idempotent_and_registered():
    from hf_specdef import integrations
    from hf_specdef.integrations import PATCHES, patching

    fp = PreTrainedModel.__dict__["from_pretrained"]
    auto = _BaseAutoModelClass.__dict__["from_pretrained"]
    hook.install()
    hook.install()
    integrations.install_all()
    integrations._install(hook.__name__)  # what the post-import hook runs
    assert PreTrainedModel.__dict__["from_pretrained"] is fp and _BaseAutoModelClass.__dict__["from_pretrained"] is auto
    assert fp.__func__._specdef_wrapped and not getattr(fp.__func__.__wrapped__, "_specdef_wrapped", False)
    assert fp.__func__._specdef_original.__func__ is fp.__func__.__wrapped__
    assert not getattr(auto.__func__, "_specdef_wrapped", False)  # the Auto classes call PreTrainedModel's: no patch
    assert "hf-specdef: ``specdef_config=SpecDefConfig(...)``" in fp.__func__.__doc__
    assert AUTO_QUANTIZER_MAPPING["specdef"] is hook.SpecDefHfQuantizer
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["specdef"] is SpecDefQuantizationConfig
    mine = [p for p in PATCHES if p.integration == hook.__name__]
    assert [p.label for p in mine] == ["transformers.modeling_utils.PreTrainedModel.from_pretrained",
                                       "hf_specdef.config.SpecDefConfig.quant_method"]
    assert all(patching.is_applied(p) for p in mine) and SpecDefConfig.quant_method == "specdef"


def test_specdef_config_as_quantization_config_goes_through_the_registry_alone(checkpoint):
    """No from_pretrained patch is needed for quantization_config=: the stock method, transformers' registry."""
    stock = PreTrainedModel.__dict__["from_pretrained"].__func__.__wrapped__
    model = stock(LlamaForCausalLM, checkpoint, quantization_config=SpecDefConfig(sites=("mlp",)))
    assert set(model.specdef_report.sites) == {"mlp"} and not hasattr(model.config, "quantization_config")
    # the private flags HfQuantizer.postprocess_model set are put back as they were (absent, not False: transformers
    # tests hasattr(config, "_is_quantized"))
    assert not any("_is_quantized" in vars(m.config) for m in model.modules() if hasattr(m, "config"))


def test_quantization_config_roundtrip():
    qc = SpecDefQuantizationConfig(SpecDefConfig(alpha=8.0, sites=("mlp",)), force=True)
    d = qc.to_dict()
    assert d["quant_method"] == "specdef" and d["alpha"] == 8.0 and d["force"] is True
    back = SpecDefQuantizationConfig.from_dict(d)
    assert back.specdef == qc.specdef and back.force
    with pytest.raises(ValueError, match="alpha"):
        SpecDefQuantizationConfig.from_dict({"quant_method": "specdef", "alpha": 0.5})
