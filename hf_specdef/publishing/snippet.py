"""How to load the release: the card's Python usage snippet and the dtype it loads the release in.

:func:`load_snippet` writes the snippet (the stock transformers / diffusers class when the library has it, else the
Auto class or ``DiffusionPipeline``; the full ``owner/name`` id; the tokenizer when the folder holds one) and
:func:`release_dtype` picks the dtype a user should load the release in from its precision record (or its
``config.json``). Every value from the source is a JSON string literal or a checked identifier in the snippet, so
nothing from the source can become code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hf_specdef.publishing.escaping import python_string_literal
from hf_specdef.publishing.source import SourceInfo

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
_DTYPES = ("float32", "bfloat16", "float16")


def release_dtype(safety: Mapping[str, Any] | None, folder: Path) -> str | None:
    """The dtype a user should load the release in: float32 for a float32-only release, else its storage dtype when
    the protection is exact there (else its first exact dtype); without a precision record, ``config.json``'s
    ``dtype`` / ``torch_dtype``. ``None`` when nothing says.

    Args:
        safety: :func:`hf_specdef.analysis.release_dtypes.folder_safety` of the folder (or a protection report's precision).
        folder: the published folder.

    Returns:
        ``"float32"``, ``"bfloat16"``, ``"float16"`` or ``None``.

    Example:

    ```python
    >>> release_dtype({"float32_only": True, "exact_dtypes": ["float32"]}, Path("."))
    'float32'
    ```
    """
    if safety:
        if safety.get("float32_only"):
            return "float32"
        exact = [d for d in safety.get("exact_dtypes") or [] if d in _DTYPES]
        if safety.get("storage_dtype") in exact:
            return str(safety["storage_dtype"])
        if exact:
            return exact[0]
    conf = folder / "config.json"
    try:
        config = json.loads(conf.read_text()) if conf.is_file() else {}
    except (OSError, json.JSONDecodeError):
        config = {}
    dtype = config.get("dtype") or config.get("torch_dtype")
    return dtype if dtype in _DTYPES else None


def load_snippet(info: SourceInfo, repo_id: str, folder: Path | None = None, dtype: str | None = None) -> str:
    """The card's Python usage snippet: the stock class (when the library has it; else the Auto class), the full
    ``owner/name`` id, the release's dtype and, when the folder holds tokenizer files, its tokenizer. Every value is
    a JSON string literal or a checked identifier: nothing from the source can become code."""
    rid = python_string_literal(repo_id)
    dtype = dtype if dtype in _DTYPES else None
    lines = ["# replace <owner> with the Hub user or organisation the release is pushed to"] if "<owner>" in repo_id else []
    if info.kind == "transformers":
        import transformers

        cls = info.class_name if _is_library_class(transformers, info.class_name) else "AutoModel"
        tok = folder is not None and any((folder / f).is_file() for f in _TOKENIZER_FILES)
        imports = ", ".join(dict.fromkeys([cls] + (["AutoTokenizer"] if tok else [])))
        lines = (["import torch"] if dtype else []) + [f"from transformers import {imports}", ""] + lines
        lines.append(f"model = {cls}.from_pretrained({rid}" + (f", dtype=torch.{dtype})" if dtype else ")"))
        if tok:
            lines.append(f"tokenizer = AutoTokenizer.from_pretrained({rid})")
        return "\n".join(lines)
    import diffusers

    if info.is_pipeline:
        cls, var = "DiffusionPipeline", "pipe"
    else:
        cls = info.class_name if _is_library_class(diffusers, info.class_name) else "AutoModel"
        var = "model"
    lines = (["import torch"] if dtype else []) + [f"from diffusers import {cls}", ""] + lines
    lines.append(f"{var} = {cls}.from_pretrained({rid}" + (f", torch_dtype=torch.{dtype})" if dtype else ")"))
    return "\n".join(lines)


def _is_library_class(module: Any, name: str) -> bool:
    return isinstance(name, str) and name.isidentifier() and isinstance(getattr(module, name, None), type)
