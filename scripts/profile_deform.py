#!/usr/bin/env python
"""Operator and host-sync counts of in-memory deformation (what load-time protection runs), from torch.profiler.

Builds the ``bench_load.py`` Llama (125M by default, float32), then profiles ``protect_model(model, cfg,
verify=False)`` once (after one warm-up run on a copy). On a CPU these counts are the proxy for a GPU run:
every ATen operator that does work is one kernel launch there, and every ``aten::_local_scalar_dense``
(``float()``, ``.item()``, ``.tolist()``, ``bool()``) is a device-to-host copy that waits for the device.
Copies to the CPU that would be device-to-host transfers on a GPU (``.cpu()``, ``.to("cpu")``: backups,
eigenproblems solved on the host; ``.tolist()``, ``.item()``) are counted by wrapping those Tensor methods
while the run is profiled (``.cpu()`` is a no-op on a CPU run, but is counted as the transfer it would be).

With ``--device cuda`` the model is moved there first and the CUDA runtime calls are counted as well
(``cudaLaunchKernel``, ``cudaMemcpyAsync``, synchronizations): the real figures the CPU run stands in for.

    python scripts/profile_deform.py
    python scripts/profile_deform.py --layers 4 --json-out profile.json
    python scripts/profile_deform.py --device cuda
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
from _llama_shape import add_llama_shape_args, llama_config  # scripts/_llama_shape.py


def count_host_copies() -> tuple[collections.Counter, list]:
    """Wrap the Tensor methods that move data to the host; returns (counter, originals to restore)."""
    counter: collections.Counter = collections.Counter()
    originals = []
    for name in ("cpu", "tolist", "item"):
        orig = getattr(torch.Tensor, name)

        def wrapper(self, *a, _orig=orig, _name=name, **k):
            counter[_name] += 1
            return _orig(self, *a, **k)

        originals.append((name, orig))
        setattr(torch.Tensor, name, wrapper)
    orig_to = torch.Tensor.to

    def to(self, *a, **k):  # only an explicit "cpu": on a CPU run, .to(t.device) is cpu too but moves nothing on a GPU
        if k.get("device", a[0] if a else None) == "cpu":
            counter['to("cpu")'] += 1
        return orig_to(self, *a, **k)

    originals.append(("to", orig_to))
    torch.Tensor.to = to
    return counter, originals


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_llama_shape_args(p, hidden=768, layers=12, intermediate=2048, heads=12, kv_heads=4, vocab=32000)
    p.add_argument("--device", default="cpu", help="where the model sits (cpu, cuda)")
    p.add_argument("--top", type=int, default=12, help="operators listed by count")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import LlamaForCausalLM

    import hf_specdef
    from hf_specdef import SpecDefConfig
    from hf_specdef.protection.in_memory import protect_model

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(args, 2048)).eval().to(args.device)
    cuda = torch.device(args.device).type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    cfg = SpecDefConfig()
    protect_model(copy.deepcopy(model), cfg, verify=False, progress=False)  # warm-up
    counter, originals = count_host_copies()
    try:
        with torch.profiler.profile(activities=activities) as prof:
            t0 = time.perf_counter()
            report = protect_model(model, cfg, verify=False, progress=False)
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
    finally:
        for name, orig in originals:
            setattr(torch.Tensor, name, orig)
    events = prof.key_averages()
    top_level = [e for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::")]
    counts = collections.Counter(e.name for e in top_level)
    by_name = {e.key: e.count for e in events}
    result = {
        "hf_specdef": str(Path(hf_specdef.__file__).parent),
        "pairs": len(report.results),
        "wall_s_profiled": wall,
        "aten_ops_top_level": len(top_level),
        "aten_ops_all": sum(e.count for e in events if e.key.startswith("aten::")),
        "local_scalar_dense": by_name.get("aten::_local_scalar_dense", 0),
        "eigensolver_calls": sum(v for k, v in by_name.items() if k.startswith("aten::linalg_eig")),
        "host_copies": dict(counter),
        "top_ops": counts.most_common(args.top),
    }
    if cuda:
        result["cuda_runtime"] = {k: v for k, v in by_name.items() if k.startswith("cuda")}
    print(json.dumps(result, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
