#!/usr/bin/env bash
# One device call (about 6-7 min on an H200; BUDGET_S caps it at 8.8 min): the card's measured ceilings, then
# the engine against bounds computed from them, then the server at saturation against the offline engine.
#   card              benchmarks/card.py: device-to-device copy bandwidth and bf16 8192^3 GEMM rate
#   engine_w7         W7 with async scheduling off and on (% of its roofline bound), decode steps at batch 1,
#                     8 and 64 in both modes (x the weights + KV read bound), then HF transformers' best;
#                     again with cudagraph_mode FULL (mixed steps in CUDA graphs)
#   prefill           prefill alone, 1 x 4096 and 16 x 2048 tokens (% of the GEMM rate, end to end)
#   serve_vs_offline  512 requests offline (sync, async) and through the server, 256 streams, a tenth of the
#                     clients disconnecting after 4 tokens: server / offline and the leak check
#   decode_breakdown  graph replay and kernel time of the decode steps (if the budget still allows)
# Each part runs under `timeout` with at most what is left of BUDGET_S, so one failure does not stop the
# next. Logs: $OUT/<part>.log, $OUT/progress.log (versions, card, timings), $OUT/summary.txt (the table
# printed last), $OUT/results.tar.gz (JSON of each part, the server's log): 7 files, as the tool brings back.
# Usage on the device (carry .whl, which `bash benchmarks/device_wheels.sh` fills, for the server part):
#   OUT=/some/dir bash benchmarks/gpu_h200_session.sh [PART...]
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
WORK=$(mktemp -d)  # JSON and the server log, archived at the end
BUDGET_S=${BUDGET_S:-530}
log() { echo "[$(date -u +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$OUT/progress.log"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || log "wheel install failed: serve_vs_offline needs .whl carried"
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  python3 -c "import fastapi, uvicorn, httpx, pydantic; print('fastapi', fastapi.__version__, 'uvicorn', uvicorn.__version__, 'httpx', httpx.__version__, 'pydantic', pydantic.__version__)"
  git log -1 --format='commit %h %s' 2>/dev/null; date -u; } 2>&1 | tee -a "$OUT/progress.log"

what=" ${*:-card engine_w7 prefill serve_vs_offline decode_breakdown} "
part() {  # name, time limit (s), command...: at most what is left of BUDGET_S; output in $OUT/<name>.log
  local name=$1 limit=$2; shift 2
  [[ $what == *" $name "* ]] || return 0
  local left=$((BUDGET_S - SECONDS))
  ((left < limit)) && limit=$left
  if ((limit < 30)); then log "$name: skipped, ${left}s of the budget left"; return; fi
  log "$name: start (limit ${limit}s)"
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  log "$name: exit $rc $( ((rc == 124)) && echo '(timed out) ')$(grep -E 'Error|error:' "$OUT/$name.log" | tail -1)"
}

part card 60 python3 benchmarks/card.py
part engine_w7 260 python3 benchmarks/engine_throughput.py --workload W7 --json "$WORK/engine_w7.json" \
    --cudagraph-mode FULL_DECODE_ONLY FULL
part prefill 100 python3 benchmarks/engine_throughput.py --workload none --prefill --json "$WORK/prefill.json"
part serve_vs_offline 220 python3 benchmarks/serve_vs_offline.py --server-log "$WORK/server.log" \
    --json "$WORK/serve_vs_offline.json"
part decode_breakdown 90 python3 benchmarks/decode_breakdown.py --batches 1 8 64
tar czf "$OUT/results.tar.gz" -C "$WORK" . 2>/dev/null

# The table: each part's lines that carry a figure against a target.
grep -hE "^(NVIDIA|.*: copy .* TB/s)|of the roofline bound|decode step, batch|engine \(async\) / HF|^HF transformers|^prefill +[0-9]|^offline \(|^server \(|server / offline|leak check|^batch [0-9]+:" \
    "$OUT"/card.log "$OUT"/engine_w7.log "$OUT"/prefill.log "$OUT"/serve_vs_offline.log "$OUT"/decode_breakdown.log \
    2>/dev/null | sed -E 's/ \[[^]]*\(measured\)\]$//' > "$OUT/summary.txt"
log "done"
echo "==================== summary (bounds from: $(head -1 "$OUT/card.log" 2>/dev/null)) ===================="
cat "$OUT/summary.txt"
