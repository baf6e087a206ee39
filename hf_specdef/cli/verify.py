"""``hf-specdef verify ORIGINAL PROTECTED``: compare two checkpoints' outputs with stock loaders.

Both folders are loaded with the stock transformers class named by ``architectures`` in their
config.json (diffusers models: the class named by ``_class_name``), in float32, and compared on a
deterministic probe batch (:func:`hf_specdef.verify`). Two pipeline folders with a text encoder are
compared end to end, text encoder then denoiser: with the pipeline-level norm site folded, only that
composed function is kept (the denoiser alone is not).

``--dtype bfloat16|float16`` loads both in that dtype instead: what a user who downcasts the release sees
(a spectral, float32-only protection breaks there; the exit code says so). The unprotected model's own
deviation in that dtype (against itself in float32) is printed for scale.

With ``--quantize q8_0,q4_0,...`` every linear weight of both models is also quantized the same way (GGUF
formats through the ``gguf`` package, group-wise int8/int4) and the quantized protected model is compared with the
quantized original: max relative logit deviation, and for a causal LM with a tokenizer the greedy answer to a chat
prompt. The exit code is non-zero when any comparison fails.

Example::

    hf-specdef verify ./Llama-3.2-1B ./Llama-3.2-1B-specdef --tolerance 1e-4 --json
    hf-specdef verify ./Llama-3.2-1B ./Llama-3.2-1B-specdef --dtype bfloat16
    hf-specdef verify ./SmolLM2 ./SmolLM2-specdef --quantize q8_0,q4_0,int4-g128
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
                        help="max relative output deviation accepted (default: SpecDefConfig's tolerance, 1e-3)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="load both in this dtype (default float32); bfloat16/float16 measure what a user who "
                             "downcasts the release sees")
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
    from hf_specdef.config import QUANTIZATION_FORMATS

    names = tuple(f.strip() for f in value.split(",") if f.strip())
    names = QUANTIZATION_FORMATS if names == ("all",) else names
    bad = [f for f in names if f not in QUANTIZATION_FORMATS]
    if not names or bad:
        raise ValueError(f"--quantize {value!r}: use comma-separated formats among {QUANTIZATION_FORMATS} or 'all'.")
    return names


def run(args: argparse.Namespace) -> int:
    """Compare the two checkpoints; exit code 0 only when the deviation is within the tolerance."""
    import torch

    from hf_specdef.analysis.stock_loading import compare_folders, is_composed, load_stock, model_folder
    from hf_specdef.deformation.record import get_record

    if args.tolerance is None:
        from hf_specdef.config import SpecDefConfig

        args.tolerance = SpecDefConfig().tolerance
    if not args.tolerance > 0:
        raise ValueError(f"--tolerance {args.tolerance:g}: use a number > 0 (e.g. 1e-4).")
    dtype = getattr(torch, args.dtype)
    formats = quantize_formats(args.quantize) if getattr(args, "quantize", None) else ()
    original, protected = model_folder(args.original), model_folder(args.protected)
    quantized: list = []
    if formats and dtype != torch.float32:
        raise ValueError("--quantize compares the float32 models' quantized weights; run --dtype separately.")
    if formats and is_composed(Path(args.original), original) and is_composed(Path(args.protected), protected):
        raise ValueError("--quantize compares transformers models; for a pipeline, pass its component folders.")
    for folder in (original, protected):  # a config or shape the sites cannot use: one clear error, before loading
        check_folder(folder)
    result, prot = compare_folders(args.original, args.protected, args.tolerance, dtype)
    if formats:
        orig = load_stock(original)
        quantized = _quantized(orig, prot, formats, args, original)
    record = get_record(prot)
    baseline = baseline_deviation(args.original, dtype) if dtype != torch.float32 else None
    ok = result.ok and all(q.ok for q in quantized)
    if args.json:
        extra = {"quantized": [q.to_dict() for q in quantized]} if formats else {}
        print(json.dumps(result.to_dict() | {"protected_record": bool(record), "baseline_deviation": baseline} | extra
                         | {"all_ok": ok}, indent=2))
    else:
        print(result)
        for q in quantized:
            print(q)
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
    return 0 if ok else 1


def check_folder(folder: Path) -> None:
    """Refuse, before anything is loaded, a model folder whose config.json or tensor shapes contradict its
    architecture's sites (:class:`~hf_specdef.sites.ModelConfigError` / :class:`~hf_specdef.sites.TensorShapeError`,
    naming the file, field or tensor and the value), instead of the loader's own error. Folders the checks cannot
    read (no safetensors, an architecture the registry does not know) are left to the loader; a corrupted
    safetensors header or index, or a config.json that is not a JSON object, is refused
    (:class:`~hf_specdef.storage.checkpoint.CheckpointError`)."""
    from hf_specdef.config import SpecDefConfig
    from hf_specdef.protection.streaming.plan import checkpoint_pairs
    from hf_specdef.sites import NoSitesError
    from hf_specdef.storage.checkpoint import open_checkpoint

    if not Path(folder).is_dir() or not any(Path(folder).glob("*.safetensors")):
        return
    with open_checkpoint(folder) as ckpt:  # a corrupted header, index or config.json: CheckpointError, raised
        try:
            checkpoint_pairs(ckpt, SpecDefConfig())
        except NoSitesError:
            return


def _quantized(orig: torch.nn.Module, prot: torch.nn.Module, formats: tuple[str, ...], args: argparse.Namespace,
               folder: Path) -> list:
    """One :class:`~hf_specdef.analysis.quantized.QuantizedComparison` per format (greedy text for a causal LM
    whose folder has a tokenizer)."""
    if not formats:
        return []
    from hf_specdef.analysis.quantized import DEFAULT_PROMPT, compare_quantized

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


def baseline_deviation(original: str, dtype: torch.dtype) -> float | None:
    """Max relative deviation of the original model folder loaded in ``dtype`` from itself in float32 (``None`` for a
    pipeline folder compared end to end)."""

    from hf_specdef.analysis import probe
    from hf_specdef.analysis.stock_loading import has_text_encoder, load_stock, model_folder

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
