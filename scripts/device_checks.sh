#!/usr/bin/env bash
# The GPU checks, as one prepared run on a machine with a CUDA device (16 cores there):
#   1. the test suite with CUDA present (the CUDA-only tests run; protect_checkpoint and the load hook pick cuda);
#   2. load-time overhead on cuda (docs/performance.md: protected from_pretrained <= 1.05 x plain), with a cost breakdown;
#   3. in-memory protect on cuda;
#   4. streaming protect_checkpoint vs a plain shard-by-shard copy, deforming on cuda and on the CPU;
#   5. kernel launches, memcpys and syncs of in-memory deformation on cuda (scripts/profile_deform.py).
# Each step has its own time limit, so one hang does not cost the others; logs and JSON go to $OUT.
# On the H200 machine (2026-11-30) `import hf_specdef` took ~13 s in each fresh process, and the streaming benchmark
# starts one per run: 3 rounds of its 3 kinds fit in about 150 s. The whole script took ~8 minutes there.
#
#   OUT=/tmp/out bash scripts/device_checks.sh
# Wheels for packages the machine lacks (or has in other versions) may lie in .whl/ (not tracked).
set -u
OUT=${OUT:-$(mktemp -d)}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
step() {  # step NAME SECONDS CMD...: run CMD with a limit, log to $OUT/NAME.log, print its tail
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "== $name: rc=$? in $((SECONDS - t0)) s"
  tail -n "${TAIL:-6}" "$OUT/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, diffusers, peft; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
'transformers', transformers.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'cpus', __import__('os').cpu_count())"
python3 -m compileall -q -j 0 hf_specdef >/dev/null  # fresh processes below: no per-process compiling
python3 -c "import time; t = time.perf_counter(); import hf_specdef; print(f'import hf_specdef: {time.perf_counter() - t:.1f} s')"
TAIL=12 step pytest 150 python3 -m pytest -q -p no:cacheprovider -n 6 ${TESTS:-tests} -rs
step bench_streaming_cuda 170 python3 scripts/bench_streaming.py --device cuda --repeats "${REPEATS:-3}" --json
step bench_load_cuda 120 python3 scripts/bench_load.py --device cuda --runs 7 --breakdown --json-out "$OUT/bench_load_cuda.json"
TAIL=45 step bench_protect_cuda 60 python3 scripts/bench_protect.py --device cuda --runs 3 --profile
step bench_streaming_cpu 170 python3 scripts/bench_streaming.py --device cpu --repeats "${REPEATS:-3}" --json
step bench_load_cuda_noverify 60 python3 scripts/bench_load.py --device cuda --runs 5 --no-verify
TAIL=30 step profile_deform_cuda 60 python3 scripts/profile_deform.py --device cuda --json-out "$OUT/profile_deform_cuda.json"
# 6. the red team's full suite on SmolLM2 (only when the checkpoint was brought along: see scripts/redteam_device.sh,
#    the model does not fit one call's 64 MiB carry); ~9 minutes for the default variant on an H200
if [ -f "${SMOLLM2:-.smollm2/bf16}/config.json" ]; then
  TAIL=40 step redteam_full 570 env OUT="$OUT" bash scripts/redteam_device.sh
fi
