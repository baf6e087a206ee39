"""The documentation: ``mkdocs build --strict`` passes, and every ```python block of README.md and docs/*.md runs.

Each block runs in this process, in a namespace of its own and a fresh temporary working directory, on tiny local
models instead of the Hub models and folders it names: every string literal in ``SUBSTITUTIONS`` (quotes included)
is replaced by the path of the tiny local folder built for it. Write blocks so that they run that way (with their
imports, small settings); a block that cannot (the Hub, a GPU, minutes of work) gets an HTML comment on the line
right before it, ``<!-- not-run: reason -->``, and is skipped with that reason.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import byte_tokenizer

os.environ.setdefault("MPLBACKEND", "Agg")

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DOC_FILES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]

# literal in a block (with its quotes) -> the tiny local folder (built by ``_build``) that replaces it
SUBSTITUTIONS = {
    '"meta-llama/Llama-3.2-1B"': "llama",                  # a Hub causal LM, bfloat16 as released, with its tokenizer
    '"Llama-3.1-8B"': "llama",                             # a local checkpoint folder (streaming)
    '"./my-model"': "small_llama",                         # a local folder with its tokenizer (publish, red team)
    '"me/Llama-3.2-1B-specdef"': "protected_llama",        # a protected release, as an attacker downloads it
    '"stable-diffusion-v1-5/stable-diffusion-v1-5"': "sd_pipeline",  # a diffusers pipeline
}

NOT_RUN = re.compile(r"<!--\s*not-run:\s*(?P<reason>.*?)\s*-->")


@dataclass(frozen=True)
class Block:
    file: Path
    line: int  # 1-based line of the opening fence
    code: str
    not_run: str | None

    @property
    def id(self) -> str:
        return f"{self.file.relative_to(ROOT)}:{self.line}"


def _blocks() -> list[Block]:
    found = []
    for path in DOC_FILES:
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            marker = NOT_RUN.fullmatch(lines[i].strip())
            if lines[i].strip() == "```python":
                end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
                before = lines[i - 1].strip() if i else ""
                reason = NOT_RUN.fullmatch(before)
                found.append(Block(path, i + 1, textwrap.dedent("\n".join(lines[i + 1:end])),
                                   reason.group("reason") if reason else None))
                i = end
            elif marker and not (i + 1 < len(lines) and lines[i + 1].strip() == "```python"):
                raise AssertionError(f"{path.relative_to(ROOT)}:{i + 1}: a not-run marker must be right before a "
                                     f"```python block")
            i += 1
    return found


BLOCKS = _blocks()


# ------------------------------------------------------------------------------------------------- tiny local models



def _llama(out: Path, hidden: int, intermediate: int, dtype: torch.dtype) -> Path:
    """A 2-layer Llama (4 heads, 2 kv heads) as ``tests/conftest.py::tiny_llama``, with the tokenizer's vocabulary;
    hidden 256 fits whole 128-wide quantization groups, so the quantization-safe examples have pairs to deform."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_tokenizer(pad_token="<eos>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id))
    with torch.no_grad():  # trained norms are not all ones
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.to(dtype).eval().save_pretrained(out)
    tok.save_pretrained(out)
    return out





def _sd_pipeline(out: Path) -> Path:
    """The tiny SD-1.x-style pipeline of the diffusers tests, saved as a pipeline folder."""
    from test_diffusers import tiny_pipeline

    tiny_pipeline(out.parent).save_pretrained(out)
    return out


def _build(key: str, root: Path, get) -> Path:
    out = root / key
    if key == "llama":
        return _llama(out, 256, 384, torch.bfloat16)
    if key == "small_llama":
        return _llama(out, 32, 64, torch.float32)
    if key == "protected_llama":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from hf_specdef import SpecDefConfig, protect

        model = AutoModelForCausalLM.from_pretrained(get("llama"))
        protect(model, SpecDefConfig(), progress=False)
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(get("llama")).save_pretrained(out)
        return out
    if key == "sd_pipeline":
        (root / "sd").mkdir()
        return _sd_pipeline(root / "sd" / "pipeline")
    raise KeyError(key)


@pytest.fixture(scope="module")
def local_models(tmp_path_factory):
    """key -> tiny local folder, each built once, on first use."""
    root, built = tmp_path_factory.mktemp("doc_models"), {}

    def get(key: str) -> Path:
        if key not in built:
            built[key] = _build(key, root, get)
        return built[key]

    return get


# ---------------------------------------------------------------------------------------------------------- the tests
def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install -e '.[docs]'): the site is not built")
    pytest.importorskip("mkdocstrings_handlers.python",
                        reason="mkdocstrings-python is not installed (pip install -e '.[docs]'): the site is not built")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
                             "--site-dir", str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "api" / "index.html").is_file()


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_python_block_runs(block, local_models, tmp_path, monkeypatch):
    if block.not_run:
        pytest.skip(f"not-run: {block.not_run}")
    code = block.code
    for literal, key in SUBSTITUTIONS.items():
        if literal in code:
            code = code.replace(literal, repr(str(local_models(key))))
    monkeypatch.chdir(tmp_path)
    # padded so that a traceback points at the line of the markdown file
    exec(compile("\n" * block.line + code, str(block.file), "exec"), {"__name__": "__main__"})


def test_the_docs_have_python_blocks_and_few_are_not_run():
    assert any(b.file.name == "README.md" for b in BLOCKS) and len({b.file for b in BLOCKS}) >= 5
    assert sum(b.not_run is not None for b in BLOCKS) <= 3, [b.id for b in BLOCKS if b.not_run]


def test_api_reference_documents_every_public_object():
    import hf_specdef

    def resolve(dotted: str):
        parts = dotted.split(".")
        for i in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            for attr in parts[i:]:
                obj = getattr(obj, attr)
            return obj
        raise ImportError(dotted)

    documented = re.findall(r"^::: *(\S+)", "\n".join(p.read_text() for p in DOCS.glob("*.md")), flags=re.M)
    objects = [resolve(d) for d in documented]
    missing = [n for n in hf_specdef.__all__ if n != "__version__" and not any(o is getattr(hf_specdef, n) for o in objects)]
    assert not missing, f"not in the API reference: {missing}"
    assert "hf_specdef.__version__" in documented and "hf_specdef.tuners.specundo.SpecUndoConfig" in documented


def test_nav_lists_every_page():
    nav = set(re.findall(r"^\s*- [^:\n]+: (\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), flags=re.M))
    assert nav == {p.name for p in DOCS.glob("*.md")}


def test_readme_is_short_and_shows_code_early():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 220
    assert lines.index("```python") < 60
    assert all(len(line) <= 200 for line in lines), "a README line over 200 characters"


def test_readme_links_resolve():
    text = (ROOT / "README.md").read_text()
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in t]
    assert targets and all((ROOT / t).exists() for t in targets), [t for t in targets if not (ROOT / t).exists()]


def test_no_internal_references():
    pattern = re.compile(r"SPEC\s*§|§\s*\d|\bissue\s*(#|no\.?\s*)?\d+|the issue's", flags=re.I)
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in DOC_FILES for n, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line)]
    assert not hits


def test_every_exported_object_has_a_google_style_docstring():
    import inspect

    import hf_specdef
    from hf_specdef.errors import MissingExtraError

    def takes_arguments(cls) -> bool:  # an __init__ not from a built-in (a dataclass's too) with parameters
        if not any("__init__" in vars(c) for c in cls.__mro__ if c.__module__ != "builtins"):
            return False
        return any(p.name != "self" for p in inspect.signature(cls.__init__).parameters.values())

    names = [n for n in hf_specdef.__all__ if n != "__version__"]
    objects = []
    for name in names:
        try:
            objects.append((name, getattr(hf_specdef, name)))
        except MissingExtraError:  # SpecUndo without PEFT
            continue
    try:
        from hf_specdef.tuners.specundo import SpecUndoConfig
        objects.append(("tuners.specundo.SpecUndoConfig", SpecUndoConfig))
    except ImportError:
        pass
    problems = []
    for name, obj in objects:
        doc = inspect.getdoc(obj) or ""
        if obj.__doc__ is None or "__doc__" not in vars(obj) and not inspect.isfunction(obj):
            problems.append(f"{name}: no docstring of its own")
            continue
        need = ["Example"]
        if inspect.isfunction(obj):
            need += ["Args:", "Returns:"]
        elif inspect.isclass(obj) and takes_arguments(obj) and "Attributes:" not in doc:
            need.append("Args:")
        problems += [f"{name}: no {section!r}" for section in need if section not in doc]
        if re.search(r"SPEC\s*§|§\s*\d|\bissue\s*(#|no\.?\s*)?\d+", doc, flags=re.I):
            problems.append(f"{name}: an internal reference")
    assert not problems, problems
