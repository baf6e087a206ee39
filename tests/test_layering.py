"""Layering: the core never imports ``hf_specdef.integrations``; the integrations register with the core
(:mod:`hf_specdef.analysis.integration_registry`, :data:`hf_specdef.analysis.probe.PROBE_BUILDERS`), and a missing
integration is a clear error."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest

from hf_specdef.analysis import integration_registry as handlers

PACKAGE = Path(__file__).resolve().parent.parent / "hf_specdef"
INTEGRATIONS = "hf_specdef.integrations"
# the top layers may import the integrations: the package root (it runs install_all), the command line,
# publishing, evaluation and the red team; and the integrations themselves
TOP = ("__init__.py", "__main__.py", "cli", "publishing", "research", "integrations")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_top(path: Path) -> bool:
    first = path.relative_to(PACKAGE).parts[0]
    return first in TOP


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
    assert len(core) > 20 and PACKAGE / "protection" / "in_memory.py" in core
    assert PACKAGE / "analysis" / "stock_loading.py" in core
    offenders = [hit for p in core for hit in _imports_integrations(p)]
    assert not offenders, (
        f"core modules import {INTEGRATIONS} (lower layers never import integrations: add a hook or registry to the "
        f"core, e.g. hf_specdef.analysis.integration_registry, and register with it from the integration): {offenders}"
    )


def test_the_scan_sees_every_import_form(tmp_path, monkeypatch):
    fake = PACKAGE / "sites" / "x.py"  # never written: only its name is used to resolve relative imports
    for code in ("from ..integrations.diffusers import protect_pipeline", "from .. import integrations",
                 "import hf_specdef.integrations.transformers", "from hf_specdef.integrations import diffusers",
                 "importlib.import_module('hf_specdef.integrations.diffusers')"):
        monkeypatch.setattr(Path, "read_text", lambda self, code=code: code)
        assert _imports_integrations(fake), code
    for code in ("from ..sites import diffusers", "from . import registry", "import hf_specdef.analysis.integration_registry"):
        monkeypatch.setattr(Path, "read_text", lambda self, code=code: code)
        assert not _imports_integrations(fake), code


# --------------------------------------------------------------------------------------------
# The layer table: every module imports only from its own package or from the layers below it

# (package or top-level module, layer); a module belongs to its first-level package
LAYERS: dict[str, int] = {
    "errors": 0, "config": 0,
    "tensor_math": 1, "quantization": 1,  # pure tensor math; quantization round trips (torch only)
    "sites": 2,  # where the pairs are, per architecture
    "deformation": 3,  # the deformation engine: plans, steps, precision policy, record, report
    "storage": 4,  # safetensors folders on disk, staging, the release rule
    "analysis": 5,  # verification, inspection, stock loading, release dtypes, downcast guard
    "protection": 6,  # in memory, at save time, streaming
    "undo": 7, "tuners": 8,  # the attacker's side: detection and merge; the SpecUndo PEFT tuner
    "integrations": 9,  # the only code touching transformers/diffusers/PEFT internals
    "publishing": 10,
    "cli": 11,
    "research": 12,  # the red team and the toy benchmark, behind an extra
    "__main__": 13, "__init__": 13,
}
TOP_LEVEL_MODULES = {"__init__", "__main__", "config", "errors"}


def _unit(module: str) -> str:
    """The layer unit of a dotted module name: its first-level package (or top-level module) under hf_specdef."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _hf_imports(path: Path) -> list[tuple[str, int]]:
    """(imported hf_specdef module, line) for every import of ``path``, lazy ones included."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    tree = ast.parse(path.read_text(), str(path))
    type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                 for n in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in type_only:  # annotations only: never imported at run time
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.startswith("hf_specdef")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            if base == "hf_specdef":  # from hf_specdef import x: x is a module or a name of the package root
                for a in node.names:
                    if a.name == "__version__":  # package metadata, not the API the root re-exports
                        continue
                    sub = PACKAGE / a.name
                    out.append((f"hf_specdef.{a.name}" if sub.is_dir() or sub.with_suffix(".py").is_file()
                                else "hf_specdef", node.lineno))
            elif base.startswith("hf_specdef"):
                out.append((base, node.lineno))
    return out


def test_only_the_allowed_modules_live_at_the_top_level():
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert top == TOP_LEVEL_MODULES, f"put {sorted(top - TOP_LEVEL_MODULES)} in the package of its role (see LAYERS)"
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert packages <= set(LAYERS), f"add {sorted(packages - set(LAYERS))} to the layer table"


def test_imports_go_only_downward():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = _unit(_module_name(path)) if path.parent != PACKAGE else path.stem
        for target, line in _hf_imports(path):
            other = _unit(target)
            if other == unit:
                continue
            if LAYERS[other] >= LAYERS[unit] and unit not in ("__init__", "__main__"):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({unit}, layer {LAYERS[unit]}) imports "
                                 f"{target} ({other}, layer {LAYERS[other]})")
    assert not offenders, "imports that go up or sideways in the layer table:\n" + "\n".join(offenders)


def test_no_private_name_is_imported_across_packages():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = _unit(_module_name(path)) if path.parent != PACKAGE else path.stem
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hf_specdef") and not node.level:
                if _unit(node.module) != unit:
                    offenders += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.module}.{a.name}"
                                  for a in node.names if a.name.startswith("_") and a.name != "__version__"]
    assert not offenders, "private names imported from another package (make them public there):\n" + "\n".join(offenders)


def _import_graph() -> dict[str, set[str]]:
    """Module -> the hf_specdef modules it imports at run time (lazy imports included)."""
    modules = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for target, _ in _hf_imports(path):
            parts = target.split(".")
            targets |= next(({".".join(parts[:n])} for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in modules),
                            set())
        graph[name] = targets - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circle():
    assert _cycles(_import_graph()) == []
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_layer_checks_see_an_upward_import(monkeypatch):
    fake = PACKAGE / "sites" / "x.py"  # never written: only its name is used
    monkeypatch.setattr(Path, "read_text", lambda self: "from hf_specdef.protection.in_memory import protect")
    assert _hf_imports(fake) == [("hf_specdef.protection.in_memory", 1)]
    assert LAYERS[_unit("hf_specdef.protection.in_memory")] > LAYERS["sites"]


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
