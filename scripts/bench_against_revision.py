"""Benchmark: streaming ``protect_checkpoint`` and ``inspect_model`` of this checkout against another revision's.

Used to show that a change left throughput unchanged (e.g. validating every safetensors header and the
release rule: header work, not a pass over the data). A Llama-shaped checkpoint with random bf16 weights is
built once; then each revision protects (and inspects) it in a fresh process, alternating, ``--repeats``
times. Reported: the median seconds of each and their ratio, measured side by side in one run.

Usage::

    git worktree add /tmp/baseline <revision>
    OMP_NUM_THREADS=2 python scripts/bench_against_revision.py --baseline /tmp/baseline --repeats 5
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
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
from pathlib import Path
t0 = time.perf_counter()
from hf_specdef import SpecDefConfig, inspect_model, protect_checkpoint
t1 = time.perf_counter()
protect_checkpoint(sys.argv[1], sys.argv[2], SpecDefConfig(), progress=False)
t2 = time.perf_counter()
inspect_model(sys.argv[2])
t3 = time.perf_counter()
print(json.dumps({"protect": t2 - t1, "inspect": t3 - t2}))
"""


def build(root: Path, layers: int, hidden: int, shard: str) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    src = root / "src"
    model.save_pretrained(src, max_shard_size=shard)
    return src


def run(code_root: Path, src: Path, dst: Path) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(code_root), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", CHILD, str(src), str(dst)], env=env, capture_output=True, text=True,
                         check=True)
    shutil.rmtree(dst)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, type=Path, help="a checkout of the revision to compare with")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--shard-size", default="100MB")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=HERE) as tmp:
        root = Path(tmp)
        src = build(root, args.layers, args.hidden, args.shard_size)
        size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        times: dict[str, dict[str, list[float]]] = {"this": {"protect": [], "inspect": []},
                                                    "baseline": {"protect": [], "inspect": []}}
        for i in range(args.repeats):
            order = [("this", HERE), ("baseline", args.baseline)]
            for name, code in order if i % 2 == 0 else order[::-1]:
                for k, v in run(code, src, root / f"dst-{name}").items():
                    times[name][k].append(v)
        result = {"checkpoint_mb": size / 1e6, "repeats": args.repeats}
        for k in ("protect", "inspect"):
            this, base = statistics.median(times["this"][k]), statistics.median(times["baseline"][k])
            result[k] = {"this_s": this, "baseline_s": base, "ratio": this / base}
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
