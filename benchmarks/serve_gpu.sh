#!/usr/bin/env bash
# On the device: the OpenAI server with a Llama-2-7B-shaped dummy model, 500 ShareGPT requests at 4 req/s.
# Usage: bash benchmarks/serve_gpu.sh   (wheels for fastapi/uvicorn/pydantic carried in .whl/)
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 - <<'PY'
import sys; sys.path.insert(0, "benchmarks")
from pathlib import Path
from servebench.engine.dummy import write_dummy_model_dir
from engine_throughput import LLAMA2_7B
write_dummy_model_dir(LLAMA2_7B, Path("/tmp/llama2-7b-dummy"))
PY
python3 -m servebench.engine.server --model /tmp/llama2-7b-dummy --load-format dummy --dtype bfloat16 --max-model-len 4096 \
    --port 8000 > "$OUT/server.log" 2>&1 &
server=$!
for _ in $(seq 240); do curl -sf http://127.0.0.1:8000/health >/dev/null && break; sleep 1; done
python3 benchmarks/serve.py --url http://127.0.0.1:8000 --workload sharegpt --num-requests 500 --request-rate 4 --tokenizer approx \
    --output-dir "$OUT/serve_run" 2>&1 | tee "$OUT/serve_bench.log" | tail -40
curl -s http://127.0.0.1:8000/metrics | grep -E "^vllm:(num_requests_running|num_preemptions_total|generation_tokens_total)" | tee -a "$OUT/serve_bench.log"
kill $server
