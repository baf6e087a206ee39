"""The integrations' lifecycle (issue: an integration that does not surprise): install patches exactly what
``hf_specdef.integrations.PATCHES`` lists, once; ``uninstall()`` gives back stock transformers, diffusers and PEFT --
the very objects, the stock behaviour; ``install_all()`` installs again. Fresh processes, both import orders."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import tiny_unet_plain

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str, *args: str, cwd: Path, timeout: int = 300) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny Llama, its protected copy and a tiny UNet, saved."""
    from conftest import tiny_llama

    from hf_specdef import SpecDefConfig, protect

    root = tmp_path_factory.mktemp("lifecycle")
    model = tiny_llama(layers=1)
    model.save_pretrained(root / "llama")
    protect(model, SpecDefConfig(record="full", sites=("attn.vo",)), progress=False)
    model.save_pretrained(root / "protected")
    tiny_unet_plain(seed=0).save_pretrained(root / "unet")
    return root


LIFECYCLE = """
    import importlib, logging, sys
    order = sys.argv[1]
    MISSING = object()
    # every attribute hf_specdef may patch, written out here (checked against PATCHES below)
    TARGETS = [
        ("transformers.modeling_utils:PreTrainedModel", "from_pretrained"),
        ("hf_specdef.config:SpecDefConfig", "quant_method"),
        ("diffusers.models.modeling_utils:ModelMixin", "from_pretrained"),
        ("diffusers.pipelines.pipeline_utils:DiffusionPipeline", "from_pretrained"),
        ("diffusers.models.modeling_utils:ModelMixin", "save_pretrained"),
        ("diffusers.pipelines.pipeline_utils:DiffusionPipeline", "save_pretrained"),
    ]
    # what must not be patched: the Auto classes and LegacyModelMixin reach the patched methods
    UNTOUCHED = [("transformers.models.auto.auto_factory:_BaseAutoModelClass", "from_pretrained"),
                 ("diffusers.models.modeling_utils:LegacyModelMixin", "from_pretrained"),
                 ("transformers.modeling_utils:PreTrainedModel", "save_pretrained")]

    def owner(target):
        module, _, name = target.partition(":")
        return getattr(importlib.import_module(module), name)

    def attrs(targets):  # the objects in the owners' own __dict__
        return {(t, a): vars(owner(t)).get(a, MISSING) for t, a in targets if not t.startswith("hf_specdef")}

    def func(obj):
        return getattr(obj, "__func__", obj)

    def stock_state():
        from peft import mapping
        from peft.utils import PeftType
        from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
        return (list(PeftType), {t: dict(getattr(mapping, t)) for t in dir(mapping) if t.startswith("PEFT_TYPE_TO_")},
                dict(AUTO_QUANTIZATION_CONFIG_MAPPING), dict(AUTO_QUANTIZER_MAPPING))

    if order == "before":
        import hf_specdef
        from hf_specdef.integrations import import_hooks
        assert not [m for m in ("torch", "transformers", "diffusers", "peft") if m in sys.modules]
        assert import_hooks.pending(), "install_all registered no post-import hook"
    import transformers.modeling_utils, diffusers, peft  # noqa: E401
    from transformers import AutoModelForCausalLM, LlamaForCausalLM
    from diffusers import UNet2DConditionModel
    if order == "after":
        assert "hf_specdef" not in sys.modules
        stock = attrs(TARGETS + UNTOUCHED)
        stock_tables = stock_state()
        meta_path = list(sys.meta_path)
        import hf_specdef
    from peft import get_peft_model
    from peft.utils import PeftType
    from hf_specdef import SpecDefConfig, SpecUndoConfig, integrations
    from hf_specdef.deformation.record import get_record, set_record
    from hf_specdef.integrations import HOOKS, PATCHES, import_hooks, patching
    from hf_specdef.tuners.specundo import SPECUNDO
    cfg = SpecDefConfig(sites=("attn.vo",), alpha=100.0)

    # ---- installed: exactly the table, every row wrapped once -----------------------------------------------
    assert sorted((p.owner, p.attribute) for p in PATCHES) == sorted(TARGETS)
    assert all(patching.is_applied(p) for p in PATCHES), [p.label for p in PATCHES if not patching.is_applied(p)]
    installed = attrs(TARGETS)
    for (target, name), obj in installed.items():
        f = func(obj)
        assert f._specdef_wrapped and not getattr(f.__wrapped__, "_specdef_wrapped", False), (target, name)
        assert func(f._specdef_original) is f.__wrapped__ and type(f._specdef_original) is type(obj)
        if order == "after":
            assert f._specdef_original is stock[(target, name)], (target, name)
    assert not any(getattr(func(obj), "_specdef_wrapped", False) for obj in attrs(UNTOUCHED).values())
    if order == "before":  # the originals could not be seen before hf_specdef: take them from under the wrappers,
        stock = {key: func(obj)._specdef_original for key, obj in installed.items()}  # and the tables less ours
        stock.update(attrs(UNTOUCHED))
        types, maps, configs, quantizers = stock_state()
        stock_tables = ([t for t in types if t is not SPECUNDO],
                        {k: {t: v for t, v in m.items() if t is not SPECUNDO} for k, m in maps.items()},
                        {k: v for k, v in configs.items() if k != "specdef"},
                        {k: v for k, v in quantizers.items() if k != "specdef"})
    assert attrs(UNTOUCHED) == {k: stock[k] for k in attrs(UNTOUCHED)}
    assert SpecDefConfig.quant_method == "specdef" and PeftType.SPECUNDO is SPECUNDO

    # ---- idempotent: install again, run the hooks again, import the integration modules again --------------
    integrations.install_all()
    for _, name, _ in HOOKS:
        integrations._install(name)
        importlib.reload(sys.modules[name])
    assert attrs(TARGETS) == installed and list(PeftType).count(SPECUNDO) == 1

    # ---- installed: the keywords protect ---------------------------------------------------------------
    for cls in (AutoModelForCausalLM, LlamaForCausalLM):
        assert set(cls.from_pretrained("llama", specdef_config=cfg).specdef_report.sites) == {"attn.vo"}
    m = LlamaForCausalLM.from_pretrained("llama", quantization_config=cfg)  # transformers' registry, no patch
    assert m.specdef_report.results and not hasattr(m.config, "quantization_config")
    assert "_is_quantized" not in vars(m.config)  # the private flag is put back (absent), not left at False
    unet = UNet2DConditionModel.from_pretrained("unet", specdef_config=cfg)
    assert get_record(unet)["sites"] == ["attn.vo"]
    assert type(get_peft_model(LlamaForCausalLM.from_pretrained("protected"), SpecUndoConfig(r=2)).base_model
                ).__name__ == "SpecUndoModel"
    forged = UNet2DConditionModel.from_pretrained("unet")
    set_record(forged, {"format": "hf-specdef/1", "config": {"alpha": 1000.0}, "num_pairs": 1,
                        "hot_modules": ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"]})
    try:
        forged.save_pretrained("forged")
    except Exception as e:
        assert type(e).__name__ == "DeformationCheckError", e
    else:
        raise AssertionError("a forged record was saved while installed")

    # ---- uninstall: the very objects back, and logged ------------------------------------------------------
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("hf_specdef").addHandler(handler)
    logging.getLogger("hf_specdef").setLevel(logging.INFO)
    undone = integrations.uninstall()
    logged = "\\n".join(r.getMessage() for r in records)
    for p in PATCHES:
        assert p.label in undone and f"restored {p.label}" in logged, p.label
    for what in ("PeftType.SPECUNDO", "PEFT_TYPE_TO_TUNER_MAPPING", "'specdef' -> SpecDefHfQuantizer",
                 "'specdef' -> SpecDefQuantizationConfig"):
        assert any(what in u for u in undone) and what in logged, what
    now = attrs(TARGETS + UNTOUCHED)
    assert all(now[k] is stock[k] for k in now), [k for k in now if now[k] is not stock[k]]
    assert "quant_method" not in vars(SpecDefConfig)
    assert stock_state() == stock_tables and "SPECUNDO" not in PeftType.__members__
    if order == "after":
        assert sys.meta_path == meta_path
    assert not import_hooks.pending() and not [f for f in sys.meta_path if type(f).__name__ == "_Finder"]
    assert not any(patching.is_applied(p) for p in PATCHES)
    assert integrations.uninstall() == []  # twice: nothing more to undo

    # ---- uninstalled: stock behaviour ----------------------------------------------------------------------
    for cls in (AutoModelForCausalLM, LlamaForCausalLM):  # transformers' own error for an unknown keyword
        try:
            cls.from_pretrained("llama", specdef_config=cfg)
        except TypeError as e:
            assert "unexpected keyword argument 'specdef_config'" in str(e), e
        else:
            raise AssertionError(f"{cls.__name__} accepted specdef_config after uninstall")
    try:
        LlamaForCausalLM.from_pretrained("llama", quantization_config=cfg)
    except AttributeError as e:  # stock transformers reads quant_method of whatever it is given
        assert "quant_method" in str(e), e
    else:
        raise AssertionError("quantization_config=SpecDefConfig loaded after uninstall")
    plain = UNet2DConditionModel.from_pretrained("unet")
    ignored = UNet2DConditionModel.from_pretrained("unet", specdef_config=cfg)  # stock diffusers ignores it
    assert get_record(ignored) is None
    assert all(a.equal(b) for a, b in zip(plain.state_dict().values(), ignored.state_dict().values()))
    forged.save_pretrained("forged")  # stock save: no claims check
    ignored.save_pretrained("unprotected", specdef_config=cfg)  # stock save: the keyword means nothing
    import json
    assert "_specdef" not in json.loads(open("unprotected/config.json").read())
    assert get_record(UNet2DConditionModel.from_pretrained("unprotected")) is None
    try:
        PeftType("SPECUNDO")
    except ValueError:
        pass
    else:
        raise AssertionError("PeftType still has SPECUNDO")
    try:
        get_peft_model(LlamaForCausalLM.from_pretrained("protected"), SpecUndoConfig(r=2))
    except (KeyError, ValueError) as e:
        print("PEFT after uninstall:", type(e).__name__, e)
    else:
        raise AssertionError("PEFT still builds SpecUndo adapters")

    # ---- install_all again ---------------------------------------------------------------------------------
    integrations.install_all()
    assert all(patching.is_applied(p) for p in PATCHES) and PeftType.SPECUNDO is SPECUNDO
    for (target, name), obj in attrs(TARGETS).items():
        assert func(obj)._specdef_original is stock[(target, name)], (target, name)
    assert set(AutoModelForCausalLM.from_pretrained("llama", specdef_config=cfg).specdef_report.sites) == {"attn.vo"}
    assert get_record(UNet2DConditionModel.from_pretrained("unet", specdef_config=cfg))["sites"] == ["attn.vo"]
    assert type(get_peft_model(LlamaForCausalLM.from_pretrained("protected"), SpecUndoConfig(r=2)).base_model
                ).__name__ == "SpecUndoModel"
    print("OK", order)
"""


@pytest.mark.parametrize("order", ["before", "after"], ids=["hf_specdef-first", "libraries-first"])
def test_install_uninstall_install(order, folders):
    out = run_python(LIFECYCLE, order, cwd=folders)
    assert out.strip().endswith(f"OK {order}"), out[-2000:]


CANCELLED = """
    import sys
    import hf_specdef
    from hf_specdef import integrations
    from hf_specdef.integrations import import_hooks, patching
    assert integrations.uninstall() == [f"post-import hook for {m}" for m, _, _ in integrations.HOOKS]
    assert not import_hooks.pending() and not [f for f in sys.meta_path if type(f).__name__ == "_Finder"]
    import peft
    from peft.utils import PeftType
    from transformers import PreTrainedModel
    assert not getattr(PreTrainedModel.__dict__["from_pretrained"].__func__, "_specdef_wrapped", False)
    assert "hf_specdef.integrations.transformers" not in sys.modules and "SPECUNDO" not in PeftType.__members__
    integrations.install_all()  # the libraries are imported: installs now
    assert PreTrainedModel.__dict__["from_pretrained"].__func__._specdef_wrapped and PeftType.SPECUNDO
    assert [p.label for p in integrations.PATCHES if patching.is_applied(p)][:2] == [
        "transformers.modeling_utils.PreTrainedModel.from_pretrained", "hf_specdef.config.SpecDefConfig.quant_method"]
    assert import_hooks.pending() == ["diffusers.models.modeling_utils", "diffusers.pipelines.pipeline_utils"]
    print("OK")
"""


def test_uninstall_before_the_libraries_are_imported_cancels_the_hooks(tmp_path):
    assert run_python(CANCELLED, cwd=tmp_path).strip().endswith("OK")
