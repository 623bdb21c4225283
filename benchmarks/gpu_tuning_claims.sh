#!/usr/bin/env bash
# In one device call (~6 min on an H100): the engine-scale companions of the tuning claims, each a Hydra
# multirun of the same runs on the simulator and on the engine (backend: sim,engine), in order of cost; the sweep
# folders (outputs/<name>/<time>/) go into $OUT/tuning_claims.tar.gz after each experiment. A failed or timed-out
# experiment does not stop the next one; every experiment gets at most what is left of BUDGET_S.
# Usage on the device (carry .whl):   OUT=/some/dir bash benchmarks/gpu_tuning_claims.sh [NAME...]
#   BUDGET_S (default 450): seconds for all experiments together; NAME: a subset of the experiments below.
# Engine time estimates (comments in each conf/experiment/<name>.yaml; ~25 s of engine start per engine run):
#   tune_memory_saving_engine ~50 s (2 engine runs), tune_prefix_caching_engine ~65 s (2),
#   tune_batch_knobs_engine ~100 s (4), tune_kv_preemption_engine ~130 s (3), tune_prefix_chunked_ttft_engine ~150 s (4).
# Measured on an H100 (wall time, simulated runs included; the engine keeps its compiled kernels across the runs
# of one experiment, so an engine run costs ~20-30 s with its start): tune_prefix_caching_engine 43 s,
# tune_kv_preemption_engine 80 s, tune_prefix_chunked_ttft_engine 70 s, tune_memory_saving_engine 59 s,
# tune_batch_knobs_engine 95 s: 5.3 min for all five (benchmarks/results/h100_tuning_claims_progress.log).
#
# Then, on a CPU machine, in the repo root:
#   tar xzf tuning_claims.tar.gz                                     # -> outputs/<name>/<time>/ (run folders)
#   for d in outputs/*_engine; do n=$(basename "$d"); rm -rf "reports/$n/sweep"; mkdir -p "reports/$n"
#     mv "$(ls -d "$d"/*/ | tail -1)" "reports/$n/sweep"; .venv/bin/workbench-report "reports/$n/sweep"; done
# workbench-report rebuilds each sweep's sweep_report.md and, from the runs' `study` block, the side-by-side study
# report into reports/<name>/ (report.md, report.html, claim_*.png, claims.json); the committed sweep folders
# keep the reports regenerable from the saved runs.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-450}
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/progress.log"; }
# Hydra/OmegaConf/SimPy wheels (pure Python, carried in .whl/): the harness needs them on the device too
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { log "wheel install failed: carry .whl"; exit 1; }
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  date -u; } 2>&1 | tee "$OUT/env.txt"

# One archive: the device tool brings back at most 8 files, 2 folders deep.
save() { tar czf "$OUT/tuning_claims.tar.gz" $(ls -d outputs/*_engine 2>/dev/null); }

experiment() {  # name, its own time limit (s)
  local left=$((BUDGET_S - SECONDS)) limit=$2
  ((left < limit)) && limit=$left
  if ((limit < 40)); then log "$1: skipped, ${left}s of the budget left"; return; fi
  log "$1: start (limit ${limit}s)"
  # The sweep/study reports are rebuilt locally (workbench-report): the device only runs.
  timeout -k 10 "$limit" python3 -m workbench "+experiment=$1" '~hydra.callbacks.sweep_report' \
      > "$OUT/$1.log" 2>&1
  local rc=$?
  log "$1: exit $rc, $(ls outputs/"$1"/*/*/summary.json 2>/dev/null | wc -l) runs complete"
  grep -E "Error|error:|Traceback" "$OUT/$1.log" | head -5
  save
}

names=("$@")
((${#names[@]})) || names=(tune_memory_saving_engine tune_prefix_caching_engine tune_batch_knobs_engine
                             tune_kv_preemption_engine tune_prefix_chunked_ttft_engine)
declare -A LIMIT=([tune_memory_saving_engine]=120 [tune_prefix_caching_engine]=110 [tune_batch_knobs_engine]=150
                  [tune_kv_preemption_engine]=200 [tune_prefix_chunked_ttft_engine]=230)
for name in "${names[@]}"; do
  experiment "$name" "${LIMIT[$name]:-200}"
done
log "done"
