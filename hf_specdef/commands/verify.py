"""``hf-specdef verify ORIGINAL PROTECTED``: compare two checkpoints' outputs with stock loaders.

Both folders are loaded with the stock transformers class named by ``architectures`` in their
config.json (diffusers models: the class named by ``_class_name``), in float32, and compared on a
deterministic probe batch (:func:`hf_specdef.verify`). Two pipeline folders with a text encoder are
compared end to end, text encoder then denoiser: with the pipeline-level norm site folded, only that
composed function is kept (the denoiser alone is not).

``--dtype bfloat16|float16`` loads both in that dtype instead: what a user who downcasts the release sees
(a spectral, float32-only protection breaks there; the exit code says so). The unprotected model's own
deviation in that dtype (against itself in float32) is printed for scale.

Example::

    hf-specdef verify ./Llama-3.2-1B ./Llama-3.2-1B-specdef --tolerance 1e-4 --json
    hf-specdef verify ./Llama-3.2-1B ./Llama-3.2-1B-specdef --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``hf-specdef verify``."""
    parser.add_argument("original", metavar="ORIGINAL", help="the unprotected checkpoint folder")
    parser.add_argument("protected", metavar="PROTECTED", help="the protected checkpoint folder")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="max relative output deviation accepted (default: SpecDefConfig's tolerance)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="load both in this dtype (default float32); bfloat16/float16 measure what a user who "
                             "downcasts the release sees")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    """Compare the two checkpoints; exit code 0 only when the deviation is within the tolerance."""
    import torch

    from ..record import get_record
    from ..stock import compare_folders

    if args.tolerance is None:
        from ..config import SpecDefConfig

        args.tolerance = SpecDefConfig().tolerance
    if not args.tolerance > 0:
        raise ValueError(f"--tolerance {args.tolerance:g}: use a number > 0 (e.g. 1e-4).")
    dtype = getattr(torch, args.dtype)
    result, prot = compare_folders(args.original, args.protected, args.tolerance, dtype)
    record = get_record(prot)
    baseline = baseline_deviation(args.original, dtype) if dtype != torch.float32 else None
    if args.json:
        print(json.dumps(result.to_dict() | {"protected_record": bool(record), "baseline_deviation": baseline}, indent=2))
    else:
        print(result)
        if baseline is not None:  # the unprotected model's own rounding in that dtype
            print(f"for scale: the unprotected model in {args.dtype} deviates {baseline:.3e} from itself in float32")
        if not record:
            print("note: the protected folder carries no SpecDef protection record")
        elif record.get("pipeline") and result.compared == "model":
            print("note: this denoiser shares a pipeline-level pair with its text encoder: only text encoder -> denoiser "
                  "keeps the function; verify the two pipeline folders instead")
        if not result.ok and dtype != torch.float32:
            print(f"the protected release does not keep its function in {args.dtype}: load it in float32, or protect "
                  f"with precision='auto' on a {args.dtype} checkpoint for a protection exact in {args.dtype}")
    return 0 if result.ok else 1


def baseline_deviation(original: str, dtype: torch.dtype) -> float | None:
    """Max relative deviation of the original model folder loaded in ``dtype`` from itself in float32 (``None`` for a
    pipeline folder compared end to end)."""

    from .. import probe
    from ..stock import has_text_encoder, load_stock, model_folder

    folder = model_folder(original)
    if folder.parent == Path(original) and has_text_encoder(folder.parent):
        return None
    ref32, low = load_stock(folder), load_stock(folder, dtype)
    inputs = probe.probe_inputs(ref32)
    out = probe.run_probe(low, _cast(inputs, dtype))
    return probe.max_relative_deviation(probe.run_probe(ref32, inputs), out)


def _cast(obj: Any, dtype: torch.dtype) -> Any:
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    return obj.to(dtype) if hasattr(obj, "is_floating_point") and obj.is_floating_point() else obj
