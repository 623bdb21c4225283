#!/usr/bin/env bash
# Device calls of under 9.5 minutes on an H100 each: `engine breakdown tests` (versions, engine throughput, W7
# against HF and W0.6, the decode step breakdown, GPU tests), then `one_b` (the 1B model against HF, three HF
# runs per prompt); logs under $OUT. Each part has its own time limit, so one failing part does not
# take the others with it; the engine benchmark runs first, being what the targets are about.
# Usage on the device: bash benchmarks/gpu_session.sh [PART...]   PART: engine breakdown tests one_b kernels all
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
what=" ${*:-all} "
want() { [[ $what == *" $1 "* || ($what == *" all "* && $1 != kernels) ]]; }
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/progress.log"; }
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  date -u; } 2>&1 | tee "$OUT/env.txt"
if want engine; then
  log "engine W7 (and HF): start"
  timeout 170 python3 benchmarks/engine_throughput.py --workload W7 --json "$OUT/engine_w7.json" 2>&1 \
      | tee "$OUT/engine_throughput.log" | tail -20
  log "engine W0.6 (no HF: its 150k output tokens take HF minutes): start"
  timeout 80 python3 benchmarks/engine_throughput.py --workload W0.6 --skip-hf --json "$OUT/engine_w06.json" 2>&1 \
      | tee -a "$OUT/engine_throughput.log" | tail -12
fi
if want breakdown; then
  log "decode breakdown: start"
  timeout 75 python3 benchmarks/decode_breakdown.py 2>&1 | tee "$OUT/decode_breakdown.log" | tail -40
fi
if want tests; then
  log "GPU tests: start"
  timeout 170 python3 -m pytest -q -s -m gpu tests/test_kernels.py tests/test_engine_gpu.py -k "not one_b" \
      -p no:cacheprovider --durations=5 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|FAILED|Error" | tail -20
fi
if want one_b; then
  log "GPU test of the 1B bf16 model against HF: start"
  timeout 220 python3 -m pytest -q -s -m gpu tests/test_engine_gpu.py -k one_b -p no:cacheprovider --durations=2 \
      2>&1 | tee -a "$OUT/gpu_tests.log" | grep -E "greedy|passed|failed|FAILED|Error" | tail -8
fi
if want kernels; then
  timeout 200 python3 benchmarks/kernels_bench.py 2>&1 | tee "$OUT/kernels_bench.log" | tail -40
fi
log "done"
