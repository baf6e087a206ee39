#!/usr/bin/env python
"""Load-time overhead of SpecDef (see docs/performance.md): plain ``from_pretrained`` vs ``from_pretrained(specdef_config=...)``.

Builds a ~100M-parameter Llama-style model from a config (no download), saves it in a temporary
directory, then interleaves ``--runs`` loads of each kind and reports median wall times, their
ratio (target <= 1.15 on CPU, <= 1.05 on GPU), the same for load + first forward pass ("time to first
output"), and memory (RSS right after each load and the process high-water mark; peak CUDA memory with
``--device cuda``), as one JSON object and one line of text.

Note (transformers 5.x, CPU): a plain ``from_pretrained`` of float32 safetensors maps the file and copies
nothing, so its weights are not even resident after loading; any protection writes the deformed
matrices, which materializes them (copy-on-write page faults, or a fresh copy, which is cheaper) — that, and
the verification's two forward passes, is most of the overhead. "Time to first output" compares with a plain load that has
paid for reading its weights, and the "floor" run (plain load, then one in-place no-op write of every
weight matrix but the embeddings) measures what any in-place protection must pay at least; the "copy floor"
(plain load, then a fresh copy of those matrices) what one that copies them first must pay.

    python scripts/bench_load.py --runs 5
    python scripts/bench_load.py --device cuda --runs 5 --json-out bench_load.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
from _llama_shape import add_llama_shape_args, llama_config  # scripts/_llama_shape.py


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="device for device_map (cpu, cuda, cuda:0, auto); default cpu")
    p.add_argument("--runs", type=int, default=5, help="interleaved runs of each kind (default 5)")
    add_llama_shape_args(p, hidden=768, layers=12, intermediate=2048, heads=12, kv_heads=4, vocab=32000)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--alpha", type=float, default=1000.0)
    p.add_argument("--sites", default="attn.vo,attn.qk,mlp,norm", help="comma-separated site types")
    p.add_argument("--mode", default="spectral", choices=["spectral", "axis"])
    p.add_argument("--tolerance", type=float, default=None, help="verification tolerance (default: the SpecDefConfig default)")
    p.add_argument("--precision", default="refuse", choices=["refuse", "axis", "float32"])
    p.add_argument("--no-verify", action="store_true", help="skip the probe verification (two forward passes)")
    p.add_argument("--profile", action="store_true", help="print a cProfile summary of one protected load")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the parts of protection on a loaded model: probe forward, deformation per site type")
    p.add_argument("--json-out", default=None, help="also write the JSON result to this file")
    return p.parse_args(argv)


def build_and_save(args: argparse.Namespace, directory: str) -> int:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = llama_config(args, 2048)
    model = LlamaForCausalLM(config).to(getattr(torch, args.dtype))
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(directory)
    del model
    gc.collect()
    return n


def rss_peak_mib() -> float:
    """Peak resident set size of this process so far (MiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def rss_now_mib() -> float | None:
    """Current resident set size (MiB), from /proc or psutil; None where neither is available."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, AttributeError):
        pass
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        return None


def sync(device: str) -> None:
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


def cost_breakdown(directory: str, common: dict[str, Any], cfg: Any, device: str) -> dict[str, float]:
    """Median seconds of each part of a protected load, measured on a plain loaded model."""
    from transformers import AutoModelForCausalLM

    from hf_specdef.analysis import probe
    from hf_specdef.protection.in_memory import protect_model

    model = AutoModelForCausalLM.from_pretrained(directory, **common)
    inputs = probe.probe_inputs(model)

    def timed(fn: Any) -> float:
        out = []
        for _ in range(3):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            out.append(time.perf_counter() - t0)
        return statistics.median(out)

    parts = {"probe_forward": timed(lambda: probe.run_probe(model, inputs))}
    for site in list(cfg.sites) + ["all"]:
        sub = cfg if site == "all" else cfg.replace(sites=[site])

        def run(sub: Any = sub) -> None:
            model.config.specdef = None
            protect_model(model, sub, verify=False, progress=False)

        parts[f"deform_{site}"] = timed(run)  # re-deforms the same model: the cost, not the result, matters here
    return parts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import hf_specdef  # noqa: F401  (installs the from_pretrained hook)
    from hf_specdef import SpecDefConfig

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    extra = {} if args.tolerance is None else {"tolerance": args.tolerance}
    cfg = SpecDefConfig(alpha=args.alpha, sites=tuple(args.sites.split(",")), mode=args.mode, precision=args.precision,
                        **extra)
    from hf_specdef.integrations.transformers import SpecDefQuantizationConfig

    spec = SpecDefQuantizationConfig(cfg, verify=not args.no_verify)
    common: dict[str, Any] = {"device_map": args.device, "dtype": getattr(torch, args.dtype)}
    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())

    with tempfile.TemporaryDirectory(prefix="specdef-bench-") as directory:
        n_params = build_and_save(args, directory)
        rss_before = rss_peak_mib()

        ids = torch.randint(0, args.vocab, (2, 16), generator=torch.Generator().manual_seed(0))

        def load(kind: str) -> dict[str, float | None]:
            """One timed load: ``plain``, ``specdef`` (protected) or ``touch`` (the floor)."""
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            gc.collect()
            sync(args.device)
            t0 = time.perf_counter()
            kw = dict(common, specdef_config=spec) if kind == "specdef" else common
            model = AutoModelForCausalLM.from_pretrained(directory, **kw)
            if kind in ("touch", "copy"):  # the floors: write every matrix once in place (no-op), or a fresh copy
                skip = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
                with torch.no_grad():
                    for p in model.parameters():
                        if p.dim() == 2 and id(p) not in skip:
                            if kind == "touch":
                                p.mul_(1.0)
                            else:
                                p.data = p.data.clone()
            sync(args.device)
            t1 = time.perf_counter()
            rss = rss_now_mib()
            with torch.no_grad():
                model(input_ids=ids.to(model.get_input_embeddings().weight.device))
            sync(args.device)
            t2 = time.perf_counter()
            peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
            del model
            return {"load": t1 - t0, "first_output": t2 - t0, "rss_after_load": rss, "cuda_peak": peak}

        load("plain")  # warm-up: file cache, lazy imports
        load("specdef")
        if args.profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            load("specdef")
            prof.disable()
            pstats.Stats(prof).sort_stats("cumulative").print_stats(35)
        breakdown = cost_breakdown(directory, common, cfg, args.device) if args.breakdown else None
        runs: dict[str, list[dict[str, float | None]]] = {"plain": [], "specdef": [], "touch": [], "copy": []}
        for i in range(args.runs):
            order = ("plain", "specdef", "touch", "copy") if i % 2 == 0 else ("copy", "touch", "specdef", "plain")
            for kind in order:
                runs[kind].append(load(kind))

    def median(kind: str, key: str) -> float | None:
        vals = [r[key] for r in runs[kind] if r[key] is not None]
        return statistics.median(vals) if vals else None

    med = {k: median(k, "load") for k in runs}
    first = {k: median(k, "first_output") for k in runs}
    result = {
        "device": args.device,
        "dtype": args.dtype,
        "params": n_params,
        "runs": args.runs,
        "config": cfg.to_dict(),
        "verify": not args.no_verify,
        "median_load_s": med,
        "ratio": med["specdef"] / med["plain"],
        "median_first_output_s": first,
        "ratio_first_output": first["specdef"] / first["plain"],
        # plain load + one in-place no-op write of every weight matrix protection writes: the floor of any
        # in-place protection on a memory-mapped load (copy-on-write materializes the pages)
        "ratio_floor": med["touch"] / med["plain"],
        "ratio_vs_floor": med["specdef"] / med["touch"],
        # plain load + a fresh copy of every such matrix: cheaper than writing in place on a mapped load (no
        # copy-on-write faults), what protection pays at least when it copies the matrices it deforms
        "ratio_copy_floor": med["copy"] / med["plain"],
        "ratio_vs_copy_floor": med["specdef"] / med["copy"],
        "ratio_vs_lower_floor": med["specdef"] / min(med["touch"], med["copy"]),
        "target": 1.05 if cuda else 1.15,
        "load_s": {k: [r["load"] for r in v] for k, v in runs.items()},
        "rss_after_load_mib": {k: median(k, "rss_after_load") for k in runs},
        "rss_peak_mib_after_save": rss_before,
        "rss_peak_mib": rss_peak_mib(),
        "cuda_peak_mib": {k: median(k, "cuda_peak") for k in runs} if cuda else None,
        "torch_threads": torch.get_num_threads(),
        "breakdown_s": breakdown,
    }
    result["within_target"] = result["ratio"] <= result["target"]
    print(json.dumps(result, indent=2))
    if cuda:
        mem = (f"peak CUDA plain {result['cuda_peak_mib']['plain']:.0f} MiB / specdef "
               f"{result['cuda_peak_mib']['specdef']:.0f} MiB")
    else:
        rss = result["rss_after_load_mib"]
        mem = f"RSS after load plain {rss['plain'] or 0:.0f} MiB / specdef {rss['specdef'] or 0:.0f} MiB, peak RSS " \
              f"{result['rss_peak_mib']:.0f} MiB"
    print(f"bench_load: {n_params / 1e6:.1f}M params on {args.device}: load plain {med['plain']:.3f}s, specdef "
          f"{med['specdef']:.3f}s, ratio {result['ratio']:.2f} (target <= {result['target']}); to first output plain "
          f"{first['plain']:.3f}s, specdef {first['specdef']:.3f}s, ratio {result['ratio_first_output']:.2f}; "
          f"floor (plain load + no-op write of every matrix) {med['touch']:.3f}s = {result['ratio_floor']:.2f}x plain, "
          f"specdef = {result['ratio_vs_floor']:.2f}x floor; copy floor (plain load + a fresh copy of every matrix) "
          f"{med['copy']:.3f}s, specdef = {result['ratio_vs_copy_floor']:.2f}x copy floor; {mem}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
