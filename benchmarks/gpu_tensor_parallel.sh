#!/usr/bin/env bash
# Tensor parallelism on a machine of 2 or more GPUs (a device kind such as nvidia-h200-x2), in one call of
# under 10 minutes; each part runs under `timeout`, so one failure does not stop the next:
#   tests     pytest -m gpu tests/test_engine_gpu.py -k tensor_parallel (2 ranks over NCCL: graphs, eager, swap)
#   13b       benchmarks/tensor_parallel.py, Llama-2-13B shape at TP 1 and 2 (throughput, decode steps, the
#             all-reduce of one step's hidden states against the link's bus bandwidth)
#   34b       the same for CodeLlama-34B at TP 2 (TP 1 does not fit one card at bf16 beside a KV cache)
#   profile   python -m servebench.engine.profile --tensor-parallel-size 2: data/profiles/$HW/llama2_13b_tp2,
#             what the simulator reads for parallel.tensor_parallel_size=2
# Logs and JSON under $OUT, the profile as $OUT/profiles_tp_$HW.tar.gz (unpack in the repo root).
# Carry .whl with the test wheels (pytest, hypothesis, pytest-timeout) under .whl/test.
#   OUT=/some/dir HW=h200 bash benchmarks/gpu_tensor_parallel.sh [PART...]
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
HW=${HW:-h200}
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl .whl/test/*.whl 2>/dev/null \
    || echo "wheel install failed: carry .whl" >&2
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nvidia-smi topo -m
  git log -1 --format='commit %h %s' 2>/dev/null; date -u; } > "$OUT/env_tp.txt" 2>&1
what=" ${*:-tests 13b 34b profile} "
run() {  # name, limit (s), command...
  local name=$1 limit=$2; shift 2
  [[ $what == *" $name "* ]] || return 0
  echo "[$(date -u +%H:%M:%S)] $name: start (limit ${limit}s)"
  timeout -k 10 "$limit" "$@" > "$OUT/tp_$name.log" 2>&1
  echo "[$(date -u +%H:%M:%S)] $name: exit $?"
}
run tests 150 python3 -m pytest -v --tb=short --timeout 100 -m gpu tests/test_engine_gpu.py -k tensor_parallel
run 13b 170 python3 benchmarks/tensor_parallel.py --model llama2_13b --tp 1 2 --json "$OUT/tp_13b.json"
run 34b 120 python3 benchmarks/tensor_parallel.py --model codellama_34b --tp 2 --json "$OUT/tp_34b.json"
run profile 120 python3 -m servebench.engine.profile --model llama2_13b --tensor-parallel-size 2 \
    --out "data/profiles/$HW"
tar czf "$OUT/profiles_tp_$HW.tar.gz" data/profiles/"$HW"/*_tp2 2>/dev/null
grep -hE "passed|failed|^tp=|all-reduce of (1|8192) tokens" "$OUT"/tp_*.log
