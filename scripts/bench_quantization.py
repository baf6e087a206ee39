#!/usr/bin/env python
"""Do protected releases survive quantization? (issue #20)

Loads a causal LM (e.g. SmolLM2-135M-Instruct saved as bf16 safetensors), protects copies of it in its own dtype
with each configuration, then quantizes every linear weight of the original and of each protected copy the same
way (GGUF Q8_0/Q4_0/... through the ``gguf`` package, group-wise int8/int4-g128) and reports, per format:

* ``dev_q``: max relative logit deviation of the quantized protected model from the quantized original (the figure
  that matters; 0 when quantization cannot see the deformation);
* ``err``: deviation of the quantized model from the float original, for the original ("what quantization costs")
  and each protected copy, and their ratio (target <= 1.1);
* whether the greedy answer to a chat prompt is the same as the quantized original's.

The float path is checked too (``float_dev``: protected vs original in the storage dtype, bit-exact expected).
Logits are taken on the chat-templated prompt. ``--per-site`` adds one row per site type alone (which sites survive
which formats).

    python scripts/bench_quantization.py /work/cache/smollm2/bf16 --json-out quant.json
    python scripts/bench_quantization.py /work/cache/smollm2/bf16 --per-site --formats q8_0,q4_0,int4-g128
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from typing import Any

DEFAULT_FORMATS = "q8_0,q4_0,int4-g128,int8-g128"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="folder of a causal LM with a tokenizer (e.g. /work/cache/smollm2/bf16)")
    p.add_argument("--formats", default=DEFAULT_FORMATS, help=f"formats to measure (default {DEFAULT_FORMATS})")
    p.add_argument("--alpha", type=float, default=1024.0, help="alpha of every configuration (default 1024)")
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--per-site", action="store_true", help="also each site type alone, default and quantization-safe")
    p.add_argument("--json-out", default=None, help="write all rows as JSON here")
    return p.parse_args(argv)


def configs(alpha: float, formats: tuple[str, ...], per_site: bool) -> dict[str, Any]:
    from hf_specdef import SpecDefConfig

    out = {
        "default protection (axis)": SpecDefConfig(alpha=alpha, mode="axis"),
        "quantization-safe": SpecDefConfig(alpha=alpha, mode="axis", quantization_safe=formats),
    }
    if per_site:
        for site in ("attn.vo", "attn.qk", "mlp", "norm"):
            out[f"default, {site} only"] = SpecDefConfig(alpha=alpha, mode="axis", sites=(site,))
            out[f"quantization-safe, {site} only"] = SpecDefConfig(alpha=alpha, mode="axis", sites=(site,),
                                                                   quantization_safe=formats)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_specdef import protect
    from hf_specdef.analysis.quantized import chat_ids, compare_quantized, greedy_text
    from hf_specdef.cli.verify import quantize_formats

    formats = quantize_formats(args.formats)
    tok = AutoTokenizer.from_pretrained(args.model)
    original = AutoModelForCausalLM.from_pretrained(args.model).eval()
    dtype = original.dtype
    inputs = {"input_ids": chat_ids(tok, args.prompt)}
    rows: list[dict[str, Any]] = []
    # unprotected: the quantization error itself and the quantized original's text
    ref32 = copy.deepcopy(original).float()
    float_text = greedy_text(ref32, tok, args.prompt, args.max_new_tokens)
    print(f"float original text {float_text!r}", flush=True)
    base = {f: compare_quantized(ref32, ref32, f, tolerance=1e-3, inputs=inputs, tokenizer=tok, prompt=args.prompt,
                                 max_new_tokens=args.max_new_tokens) for f in formats}
    for f, q in base.items():
        rows.append({"config": "unprotected", "format": f, "dev_q": 0.0, "err": q.quantization_error, "ratio": 1.0,
                     "same_text": True, "text": q.text_original, "float_dev": 0.0, "pairs": 0, "skipped": 0})
        print(f"unprotected {f:<10} err {q.quantization_error:.3e} text {q.text_original!r}", flush=True)
    for name, cfg in configs(args.alpha, formats, args.per_site).items():
        model = copy.deepcopy(original)
        t0 = time.perf_counter()
        report = protect(model, cfg, progress=False)
        secs = time.perf_counter() - t0
        sites = report.sites
        model.float()
        for f in formats:
            q = compare_quantized(ref32, model, f, tolerance=1e-3, inputs=inputs, tokenizer=tok, prompt=args.prompt,
                                  max_new_tokens=args.max_new_tokens)
            ratio = q.protected_error / q.quantization_error if q.quantization_error else float("nan")
            rows.append({"config": name, "format": f, "dev_q": q.deviation, "err": q.protected_error, "ratio": ratio,
                         "same_text": q.same_text, "text": q.text_protected, "float_dev": report.deviation,
                         "pairs": len(report.results), "sites": sites, "skipped": len(report.skipped),
                         "protect_seconds": secs, "safe_formats": list(cfg.quantization_safe)})
            print(f"{name} {f:<10} dev_q {q.deviation:.3e} err {q.protected_error:.3e} ({ratio:.3g}x) "
                  f"same text {q.same_text} float dev {report.deviation} pairs {sites} skipped {len(report.skipped)}",
                  flush=True)
        if cfg.quantization_safe:
            for line in sorted(set(report.notes)) + report.skipped[:6]:
                print("   ", line)
        del model
    print("\n| model | format | dev vs quantized original | dev vs float (ratio to unprotected) | same greedy text |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['format']} | {r['dev_q']:.3g} | {r['err']:.3g} ({r['ratio']:.3g}x) | "
              f"{'yes' if r['same_text'] else 'no: ' + repr(r['text'][:40])} |")
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump({"model": args.model, "dtype": str(dtype), "alpha": args.alpha, "float_text": float_text,
                       "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
