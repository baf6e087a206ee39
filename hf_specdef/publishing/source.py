"""What is being published: the source checkpoint and the metadata its model card carries.

:func:`resolve_source` turns ``model`` (a local folder or a Hub id, fetched with ``snapshot_download``) into a
local folder; :func:`describe_source` reads what it holds (a transformers model, a diffusers pipeline or a single
diffusers model) into a :class:`SourceInfo`: class, base model, license, language and Hub pipeline tag.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import PublishError
from .hub import _scrub

logger = logging.getLogger("hf_specdef")

# transformers class-name suffix -> Hub pipeline tag (first match wins)
_PIPELINE_TAGS = (
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
    ("ForConditionalGeneration", "text2text-generation"),
    ("ForSeq2SeqLM", "text2text-generation"),
    ("ForMaskedLM", "fill-mask"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForImageClassification", "image-classification"),
    ("Model", "feature-extraction"),
)


@dataclass
class SourceInfo:
    """What is being published: a transformers model, a diffusers pipeline or a single diffusers model."""

    path: Path
    hub_id: str | None
    kind: str  # "transformers" | "diffusers-pipeline" | "diffusers-model"
    class_name: str
    base_model: str
    license: str | None = None
    license_name: str | None = None
    license_link: str | None = None
    pipeline_tag: str | None = None
    language: Any = None

    @property
    def library_name(self) -> str:
        return "transformers" if self.kind == "transformers" else "diffusers"

    @property
    def is_pipeline(self) -> bool:
        return self.kind == "diffusers-pipeline"


def resolve_source(model: str | os.PathLike, token: str | None = None, revision: str | None = None) -> tuple[Path, str | None]:
    """A local folder for ``model`` (a folder, or a Hub id fetched with ``snapshot_download``), and the Hub id."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve(), None
    if path.exists():
        raise ValueError(f"model={str(model)!r} is a file; pass the checkpoint folder (with config.json) or a Hub id")
    if not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", str(model)):
        raise ValueError(f"model={str(model)!r} is neither a local folder nor a Hub model id (owner/name)")
    from huggingface_hub import snapshot_download

    logger.info("hf-specdef publish: downloading %s from the Hub", model)
    try:
        local = snapshot_download(str(model), revision=revision, token=token)
    except Exception as e:  # offline, gated, missing: one clear line, token scrubbed
        raise PublishError(_scrub(f"could not download {model!r} from the Hub: {e}", token)) from None
    return Path(local), str(model)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None


def _source_card(path: Path) -> Any:
    readme = path / "README.md"
    if not readme.is_file():
        return None
    try:
        from huggingface_hub import ModelCard

        return ModelCard.load(readme).data
    except Exception as e:  # a malformed card must not block publication; the metadata is just not carried
        logger.warning("hf-specdef publish: cannot parse the source README.md metadata (%s)", e)
        return None


def _looks_like_hub_id(name: Any) -> bool:
    return isinstance(name, str) and bool(re.fullmatch(r"[\w.\-]+/[\w.\-]+", name)) and not Path(name).exists()


def describe_source(path: Path, hub_id: str | None = None, base_model: str | None = None) -> SourceInfo:
    """Read what kind of checkpoint ``path`` holds and the metadata to carry into the card."""
    if (path / "model_index.json").is_file():
        index = _read_json(path / "model_index.json")
        kind, class_name, config = "diffusers-pipeline", index.get("_class_name", "DiffusionPipeline"), index
    elif (path / "config.json").is_file():
        config = _read_json(path / "config.json")
        if "_class_name" in config:
            kind, class_name = "diffusers-model", config["_class_name"]
        else:
            kind = "transformers"
            class_name = (config.get("architectures") or ["AutoModel"])[0]
    else:
        raise ValueError(f"{path} has neither config.json (transformers / diffusers model) nor model_index.json "
                         "(diffusers pipeline); pass a checkpoint folder saved with save_pretrained")
    card = _source_card(path)
    name = base_model or hub_id or (config.get("_name_or_path") if _looks_like_hub_id(config.get("_name_or_path")) else None)
    if not name:
        name = path.name
        logger.warning("hf-specdef publish: base_model unknown for a local folder; using %r (pass base_model= / "
                       "--base-model with the source's Hub id)", name)
    info = SourceInfo(path, hub_id, kind, class_name, name)
    info.license = getattr(card, "license", None) or config.get("license")
    info.license_name = getattr(card, "license_name", None)
    info.license_link = getattr(card, "license_link", None)
    info.language = getattr(card, "language", None)
    info.pipeline_tag = getattr(card, "pipeline_tag", None) or _infer_pipeline_tag(kind, class_name, config)
    return info


def _infer_pipeline_tag(kind: str, class_name: str, config: dict[str, Any]) -> str | None:
    if kind == "transformers":
        return next((tag for suffix, tag in _PIPELINE_TAGS if class_name.endswith(suffix)), None)
    if kind == "diffusers-pipeline":
        if "Img2Img" in class_name or "Inpaint" in class_name:
            return "image-to-image"
        if "Video" in class_name:
            return "text-to-video"
        return "text-to-image" if "text_encoder" in config else "unconditional-image-generation"
    return None
