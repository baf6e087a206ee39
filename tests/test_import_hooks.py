"""Light import: ``import hf_specdef`` imports no ML library; the integrations install themselves when
transformers / diffusers / PEFT are imported, before or after hf_specdef (fresh subprocesses)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import tiny_unet_plain

from hf_specdef.integrations import import_hooks

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "diffusers", "peft")


def run_python(code: str, *args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_import_and_cli_set_up_import_no_ml_library():
    proc = run_python(f"""
        import sys
        import hf_specdef
        from hf_specdef.cli import build_parser
        build_parser()  # every subcommand's argparse set-up
        try:
            from hf_specdef.cli import main
            main(["--help"])
        except SystemExit as e:
            assert e.code == 0, e.code
        print("LOADED", [m for m in {HEAVY!r} if m in sys.modules])
    """)
    assert proc.stdout.strip().endswith("LOADED []"), proc.stdout[-500:]


# --------------------------------------------------------------------------------------------
# The post-import hook mechanism, on a synthetic package (no ML library needed)
# --------------------------------------------------------------------------------------------

FAKE = {  # a tangled chain: `top` imports `mid`, which imports `target` before it defines LATE
    "__init__.py": "",
    "target.py": "VALUE = 1\n",
    "mid.py": "from . import target\nLATE = target.VALUE + 1\n",
    "top.py": "from . import mid\n",
    "extra.py": "from .mid import LATE\n",  # what a callback imports: fails on a half-initialized `mid`
}


@pytest.fixture
def fakelib(tmp_path, monkeypatch):
    name = f"fakelib_{tmp_path.name.replace('-', '_')}"
    pkg = tmp_path / name
    pkg.mkdir()
    for file, text in FAKE.items():
        (pkg / file).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for m in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[m]


def test_callback_runs_once_the_library_import_has_settled(fakelib):
    calls = []

    def callback():
        from importlib import import_module

        calls.append(import_module(f"{fakelib}.extra").LATE)  # needs `mid` fully initialized

    import_hooks.when_imported(f"{fakelib}.target", callback)
    assert f"{fakelib}.target" in import_hooks.pending() and not calls
    __import__(f"{fakelib}.top")
    assert calls == [2]
    assert f"{fakelib}.target" not in import_hooks.pending()
    __import__(f"{fakelib}.extra")
    assert calls == [2]  # once


def test_callback_runs_at_once_when_already_imported(fakelib):
    __import__(f"{fakelib}.target")
    calls = []
    import_hooks.when_imported(f"{fakelib}.target", lambda: calls.append(1))
    assert calls == [1] and f"{fakelib}.target" not in import_hooks.pending()


def test_failing_callback_warns_and_does_not_break_the_import(fakelib, caplog):
    def callback():
        raise RuntimeError("boom")

    import_hooks.when_imported(f"{fakelib}.target", callback, label="fake")
    with caplog.at_level(logging.WARNING, logger="hf_specdef"):
        mod = __import__(f"{fakelib}.top", fromlist=["mid"])
    assert mod.mid.LATE == 2
    assert "could not install the fake integration" in caplog.text and "boom" in caplog.text


def test_cancel_forgets_only_the_given_callbacks(fakelib):
    calls = []
    mine, other = (lambda: calls.append("mine")), (lambda: calls.append("other"))
    import_hooks.when_imported(f"{fakelib}.target", mine)
    import_hooks.when_imported(f"{fakelib}.mid", other)
    assert import_hooks.cancel([mine]) == [f"{fakelib}.target"] and import_hooks.cancel([mine]) == []
    assert f"{fakelib}.target" not in import_hooks.pending() and f"{fakelib}.mid" in import_hooks.pending()
    __import__(f"{fakelib}.top")
    assert calls == ["other"]  # (the finder leaving sys.meta_path: tests/test_integration_lifecycle.py)


def test_install_all_registers_each_hook_once():
    from hf_specdef import integrations

    before = import_hooks.pending()
    integrations.install_all()
    integrations.install_all()
    assert import_hooks.pending() == before  # nothing doubled
    assert [m for m, _, _ in integrations.HOOKS] == ["transformers.modeling_utils", "diffusers.models.modeling_utils",
                                                     "diffusers.pipelines.pipeline_utils", "peft"]


# --------------------------------------------------------------------------------------------
# The real integrations, hf_specdef imported before or after the libraries (fresh processes)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny Llama, its protected copy with a SpecUndo adapter, and a tiny UNet, saved."""
    from conftest import tiny_llama
    from peft import get_peft_model

    from hf_specdef import SpecDefConfig, SpecUndoConfig, protect

    root = tmp_path_factory.mktemp("hooks")
    model = tiny_llama()
    model.save_pretrained(root / "llama")
    protect(model, SpecDefConfig(record="full"), progress=False)
    model.save_pretrained(root / "protected")
    get_peft_model(model, SpecUndoConfig(r=4, knowledge="blind")).save_pretrained(root / "specundo")
    tiny_unet_plain(seed=0).save_pretrained(root / "unet")
    return root


ORDERS = """
    import sys
    order = sys.argv[1]
    if order == "before":
        import hf_specdef
        assert not [m for m in ("torch", "transformers", "diffusers", "peft") if m in sys.modules]
    from transformers import AutoModelForCausalLM
    if order == "before":  # the Auto classes get the hook on their first call, without modeling_utils imported
        assert "transformers.modeling_utils" not in sys.modules
        m = AutoModelForCausalLM.from_pretrained("llama", specdef_config=__import__("hf_specdef").SpecDefConfig())
        assert m.specdef_report.results and m.config.specdef["format"] == "hf-specdef/1"
    from transformers import LlamaForCausalLM
    from diffusers import UNet2DConditionModel
    from peft import PeftModel, get_peft_model
    if order == "after":
        assert "hf_specdef" not in sys.modules
        import hf_specdef
    from hf_specdef import SpecDefConfig
    cfg = SpecDefConfig(sites=("attn.vo", "mlp"))
    for cls in (AutoModelForCausalLM, LlamaForCausalLM):
        m = cls.from_pretrained("llama", specdef_config=cfg)
        assert set(m.specdef_report.sites) == {"attn.vo", "mlp"}, m.specdef_report.sites
    unet = UNet2DConditionModel.from_pretrained("unet", specdef_config=cfg)  # stock diffusers ignores the keyword
    assert unet.config._specdef["sites"] == ["attn.vo", "mlp"], unet.config
    # the integrations registered with the core (hf_specdef.analysis.integration_registry) when they installed:
    # protect() of a pipeline
    # and save_protected() find them, whichever was imported first
    from types import SimpleNamespace
    plain = UNet2DConditionModel.from_pretrained("unet")
    report = hf_specdef.protect(SimpleNamespace(components={"unet": plain}), cfg, progress=False)
    assert report.results and plain.config._specdef["sites"] == ["attn.vo", "mlp"]
    plain = UNet2DConditionModel.from_pretrained("unet")
    assert hf_specdef.save_protected(plain, f"unet_saved_{order}", cfg, progress=False).results
    # save-time protection: the model in memory is unchanged
    assert __import__("hf_specdef.deformation.record", fromlist=["get_record"]).get_record(plain) is None
    llama = LlamaForCausalLM.from_pretrained("llama")
    assert hf_specdef.save_protected(llama, f"llama_saved_{order}", cfg, progress=False, overwrite=True).results
    # a SpecUndo adapter loads through PEFT's registry, SpecUndoConfig never imported in this process
    assert "hf_specdef.tuners.specundo" in sys.modules
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("protected"), "specundo")
    assert type(pm.base_model).__name__ == "SpecUndoModel"
    from hf_specdef import SpecUndoConfig
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained("protected"), SpecUndoConfig(r=2, knowledge="blind"))
    assert type(pm.base_model).__name__ == "SpecUndoModel"
    print("OK", order)
"""


@pytest.mark.parametrize("order", ["before", "after"])
def test_integrations_work_whichever_is_imported_first(order, folders):
    proc = run_python(ORDERS, order, cwd=folders)
    assert proc.stdout.strip().endswith(f"OK {order}")
