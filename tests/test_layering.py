"""Layering: the core never imports ``hf_specdef.integrations``; the integrations register with the core
(:mod:`hf_specdef.handlers`, :data:`hf_specdef.probe.PROBE_BUILDERS`), and a missing integration is a clear error."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest

from hf_specdef import handlers

PACKAGE = Path(__file__).resolve().parent.parent / "hf_specdef"
INTEGRATIONS = "hf_specdef.integrations"
# the top layers may import the integrations: the package root (it runs install_all), the command line,
# publishing, evaluation and the red team; and the integrations themselves
TOP = ("__init__.py", "__main__.py", "cli.py", "commands", "publish", "evaluation", "redteam", "integrations")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_top(path: Path) -> bool:
    first = path.relative_to(PACKAGE).parts[0]
    return any(first == t or (t == "publish" and first.startswith("publish")) for t in TOP)


def _imports_integrations(path: Path) -> list[str]:
    """The statements of ``path`` that import hf_specdef.integrations (absolute, relative or through importlib)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    hits = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                arg = node.args[0].value
                targets = [arg, f"hf_specdef{arg}" if arg.startswith(".") else arg]
        if any(t == INTEGRATIONS or t.startswith(INTEGRATIONS + ".") for t in targets):
            hits.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    return hits


def test_core_modules_never_import_the_integrations():
    core = [p for p in sorted(PACKAGE.rglob("*.py")) if not _is_top(p)]
    assert len(core) > 20 and PACKAGE / "protection.py" in core and PACKAGE / "stock.py" in core
    offenders = [hit for p in core for hit in _imports_integrations(p)]
    assert not offenders, (
        f"core modules import {INTEGRATIONS} (lower layers never import integrations: add a hook or registry to the "
        f"core, e.g. hf_specdef.handlers, and register with it from the integration): {offenders}"
    )


def test_the_scan_sees_every_import_form(tmp_path, monkeypatch):
    fake = PACKAGE / "sites" / "x.py"  # never written: only its name is used to resolve relative imports
    for code in ("from ..integrations.diffusers import protect_pipeline", "from .. import integrations",
                 "import hf_specdef.integrations.transformers", "from hf_specdef.integrations import diffusers",
                 "importlib.import_module('hf_specdef.integrations.diffusers')"):
        monkeypatch.setattr(Path, "read_text", lambda self, code=code: code)
        assert _imports_integrations(fake), code
    for code in ("from ..sites import diffusers", "from . import registry", "import hf_specdef.handlers"):
        monkeypatch.setattr(Path, "read_text", lambda self, code=code: code)
        assert not _imports_integrations(fake), code


# --------------------------------------------------------------------------------------------
# The registries: nothing registered is an error naming the missing integration
# --------------------------------------------------------------------------------------------


def _diffusers_class() -> type:
    return type("FakeDiffusersModel", (), {"__module__": "diffusers.models.fake"})


def test_protect_of_a_pipeline_without_the_diffusers_integration(monkeypatch):
    from hf_specdef import protect

    monkeypatch.setattr(handlers, "_pipeline_protector", None)
    with pytest.raises(handlers.IntegrationMissingError, match=r"hf_specdef diffusers integration.*pip install diffusers"):
        protect(SimpleNamespace(components={}))
    seen = []
    monkeypatch.setattr(handlers, "_pipeline_protector", lambda pipe, cfg, **kw: seen.append((pipe, kw)) or "report")
    pipe = SimpleNamespace(components={})
    assert protect(pipe, progress=False, text_encoder=True) == "report"
    assert seen[0][0] is pipe and seen[0][1]["text_encoder"] is True and seen[0][1]["progress"] is False


def test_save_protected_dispatch_and_missing_integration(monkeypatch, tmp_path):
    from hf_specdef import save_protected

    monkeypatch.setattr(handlers, "_savers", {})
    err = handlers.IntegrationMissingError
    with pytest.raises(err, match=r"FakeDiffusersModel.*hf_specdef diffusers integration") as e:
        save_protected(_diffusers_class()(), tmp_path)
    assert e.value.library == "diffusers" and isinstance(e.value, ImportError)
    with pytest.raises(ValueError, match="save_protected expects"):
        save_protected(object(), tmp_path)

    calls = []
    handlers.register_saver("transformers", lambda o: True, lambda *a, **k: calls.append("transformers"))
    handlers.register_saver("diffusers", lambda o: True, lambda *a, **k: calls.append("diffusers"))
    save_protected(_diffusers_class()(), tmp_path)  # its own library's saver first, whatever the order
    save_protected(object(), tmp_path)  # no library: the first saver that accepts it
    assert calls == ["diffusers", "transformers"]
    handlers.register_saver("diffusers", lambda o: False, lambda *a, **k: None)  # replaces, by library
    assert len(handlers._savers) == 2 and handlers.saver_for(_diffusers_class()()) is not None
