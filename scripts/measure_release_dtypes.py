"""Measure release safety per dtype on a real checkpoint (see docs/precision.md): what ``precision="auto"`` chooses, whether the
result is bit-exact in the dtype it ships in, and what a float32-only release turns into when it is downcast.

Usage::

    python scripts/measure_release_dtypes.py /work/cache/smollm2/bf16 --out /tmp/release --json results.json

For each storage dtype (bfloat16 = the source; float32 and float16 = converted copies) the source folder is
protected with the default config by streaming (``protect_checkpoint``) and in memory (``protect``), the two are
compared tensor by tensor, and the protected folder is reloaded with stock transformers **in a fresh process
without hf_specdef** and compared with the original on greedy generations and logits. The float32 (spectral,
float32-only) release is also loaded in bfloat16 and float16, as a downcasting user would. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

PROMPTS = ["What is the capital of France?", "Write a Python function that adds two numbers.",
           "Give me three tips for staying healthy."]

STOCK = textwrap.dedent("""
    import json, sys, torch
    sys.modules["hf_specdef"] = None  # stock transformers only
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path, tok_path, dtype, prompts, new = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), int(sys.argv[5])
    tok = AutoTokenizer.from_pretrained(tok_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    out = {"dtype": str(model.dtype), "texts": [], "ids": [], "logits": []}
    for p in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        with torch.no_grad():
            logits = model(ids).logits[0].double()
            gen = model.generate(ids, max_new_tokens=new, do_sample=False)[0, ids.shape[1]:]
        out["ids"].append(gen.tolist())
        out["texts"].append(tok.decode(gen, skip_special_tokens=True))
        out["logits"].append(logits.tolist())
    json.dump(out, open(sys.argv[6], "w"))
""")


def stock_run(path: Path, tok: Path, dtype: str, out: Path, new_tokens: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", STOCK, str(path), str(tok), dtype, json.dumps(PROMPTS),
                           str(new_tokens), str(out)], env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(out.read_text())


def compare(ref: dict, got: dict) -> dict:
    devs = []
    for a, b in zip(ref["logits"], got["logits"], strict=True):
        a, b = torch.tensor(a), torch.tensor(b)
        devs.append(float("inf") if not torch.isfinite(b).all() else float((a - b).abs().max() / a.abs().max()))
    same = [x == y for x, y in zip(ref["ids"], got["ids"], strict=True)]
    return {"max_relative_logit_deviation": max(devs), "greedy_identical": sum(same), "prompts": len(same),
            "texts": got["texts"]}


def convert(src: Path, dst: Path, dtype: torch.dtype) -> Path:
    from transformers import AutoModelForCausalLM

    if not dst.exists():
        AutoModelForCausalLM.from_pretrained(src, dtype=dtype).save_pretrained(dst)
        for f in src.iterdir():
            if f.name.startswith("tokenizer") or f.suffix == ".jinja":
                shutil.copy2(f, dst / f.name)
    return dst


def tensors_equal(folder: Path, model: torch.nn.Module) -> tuple[int, int]:
    from safetensors.torch import load_file

    written = {}
    for f in folder.glob("*.safetensors"):
        written.update(load_file(f))
    params = dict(model.state_dict())
    names = [n for n in written if n in params]
    return sum(torch.equal(written[n], params[n]) for n in names), len(names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("--out", type=Path, default=Path("/tmp/release_dtypes"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--new-tokens", type=int, default=24)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    import hf_specdef
    from hf_specdef import SpecDefConfig, protect, protect_checkpoint

    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"source": str(args.src), "config": SpecDefConfig().to_dict(), "hf_specdef": hf_specdef.__version__}
    sources = {"bfloat16": args.src, "float32": convert(args.src, args.out / "src-float32", torch.float32),
               "float16": convert(args.src, args.out / "src-float16", torch.float16)}
    for name, src in sources.items():
        row: dict = {}
        dst = args.out / f"protected-{name}"
        shutil.rmtree(dst, ignore_errors=True)
        t = time.perf_counter()
        try:
            rep = protect_checkpoint(src, dst, SpecDefConfig(), progress=False)
        except ValueError as e:
            row["refused"] = str(e)
            results[name] = row
            print(name, "refused:", e, flush=True)
            continue
        row["stream_seconds"] = time.perf_counter() - t
        row["precision"] = rep.precision
        row["factors"] = sorted({r.deformation.factor for r in rep.results})
        row["pairs"] = len(rep.results)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, name))
        protect(model, SpecDefConfig(), progress=False, verify=False)
        eq, n = tensors_equal(dst, model)
        row["streaming_equals_in_memory"] = f"{eq}/{n} tensors bit-identical"
        del model
        ref = stock_run(src, args.src, name, args.out / f"ref-{name}.json", args.new_tokens)
        row["stock_reload"] = compare(ref, stock_run(dst, args.src, name, args.out / f"prot-{name}.json", args.new_tokens))
        if name == "float32":  # the float32-only release, loaded as a downcasting user would
            for low in ("bfloat16", "float16"):
                ref_low = stock_run(src, args.src, low, args.out / f"ref-{low}-of-f32.json", args.new_tokens)
                got = stock_run(dst, args.src, low, args.out / f"prot-f32-in-{low}.json", args.new_tokens)
                row[f"loaded_in_{low}"] = compare(ref_low, got)
        results[name] = row
        print(name, json.dumps({k: v for k, v in row.items() if k != "precision"}, default=str)[:1500], flush=True)
    text = json.dumps(results, indent=2, default=str)
    if args.json:
        args.json.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
