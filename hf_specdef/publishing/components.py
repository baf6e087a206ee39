"""The torch models of a checkpoint folder, their protection records, and loading them with stock libraries.

A folder holds one model (component ``""``) or, for a diffusers pipeline, one per sub-folder. Verification and
the model card both walk them with :func:`_components`; :func:`_load` loads one with the stock transformers /
diffusers class its config names (no hf-specdef keyword involved).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hf_specdef.deformation.record import get_record
from hf_specdef.publishing.errors import PublishError
from hf_specdef.publishing.source import SourceInfo, _read_json


def _load(path: Path, kind: str, class_name: str) -> Any:
    """Load with the stock library class named by the checkpoint (no hf-specdef keyword involved)."""
    if kind == "transformers":
        import transformers

        cls = getattr(transformers, class_name, None) or transformers.AutoModel
        return cls.from_pretrained(path, dtype="auto").eval()
    import diffusers

    with _quiet_diffusers():  # stock diffusers' warnings (deprecated scheduler settings, keys it ignores) are not ours
        if kind == "diffusers-pipeline":
            pipe = diffusers.DiffusionPipeline.from_pretrained(path)
            if hasattr(pipe, "set_progress_bar_config"):
                pipe.set_progress_bar_config(disable=True)
            return pipe
        cls = getattr(diffusers, class_name, None)
        if cls is None:
            raise PublishError(f"diffusers has no class {class_name!r} (named by {path / 'config.json'}); cannot verify")
        return cls.from_pretrained(path).eval()


@contextmanager
def _quiet_diffusers() -> Iterator[None]:
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        yield
    finally:
        dlogging.set_verbosity(level)


def _components(info: SourceInfo, folder: Path) -> list[tuple[str, str, str]]:
    """(sub-folder, kind, class name) of each torch model in a checkpoint folder ("" for a single model)."""
    if not info.is_pipeline:
        return [("", info.kind, info.class_name)]
    out = []
    for name in sorted(_read_json(folder / "model_index.json")):
        sub = folder / name
        if name.startswith("_") or not (sub / "config.json").is_file():
            continue  # schedulers / tokenizers have no config.json; feature extractors have no weights
        conf = _read_json(sub / "config.json")
        if "_class_name" in conf:
            out.append((name, "diffusers-model", conf["_class_name"]))
        elif conf.get("architectures"):
            out.append((name, "transformers", conf["architectures"][0]))
    return out


def _record_of(folder: Path) -> dict[str, Any] | None:
    conf = folder / "config.json"
    return get_record(_read_json(conf)) if conf.is_file() else None
