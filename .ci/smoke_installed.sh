#!/usr/bin/env bash
# The installed commands, run as a user would: from a folder outside the checkout, with the venv's bin.
#   bash .ci/smoke_installed.sh .venv/bin
set -euo pipefail
BIN=$(cd "$1" && pwd)
WORK=$(mktemp -d)
SERVER=""
cleanup() { [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
cd "$WORK"
passed=0

step() { echo "--- $1"; passed=$((passed + 1)); }

step "workbench (the simulated main job)"
"$BIN/workbench" hydra.run.dir="$WORK/sim" >"$WORK/sim.log" 2>&1 || { cat "$WORK/sim.log"; exit 1; }
test -s "$WORK/sim/report.md" && test -s "$WORK/sim/summary.json"

step "workbench backend=engine, the tiny model on the CPU"
# prompts within the tiny model's max_model_len, arriving over a second, so that some steps prefill after
# the first few (workbench-calibrate below fits on those)
"$BIN/workbench" backend=engine model=tiny_llama workload=synthetic workload.num_requests=20 \
    workload.input_len=64 workload.output_len=32 workload.request_rate=20 \
    hydra.run.dir="$WORK/engine" >"$WORK/engine.log" 2>&1 || { cat "$WORK/engine.log"; exit 1; }
grep -q "not served as asked: none (of 20 requests; 20 finished)" "$WORK/engine.log" || { cat "$WORK/engine.log"; exit 1; }
test -s "$WORK/engine/summary.json"

step "workbench-report"
rm -f "$WORK/engine/report.md"
"$BIN/workbench-report" "$WORK/engine"
test -s "$WORK/engine/report.md"

step "workbench-calibrate on the engine run"
"$BIN/workbench-calibrate" "$WORK/engine" --out "$WORK/calibration" >"$WORK/calibrate.log" 2>&1 \
    || { cat "$WORK/calibrate.log"; exit 1; }
test -s "$WORK/calibration/calibration.json"

step "servebench-serve answers a completion"
PORT=$("$BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$BIN/servebench-serve" --model tiny_llama --load-format dummy --port "$PORT" >"$WORK/server.log" 2>&1 &
SERVER=$!
"$BIN/python" - "$PORT" <<'PY' || { cat "$WORK/server.log"; exit 1; }
import json, sys, time, urllib.request

url = f"http://127.0.0.1:{sys.argv[1]}"
for _ in range(240):  # the server imports torch and builds the engine first
    try:
        urllib.request.urlopen(url + "/health", timeout=2)
        break
    except OSError:
        time.sleep(0.5)
body = json.dumps({"model": "tiny_llama", "prompt": "<t5> <t6>", "max_tokens": 4}).encode()
req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
out = json.load(urllib.request.urlopen(req, timeout=60))
assert out["usage"]["completion_tokens"] == 4, out
PY

echo "installed commands: $passed passed, 0 failed"
