"""Saved folders loaded as a user without hf_specdef would: the stock class their config.json names, in float32.

A pipeline whose text encoder's final norm was folded into the denoiser (the pipeline-level norm site) keeps
only the composed function, text encoder then denoiser; :func:`composed_pipeline_output` computes that.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

TEXT_ENCODER = "text_encoder"


def load_stock(path: Path) -> Any:
    """Load a model folder with the stock transformers/diffusers class its config.json names, in float32."""
    config = json.loads((Path(path) / "config.json").read_text())
    if config.get("_class_name"):
        import diffusers

        name = config["_class_name"]
        cls, key = getattr(diffusers, name, None), "torch_dtype"
    else:
        import transformers

        archs = config.get("architectures") or []
        name = archs[0] if archs else None
        cls, key = (getattr(transformers, name, None) if name else transformers.AutoModel), "dtype"
    if cls is None:
        raise ValueError(f"{path}: class {name!r} from config.json is not in the installed transformers/diffusers.")
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
