"""Time of in-memory ``protect`` on a ~100M-parameter Llama built from a config, as a ratio to building it.

Interleaved runs in one process; prints medians, the ratio and a JSON line. Runs on GPU unchanged
(``--device cuda``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_specdef import SpecDefConfig, protect


def build(device: str) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).to(device).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-verify", action="store_true", help="skip the two probe forward passes")
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler's top operators of one protect")
    args = ap.parse_args()
    t_build, t_protect = [], []
    for _ in range(args.runs):
        torch.manual_seed(0)
        t0 = time.perf_counter()
        model = build(args.device)
        t1 = time.perf_counter()
        report = protect(model, SpecDefConfig(), verify=not args.no_verify, progress=False)
        t2 = time.perf_counter()
        t_build.append(t1 - t0)
        t_protect.append(t2 - t1)
    n_params = sum(p.numel() for p in model.parameters())
    out = {"params": n_params, "device": args.device, "pairs": len(report.results), "deviation": report.deviation,
           "build_s": statistics.median(t_build), "protect_s": statistics.median(t_protect),
           "ratio_protect_over_build": statistics.median(t_protect) / statistics.median(t_build)}
    print(f"{n_params / 1e6:.0f}M params on {args.device}: build {out['build_s']:.2f}s, protect {out['protect_s']:.2f}s "
          f"({len(report.results)} pairs, deviation {report.deviation}) -> ratio {out['ratio_protect_over_build']:.2f}")
    print(json.dumps(out))
    if args.profile:
        profile_once(args)


def profile_once(args: argparse.Namespace) -> None:
    """torch.profiler's operator table of one ``protect`` (host time, and device time on CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    model = build(args.device)
    cuda = torch.device(args.device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        protect(model, SpecDefConfig(), verify=not args.no_verify, progress=False)
    for key in ["self_cpu_time_total"] + (["self_device_time_total"] if cuda else []):
        print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=40))


if __name__ == "__main__":
    main()
