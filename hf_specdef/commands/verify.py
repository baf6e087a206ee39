"""``hf-specdef verify ORIGINAL PROTECTED``: compare two checkpoints' outputs with stock loaders.

Both folders are loaded with the stock transformers class named by ``architectures`` in their
config.json (diffusers models: the class named by ``_class_name``), in float32, and compared on a
deterministic probe batch (:func:`hf_specdef.verify`). Two pipeline folders with a text encoder are
compared end to end, text encoder then denoiser: with the pipeline-level norm site folded, only that
composed function is kept (the denoiser alone is not).

Example::

    hf-specdef verify ./Llama-3.2-1B ./Llama-3.2-1B-specdef --tolerance 1e-4 --json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from ..verification import VerifyResult


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``hf-specdef verify``."""
    parser.add_argument("original", metavar="ORIGINAL", help="the unprotected checkpoint folder")
    parser.add_argument("protected", metavar="PROTECTED", help="the protected checkpoint folder")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="max relative output deviation accepted (default: SpecDefConfig's tolerance)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def model_folder(path: str) -> Path:
    """``path`` itself, or the denoiser component of a diffusers pipeline folder."""
    from ..checkpoint import CONFIG_NAME, PIPELINE_INDEX, CheckpointError, find_denoiser

    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such checkpoint folder.")
    if (p / PIPELINE_INDEX).is_file() and not (p / CONFIG_NAME).is_file():
        return find_denoiser(p)
    if not (p / CONFIG_NAME).is_file():
        raise CheckpointError(f"{p}: no {CONFIG_NAME}; verify needs a transformers/diffusers model folder.")
    return p


def run(args: argparse.Namespace) -> int:
    """Compare the two checkpoints; exit code 0 only when the deviation is within the tolerance."""
    from ..record import get_record
    from ..stock import load_stock
    from ..verification import verify

    if args.tolerance is None:
        from ..config import SpecDefConfig

        args.tolerance = SpecDefConfig().tolerance
    if not args.tolerance > 0:
        raise ValueError(f"--tolerance {args.tolerance:g}: use a number > 0 (e.g. 1e-4).")
    original, protected = model_folder(args.original), model_folder(args.protected)
    if _composed(args.original, original) and _composed(args.protected, protected):
        result, prot = verify_composed(original, protected, args.tolerance)
    else:
        prot = load_stock(protected)
        result = verify(load_stock(original), prot, tolerance=args.tolerance)
    record = get_record(prot)
    if args.json:
        print(json.dumps(result.to_dict() | {"protected_record": bool(record)}, indent=2))
    else:
        print(result)
        if not record:
            print("note: the protected folder carries no SpecDef protection record")
        elif record.get("pipeline") and result.compared == "model":
            print("note: this denoiser shares a pipeline-level pair with its text encoder: only text encoder -> denoiser "
                  "keeps the function; verify the two pipeline folders instead")
    return 0 if result.ok else 1


def _composed(given: str, model: Path) -> bool:
    """Whether ``given`` is a pipeline folder (``model`` its denoiser) with a text encoder."""
    from ..stock import has_text_encoder

    return model.parent == Path(given) and has_text_encoder(model.parent)


def verify_composed(original: Path, protected: Path, tolerance: float) -> tuple[VerifyResult, torch.nn.Module]:
    """Compare two pipelines' denoisers fed by their own text encoders; the result and the protected denoiser."""
    from .. import probe
    from ..config import SpecDefConfig
    from ..stock import composed_pipeline_output
    from ..verification import VerifyResult

    seed = SpecDefConfig().seed
    ref, _ = composed_pipeline_output(original.parent, original.name, seed)
    got, denoiser = composed_pipeline_output(protected.parent, protected.name, seed)
    deviation = probe.max_relative_deviation(ref, got)
    return VerifyResult.of(deviation, tolerance, denoiser, f"text_encoder -> {protected.name}"), denoiser
