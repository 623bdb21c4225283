#!/usr/bin/env bash
# One device call: versions, GPU tests, kernel and engine benchmarks; logs under $OUT.
# Usage on the device: bash benchmarks/gpu_session.sh [tests|kernels|engine|all]
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
what=${1:-all}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  date -u; } 2>&1 | tee "$OUT/env.txt"
if [[ $what == tests || $what == all ]]; then
  timeout 300 python3 -m pytest -q -m gpu -x tests/test_kernels.py tests/test_engine_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi
if [[ $what == kernels || $what == all ]]; then
  timeout 200 python3 benchmarks/kernels_bench.py 2>&1 | tee "$OUT/kernels_bench.log" | tail -40
fi
if [[ $what == engine || $what == all ]]; then
  timeout 400 python3 benchmarks/engine_throughput.py --workload all --json "$OUT/engine_throughput.json" 2>&1 | tee "$OUT/engine_throughput.log" | tail -40
fi
