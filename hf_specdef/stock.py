"""Saved folders loaded as a user without hf_specdef would: the stock class their config.json names, in float32.

A pipeline whose text encoder's final norm was folded into the denoiser (the pipeline-level norm site) keeps
only the composed function, text encoder then denoiser; :func:`composed_pipeline_output` computes that.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .sites.diffusers import TEXT_ENCODER


def stock_class(config: Mapping[str, Any]) -> Any | None:
    """The class a config.json names (diffusers ``_class_name``, else transformers ``architectures[0]``), or
    ``None`` when it names none that the installed library has."""
    if config.get("_class_name"):
        import diffusers

        return getattr(diffusers, config["_class_name"], None)
    archs = config.get("architectures") or []
    if not archs:
        return None
    import transformers

    return getattr(transformers, archs[0], None)


def load_stock(path: Path) -> Any:
    """Load a model folder with the stock class its config.json names (transformers ``AutoModel`` when it names
    none), in float32."""
    config = json.loads((Path(path) / "config.json").read_text())
    cls = stock_class(config)
    if cls is None:
        name = config.get("_class_name") or (config.get("architectures") or [None])[0]
        if name is not None:
            raise ValueError(f"{path}: class {name!r} from config.json is not in the installed transformers/diffusers.")
        import transformers

        cls = transformers.AutoModel
    key = "torch_dtype" if config.get("_class_name") else "dtype"
    return cls.from_pretrained(str(path), **{key: torch.float32})


def has_text_encoder(root: Path) -> bool:
    """Whether the pipeline folder ``root`` has a text encoder component (its config.json)."""
    return (Path(root) / TEXT_ENCODER / "config.json").is_file()


def composed_pipeline_output(root: Path, component: str, seed: int) -> tuple[torch.Tensor, torch.nn.Module]:
    """The denoiser's output on the probe batch of ``seed``, its ``encoder_hidden_states`` computed by the text
    encoder from probe token ids (float64); and the loaded denoiser."""
    from . import probe
    from .integrations.diffusers import composed_output, text_ids

    root = Path(root)
    comps = {TEXT_ENCODER: load_stock(root / TEXT_ENCODER), component: load_stock(root / component)}
    inputs = probe.probe_inputs(comps[component], seed)
    if "encoder_hidden_states" not in inputs:
        raise ValueError(f"{root / component}: this denoiser takes no encoder_hidden_states; compare it on its own.")
    ids = text_ids(comps[TEXT_ENCODER], seed, inputs["encoder_hidden_states"].shape[0])
    return composed_output(comps, component, inputs, ids).double(), comps[component]
