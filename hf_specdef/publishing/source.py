"""What is being published: the source checkpoint and the metadata its model card carries.

:func:`resolve_source` turns ``model`` (a local folder or a Hub id, fetched with ``snapshot_download``) into a
local folder; :func:`describe_source` reads what it holds (a transformers model, a diffusers pipeline or a single
diffusers model) into a :class:`SourceInfo`: class, base model, license, language and Hub pipeline tag.

Everything read here is user-provided (the publisher's arguments, the source's ``config.json`` and ``README.md``):
Hub ids are validated with :func:`huggingface_hub.utils.validate_repo_id` (:func:`check_hub_id`), metadata values
that are not plain strings are dropped, and the model card escapes every string for where it lands
(:mod:`.card`).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_specdef.publishing.errors import PublishError
from hf_specdef.publishing.hub import _scrub

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
    base_model_is_hub_id: bool = False  # False: ``base_model`` is only the local folder's name (no Hub id known)

    @property
    def library_name(self) -> str:
        return "transformers" if self.kind == "transformers" else "diffusers"

    @property
    def is_pipeline(self) -> bool:
        return self.kind == "diffusers-pipeline"


def is_hub_id(name: Any) -> bool:
    """Whether ``name`` is a valid Hub repository id (``owner/name`` or a canonical ``name``).

    Args:
        name: the candidate id.

    Returns:
        ``True`` when :func:`huggingface_hub.utils.validate_repo_id` accepts it.

    Example:

    ```python
    >>> is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct"), is_hub_id('org/x"); import os')
    (True, False)
    ```
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(name, str):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def check_hub_id(value: Any, what: str, fix: str) -> str:
    """``value`` if it is a valid Hub repository id, else a :class:`ValueError` naming it and the fix.

    Args:
        value: the id given by the user.
        what: the argument's name as the user wrote it (``"repo_id"``, ``"base_model"``).
        fix: what to pass instead (one sentence).

    Returns:
        ``value``, unchanged.

    Raises:
        ValueError: ``value`` is not a valid Hub id (the message quotes it with ``repr``, so a hostile value is shown,
            never interpreted).

    Example:

    ```python
    >>> check_hub_id("me/tiny-llama", "base_model", "pass the source's Hub id")
    'me/tiny-llama'
    ```
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:  # its message repeats the value raw (newlines and all): quote it once, with repr
        raise ValueError(f"{what}={value!r} is not a valid Hub repository id (owner/name or name: letters, digits, "
                         f"'-', '_' and '.', at most 96 characters per part, no '--' or '..'). {fix}") from None
    return value


def default_repo_name(base_model: str) -> str:
    """The repository name a dry run uses without ``repo_id``: ``<name>-specdef``, reduced to the characters a Hub
    repository name may hold (a local folder's name may hold any).

    Args:
        base_model: the source's Hub id or local folder name.

    Returns:
        A valid Hub repository name (no owner).

    Example:

    ```python
    >>> default_repo_name("HuggingFaceTB/SmolLM2-135M-Instruct"), default_repo_name("my model (v2)")
    ('SmolLM2-135M-Instruct-specdef', 'my-model-v2-specdef')
    ```
    """
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", base_model.rsplit("/", 1)[-1])
    name = re.sub(r"\.{2,}", ".", re.sub(r"-{2,}", "-", name)).strip("-._")[:80].strip("-._") or "model"
    return f"{name}-specdef"


def resolve_source(model: str | os.PathLike, token: str | None = None, revision: str | None = None) -> tuple[Path, str | None]:
    """A local folder for ``model`` (a folder, or a Hub id fetched with ``snapshot_download``), and the Hub id."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve(), None
    if path.exists():
        raise ValueError(f"model={str(model)!r} is a file; pass the checkpoint folder (with config.json) or a Hub id")
    if not is_hub_id(str(model)):
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
    """An ``owner/name`` Hub id that is not also a local path (a config's ``_name_or_path`` may be either)."""
    return isinstance(name, str) and "/" in name and is_hub_id(name) and not Path(name).exists()


def _meta_str(value: Any) -> str | None:
    """A metadata value carried into the card's YAML front matter: a non-empty string, else ``None``."""
    return value.strip() if isinstance(value, str) and value.strip() else None


def _meta_language(value: Any) -> str | list[str] | None:
    if isinstance(value, (list, tuple)):
        langs = [x for x in (_meta_str(v) for v in value) if x]
        return langs or None
    return _meta_str(value)


def describe_source(path: Path, hub_id: str | None = None, base_model: str | None = None) -> SourceInfo:
    """Read what kind of checkpoint ``path`` holds and the metadata to carry into the card.

    Args:
        path: the local checkpoint folder.
        hub_id: the Hub id it was downloaded from, if any.
        base_model: the source's Hub id given by the publisher (validated).

    Returns:
        The :class:`SourceInfo`. ``base_model`` is ``base_model``, else ``hub_id``, else the config's
        ``_name_or_path`` when it is a Hub id, else the folder's name (then ``base_model_is_hub_id`` is ``False``
        and the card carries no ``base_model`` metadata).

    Raises:
        ValueError: the folder holds no checkpoint, or ``base_model`` / ``hub_id`` is not a valid Hub id.

    Example:

    ```python
    >>> info = describe_source(Path("./tiny-llama"), base_model="me/tiny-llama")
    >>> info.kind, info.base_model, info.base_model_is_hub_id
    ('transformers', 'me/tiny-llama', True)
    ```
    """
    fix = "Pass the source's Hub id (owner/name), or leave it out for a local folder."
    if base_model is not None:
        check_hub_id(base_model, "base_model", fix)
    if hub_id is not None:
        check_hub_id(hub_id, "model", fix)
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
    is_hub = bool(name)
    if not name:
        name = path.name
        logger.warning("hf-specdef publish: base_model unknown for a local folder; using %r (pass base_model= / "
                       "--base-model with the source's Hub id)", name)
    class_name = class_name if isinstance(class_name, str) and class_name else "AutoModel"
    info = SourceInfo(path, hub_id, kind, class_name, name, base_model_is_hub_id=is_hub)
    info.license = _meta_str(getattr(card, "license", None)) or _meta_str(config.get("license"))
    info.license_name = _meta_str(getattr(card, "license_name", None))
    info.license_link = _meta_str(getattr(card, "license_link", None))
    info.language = _meta_language(getattr(card, "language", None))
    info.pipeline_tag = _meta_str(getattr(card, "pipeline_tag", None)) or _infer_pipeline_tag(kind, class_name, config)
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
