"""``hf-specdef verify ORIGINAL PROTECTED``: compare two checkpoints' outputs with stock loaders.

Both folders are loaded with the stock transformers class named by ``architectures`` in their
config.json (diffusers models: the class named by ``_class_name``), in float32, and compared on a
deterministic probe batch (:func:`hf_specdef.verify`).

Example::

    hf-specdef verify ./Llama-3.2-1B ./Llama-3.2-1B-specdef --tolerance 1e-4 --json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


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


def load_stock(path: Path) -> Any:
    """Load a model folder with the stock class its config names, in float32."""
    import torch

    config = json.loads((path / "config.json").read_text())
    if config.get("_class_name"):
        import diffusers

        cls, key = getattr(diffusers, config["_class_name"], None), "torch_dtype"
        name = config["_class_name"]
    else:
        import transformers

        archs = config.get("architectures") or []
        name = archs[0] if archs else None
        cls, key = (getattr(transformers, name, None) if name else transformers.AutoModel), "dtype"
    if cls is None:
        raise ValueError(f"{path}: class {name!r} from config.json is not in the installed transformers/diffusers.")
    return cls.from_pretrained(str(path), **{key: torch.float32})


def run(args: argparse.Namespace) -> int:
    """Compare the two checkpoints; exit code 0 only when the deviation is within the tolerance."""
    from ..record import get_record
    from ..verification import verify

    if args.tolerance is None:
        from ..config import SpecDefConfig

        args.tolerance = SpecDefConfig().tolerance
    if not args.tolerance > 0:
        raise ValueError(f"--tolerance {args.tolerance:g}: use a number > 0 (e.g. 1e-4).")
    original, protected = model_folder(args.original), model_folder(args.protected)
    ref, prot = load_stock(original), load_stock(protected)
    result = verify(ref, prot, tolerance=args.tolerance)
    record = get_record(prot)
    if args.json:
        print(json.dumps(result.to_dict() | {"protected_record": bool(record)}, indent=2))
    else:
        print(result)
        if not record:
            print("note: the protected folder carries no SpecDef protection record")
    return 0 if result.ok else 1
