"""``hf-specdef verify ORIGINAL PROTECTED``: compare two checkpoints' outputs with stock loaders.

Both folders are loaded with the stock transformers class named by ``architectures`` in their
config.json (diffusers models: the class named by ``_class_name``), in float32, and compared on a
deterministic probe batch (:func:`hf_specdef.verify`). Two pipeline folders with a text encoder are
compared end to end, text encoder then denoiser: with the pipeline-level norm site folded, only that
composed function is kept (the denoiser alone is not).

With ``--quantize q8_0,q4_0,...`` every linear weight of both models is also quantized the same way (GGUF
formats through the ``gguf`` package, group-wise int8/int4) and the quantized protected model is compared with the
quantized original: max relative logit deviation, and for a causal LM with a tokenizer the greedy answer to a chat
prompt. The exit code is non-zero when any comparison fails.

Example::

    hf-specdef verify ./Llama-3.2-1B ./Llama-3.2-1B-specdef --tolerance 1e-4 --json
    hf-specdef verify ./SmolLM2 ./SmolLM2-specdef --quantize q8_0,q4_0,int4-g128
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
    parser.add_argument("--quantize", default=None, metavar="FORMATS",
                        help="also compare both models quantized the same way: comma-separated formats among "
                             "q8_0,q4_0,q4_1,q5_0,int8-g128,int4-g128 (or 'all')")
    parser.add_argument("--prompt", default=None,
                        help="chat prompt for the greedy-text comparison with --quantize (default: 'What is the "
                             "capital of France?')")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="greedy tokens generated with --quantize")


def quantize_formats(value: str) -> tuple[str, ...]:
    """The formats of ``--quantize`` (validated like ``SpecDefConfig.quantization_safe``)."""
    from ..config import QUANTIZATION_FORMATS

    names = tuple(f.strip() for f in value.split(",") if f.strip())
    names = QUANTIZATION_FORMATS if names == ("all",) else names
    bad = [f for f in names if f not in QUANTIZATION_FORMATS]
    if not names or bad:
        raise ValueError(f"--quantize {value!r}: use comma-separated formats among {QUANTIZATION_FORMATS} or 'all'.")
    return names


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
    formats = quantize_formats(args.quantize) if getattr(args, "quantize", None) else ()
    original, protected = model_folder(args.original), model_folder(args.protected)
    quantized: list = []
    if _composed(args.original, original) and _composed(args.protected, protected):
        if formats:
            raise ValueError("--quantize compares transformers models; for a pipeline, pass its component folders.")
        result, prot = verify_composed(original, protected, args.tolerance)
    else:
        prot, orig = load_stock(protected), load_stock(original)
        result = verify(orig, prot, tolerance=args.tolerance)
        quantized = _quantized(orig, prot, formats, args, original)
    record = get_record(prot)
    ok = result.ok and all(q.ok for q in quantized)
    if args.json:
        extra = {"quantized": [q.to_dict() for q in quantized]} if formats else {}
        print(json.dumps(result.to_dict() | {"protected_record": bool(record)} | extra | {"all_ok": ok}, indent=2))
    else:
        print(result)
        for q in quantized:
            print(q)
        if not record:
            print("note: the protected folder carries no SpecDef protection record")
        elif record.get("pipeline") and result.compared == "model":
            print("note: this denoiser shares a pipeline-level pair with its text encoder: only text encoder -> denoiser "
                  "keeps the function; verify the two pipeline folders instead")
    return 0 if ok else 1


def _quantized(orig: torch.nn.Module, prot: torch.nn.Module, formats: tuple[str, ...], args: argparse.Namespace,
               folder: Path) -> list:
    """One :class:`~hf_specdef.quantization.compare.QuantizedComparison` per format (greedy text for a causal LM
    whose folder has a tokenizer)."""
    if not formats:
        return []
    from ..quantization.compare import DEFAULT_PROMPT, compare_quantized

    tokenizer = _tokenizer(folder) if hasattr(orig, "generate") and getattr(orig, "can_generate", lambda: False)() else None
    return [compare_quantized(orig, prot, f, tolerance=args.tolerance, tokenizer=tokenizer,
                              prompt=args.prompt or DEFAULT_PROMPT, max_new_tokens=args.max_new_tokens)
            for f in formats]


def _tokenizer(folder: Path) -> object | None:
    """The folder's tokenizer, or None when it has none."""
    if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


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
