"""Benchmark: streaming ``protect_checkpoint`` vs a plain shard-by-shard safetensors load + save (see docs/performance.md).

A Llama checkpoint of a few hundred MB is built from a config (random weights) and saved in shards
with ``max_shard_size``. Then, interleaved (the order rotated every round, so that no kind always runs
right after another) and each in a fresh process (so peak RSS is its own):

* ``plain``: for every shard, ``safetensors.torch.load_file`` + ``save_file`` (and copy the small files);
  note that ``load_file`` memory-maps lazily, so this is essentially a file copy;
* ``plain_read``: the same, but every tensor read into memory first (``safe_open(...).get_tensor``);
* ``stream``: ``hf_specdef.protect_checkpoint(src, dst, SpecDefConfig(...))`` with verification on.

Reported: median seconds and throughput (MB/s of checkpoint) of each, the ratio stream / plain
(target >= 0.5), the largest shard, and peak RSS above the process's RSS after imports (target:
about two shards or less).

Usage::

    OMP_NUM_THREADS=1 python scripts/bench_streaming.py --layers 6 --hidden 1024 --shard-size 100MB --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _llama_shape import add_llama_shape_args, llama_config  # scripts/_llama_shape.py


def _status(key: str) -> int:
    """A ``/proc/self/status`` memory figure in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def build_checkpoint(root: Path, args: argparse.Namespace) -> Path:
    import torch
    from transformers import LlamaForCausalLM

    src = root / "src"
    torch.manual_seed(0)
    config = llama_config(args, 256)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.dim() == 1 else torch.randn_like(p) * 0.02)
    model = model.to(getattr(torch, args.dtype))
    model.save_pretrained(str(src), max_shard_size=args.shard_size)
    return src


def worker(kind: str, src: Path, dst: Path, opts: dict) -> dict:
    """One timed run in this process; returns seconds and memory figures."""
    import torch  # noqa: F401  (imports before the RSS baseline)
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from hf_specdef import SpecDefConfig, protect_checkpoint

    reset = _reset_peak()
    rss0 = _status("VmRSS")
    cpu0 = os.times()
    start = time.perf_counter()
    if kind in ("plain", "plain_read"):
        dst.mkdir(parents=True)
        for f in sorted(src.iterdir()):
            if f.suffix == ".safetensors":
                with safe_open(str(f), framework="pt") as h:
                    meta = h.metadata()
                    # plain_read: every tensor read into memory (get_tensor); plain: load_file (memory-mapped, lazy)
                    tensors = {k: h.get_tensor(k) for k in h.keys()} if kind == "plain_read" else load_file(str(f))
                save_file(tensors, str(dst / f.name), metadata=meta)
                del tensors
            else:
                shutil.copy2(f, dst / f.name)
        extra = {}
    else:
        import threading

        from hf_specdef.deformation import engine

        # measurement only: time spent in the core's report-only sigma_1 estimate (engine.sigma_max)
        real_sigma, lock, spent = engine.sigma_max, threading.Lock(), [0.0]

        def timed_sigma(block):
            t = time.perf_counter()
            try:
                return real_sigma(block)
            finally:
                with lock:
                    spent[0] += time.perf_counter() - t

        engine.sigma_max = timed_sigma
        cfg = SpecDefConfig(**opts["cfg"])
        rep = protect_checkpoint(src, dst, cfg, device=opts.get("device"), progress=False)
        extra = {"pairs": len(rep.results), "peak_cached_bytes": rep.peak_cached_bytes, "tensor_error": rep.tensor_error,
                 "sigma_max_seconds": spent[0]}
    seconds = time.perf_counter() - start
    cpu1 = os.times()  # all threads of this process: user (torch, Python) and system (page cache copies, faults)
    return {"kind": kind, "seconds": seconds, "user": cpu1.user - cpu0.user, "sys": cpu1.system - cpu0.system,
            "rss_start": rss0, "peak_rss": _status("VmHWM"), "peak_reset": reset, **extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_llama_shape_args(ap, hidden=1024, layers=6, intermediate=2816, heads=16, kv_heads=4, vocab=16000)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--shard-size", default="100MB")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=1000.0)
    ap.add_argument("--mode", default="spectral", choices=("spectral", "axis"))
    ap.add_argument("--device", default=None)
    ap.add_argument("--workdir", default=None, help="where to build the checkpoint (default: a temp folder)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", nargs=3, metavar=("KIND", "SRC", "DST"), help=argparse.SUPPRESS)
    ap.add_argument("--opts", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        kind, src, dst = args.worker
        print(json.dumps(worker(kind, Path(src), Path(dst), json.loads(args.opts))))
        return

    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-streaming-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        src = build_checkpoint(root, args)
        shards = sorted(src.glob("*.safetensors"))
        total = sum(f.stat().st_size for f in shards)
        largest = max(f.stat().st_size for f in shards)
        print(f"checkpoint: {total / 1e6:.0f} MB in {len(shards)} shards (largest {largest / 1e6:.0f} MB), {args.dtype}, "
              f"built in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        cfg = {"alpha": args.alpha, "mode": args.mode}
        if args.dtype != "float32" and args.mode == "spectral":
            cfg["precision"] = "axis"  # spectral mode would exceed the precision budget in 16-bit formats
        opts = json.dumps({"cfg": cfg, "device": args.device})
        runs: dict[str, list[dict]] = {"plain": [], "plain_read": [], "stream": []}
        for i in range(args.repeats):
            kinds = list(runs)
            for kind in kinds[i % len(kinds):] + kinds[:i % len(kinds)]:  # interleaved, the order rotated every round
                dst = root / f"{kind}-{i}"
                os.sync()  # flush the previous run's writes so that neither run pays for the other's
                out = subprocess.run([sys.executable, __file__, "--worker", kind, str(src), str(dst), "--opts", opts],
                                     capture_output=True, text=True)
                if out.returncode != 0:
                    raise SystemExit(f"{kind} run failed:\n{out.stderr[-3000:]}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                runs[kind].append(r)
                print(f"  {kind:>6} run {i}: {r['seconds']:.2f}s, peak RSS +{(r['peak_rss'] - r['rss_start']) / 1e6:.0f} MB",
                      file=sys.stderr)
                shutil.rmtree(dst)
        summary: dict = {"checkpoint_mb": total / 1e6, "shards": len(shards), "largest_shard_mb": largest / 1e6,
                         "dtype": args.dtype, "config": cfg, "repeats": args.repeats}
        for kind, rs in runs.items():
            sec = statistics.median(r["seconds"] for r in rs)
            summary[kind] = {
                "median_seconds": sec, "throughput_mb_s": total / 1e6 / sec,
                "peak_rss_above_start_mb": max(r["peak_rss"] - r["rss_start"] for r in rs) / 1e6,
                "peak_reset": all(r["peak_reset"] for r in rs),
                "median_user_seconds": statistics.median(r["user"] for r in rs),
                "median_sys_seconds": statistics.median(r["sys"] for r in rs),
            }
        summary["stream"]["peak_cached_mb"] = max(r["peak_cached_bytes"] for r in runs["stream"]) / 1e6
        summary["stream"]["pairs"] = runs["stream"][0]["pairs"]
        summary["stream"]["core_sigma_max_seconds"] = statistics.median(r["sigma_max_seconds"] for r in runs["stream"])
        summary["throughput_ratio"] = summary["stream"]["throughput_mb_s"] / summary["plain"]["throughput_mb_s"]
        # the machines are shared and noisy: the ratio of each round's adjacent runs, and their median
        summary["round_ratios"] = [p["seconds"] / s["seconds"] for p, s in zip(runs["plain"], runs["stream"], strict=True)]
        summary["median_round_ratio"] = statistics.median(summary["round_ratios"])
        stream_tp = summary["stream"]["throughput_mb_s"]
        summary["throughput_ratio_vs_plain_read"] = stream_tp / summary["plain_read"]["throughput_mb_s"]
        summary["stream_peak_in_shards"] = summary["stream"]["peak_rss_above_start_mb"] / summary["largest_shard_mb"]
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            p, s = summary["plain"], summary["stream"]
            print(f"plain  load+save: {p['median_seconds']:.2f}s  {p['throughput_mb_s']:.0f} MB/s  "
                  f"peak RSS +{p['peak_rss_above_start_mb']:.0f} MB")
            print(f"stream protect:   {s['median_seconds']:.2f}s  {s['throughput_mb_s']:.0f} MB/s  "
                  f"peak RSS +{s['peak_rss_above_start_mb']:.0f} MB ({summary['stream_peak_in_shards']:.2f} shards; "
                  f"cached tensors {s['peak_cached_mb']:.0f} MB; {s['pairs']} pairs; core engine.sigma_max "
                  f"{s['core_sigma_max_seconds']:.2f}s summed over threads)")
            for kind in ("plain", "stream"):
                k = summary[kind]
                print(f"{kind:>6} CPU: user {k['median_user_seconds']:.2f}s + system {k['median_sys_seconds']:.2f}s "
                      f"(medians; all threads)")
            r = summary["plain_read"]
            print(f"plain  read+save: {r['median_seconds']:.2f}s  {r['throughput_mb_s']:.0f} MB/s  "
                  f"peak RSS +{r['peak_rss_above_start_mb']:.0f} MB (tensors read into memory first)")
            print(f"throughput ratio stream/plain: {summary['throughput_ratio']:.2f} (target >= 0.5); "
                  f"median of per-round ratios {summary['median_round_ratio']:.2f} "
                  f"({', '.join(f'{x:.2f}' for x in summary['round_ratios'])}); "
                  f"stream/plain-read: {summary['throughput_ratio_vs_plain_read']:.2f}; "
                  f"largest shard {summary['largest_shard_mb']:.0f} MB")
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
