"""Saved folders loaded as a user without hf_specdef would: the stock class their config.json names, in float32
(or in the 16-bit dtype a downcasting user picks: :func:`compare_folders` measures what they would see).

A pipeline whose text encoder's final norm was folded into the denoiser (the pipeline-level norm site) keeps
only the composed function, text encoder then denoiser; :func:`composed_pipeline_output` computes that.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hf_specdef.analysis.downcast import allow_downcast
from hf_specdef.sites.diffusers import TEXT_ENCODER

if TYPE_CHECKING:
    from hf_specdef.analysis.verification import VerifyResult


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


def load_stock(path: Path, dtype: torch.dtype = torch.float32) -> Any:
    """Load a model folder with the stock class its config.json names (transformers ``AutoModel`` when it names
    none), in ``dtype`` (float32 by default; a 16-bit dtype passes the downcast guard on purpose)."""
    config = json.loads((Path(path) / "config.json").read_text())
    cls = stock_class(config)
    if cls is None:
        name = config.get("_class_name") or (config.get("architectures") or [None])[0]
        if name is not None:
            raise ValueError(f"{path}: class {name!r} from config.json is not in the installed transformers/diffusers.")
        import transformers

        cls = transformers.AutoModel
    key = "torch_dtype" if config.get("_class_name") else "dtype"
    with allow_downcast():  # measuring what a downcasting user sees: never refused here
        return cls.from_pretrained(str(path), **{key: dtype})


def has_text_encoder(root: Path) -> bool:
    """Whether the pipeline folder ``root`` has a text encoder component (its config.json)."""
    return (Path(root) / TEXT_ENCODER / "config.json").is_file()


def composed_pipeline_output(root: Path, component: str, seed: int,
                             dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.nn.Module]:
    """The denoiser's output on the probe batch of ``seed``, its ``encoder_hidden_states`` computed by the text
    encoder from probe token ids (as float64; both loaded in ``dtype``); and the loaded denoiser."""
    from hf_specdef.analysis import probe

    root = Path(root)
    comps = {TEXT_ENCODER: load_stock(root / TEXT_ENCODER, dtype), component: load_stock(root / component, dtype)}
    inputs = probe.probe_inputs(comps[component], seed)
    if "encoder_hidden_states" not in inputs:
        raise ValueError(f"{root / component}: this denoiser takes no encoder_hidden_states; compare it on its own.")
    ids = probe.text_ids(comps[TEXT_ENCODER], seed, inputs["encoder_hidden_states"].shape[0])
    return probe.composed_output(comps, component, inputs, ids).double(), comps[component]


def model_folder(path: str | Path) -> Path:
    """``path`` itself, or the denoiser component of a diffusers pipeline folder."""
    from hf_specdef.storage.checkpoint import CONFIG_NAME, PIPELINE_INDEX, CheckpointError, find_denoiser

    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such checkpoint folder.")
    if (p / PIPELINE_INDEX).is_file() and not (p / CONFIG_NAME).is_file():
        return find_denoiser(p)
    if not (p / CONFIG_NAME).is_file():
        raise CheckpointError(f"{p}: no {CONFIG_NAME}; verify needs a transformers/diffusers model folder.")
    return p


def is_composed(given: Path, model: Path) -> bool:
    """Whether ``given`` is a pipeline folder (``model`` its denoiser) with a text encoder."""
    return model.parent == Path(given) and has_text_encoder(model.parent)


def compare_folders(original: str | Path, protected: str | Path, tolerance: float,
                    dtype: torch.dtype = torch.float32) -> tuple[VerifyResult, torch.nn.Module]:
    """Load both folders with stock classes in ``dtype`` and compare them on a probe batch: two pipeline folders
    with a text encoder end to end (text encoder -> denoiser), other folders (or a pipeline's denoiser) on their
    own. Returns the result and the protected (denoiser) model."""
    from hf_specdef.analysis import probe
    from hf_specdef.analysis.verification import VerifyResult, verify
    from hf_specdef.config import SpecDefConfig

    orig, prot = model_folder(original), model_folder(protected)
    if is_composed(Path(original), orig) and is_composed(Path(protected), prot):
        seed = SpecDefConfig().seed
        ref, _ = composed_pipeline_output(orig.parent, orig.name, seed, dtype)
        got, denoiser = composed_pipeline_output(prot.parent, prot.name, seed, dtype)
        deviation = probe.max_relative_deviation(ref, got)
        return VerifyResult.of(deviation, tolerance, denoiser, f"text_encoder -> {prot.name}"), denoiser
    model = load_stock(prot, dtype)
    return verify(load_stock(orig, dtype), model, tolerance=tolerance), model
