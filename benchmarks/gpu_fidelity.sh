#!/usr/bin/env bash
# The simulator's calibration and fidelity data from one card, in two device calls of under 9.5 minutes:
#   OUT=/dir bash benchmarks/gpu_fidelity.sh profiles   # whole-step profiles, data/profiles/<hw>/<model>
#   OUT=/dir bash benchmarks/gpu_fidelity.sh runs       # engine run folders, reports/fidelity_<hw>/<case>/
#   OUT=/dir bash benchmarks/gpu_fidelity.sh all        # both in one call: runs (430 s at most), then the
#                                                       # profiles with what is left of 560 s
# `profiles`: llama2_7b, qwen3_0_6b, llama3_8b in that order (~150 / 100 / 210 s on an H100), each limited to
# what is left of PROFILE_BUDGET_S (default 550). `runs`: benchmarks/fidelity.py gpu (Llama-2-7B shape, dummy
# weights): the calibration cases, the held-out cases twice each, the 8-configuration policy sweep (~7 min).
# Each part tars what it wrote into $OUT/<part>_<hw>.tar.gz (after each model / role, so a part cut short
# still brings back what it finished) with its log; unpack in the repo root: tar xzf <part>_<hw>.tar.gz.
#   HW (default h200): the conf/hardware name the data is filed under; MODELS (default "llama2_7b qwen3_0_6b
#   llama3_8b"): the conf/model shapes to profile; MODEL (default llama2_7b): the one the runs serve;
#   ROLES (default "calibration heldout sweep"): which of fidelity.py's cases `runs` runs, in that order;
#   CUDAGRAPH_MODE (default: conf/backend/engine.yaml's): the engine's cudagraph_mode in every run;
#   PYTHON (default python3).
#   --tiny: the same on the CPU with the tiny model (a smoke test of this script: ~2 minutes).
# No Hydra, OmegaConf or SimPy needed: the engine runs compose their configs from conf/*.yaml themselves.
# Profiles and runs record the digest of the engine and kernel code they measured (engine/digest.py): run this
# on the code that will be committed with them (merge first), or tests/test_profile_digest.py marks them stale.
set -u
part=${1:?usage: OUT=DIR bash benchmarks/gpu_fidelity.sh profiles|runs|all [--tiny]}
tiny=${2:-}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
HW=${HW:-h200}
PY=${PYTHON:-python3}
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/$part.log"; }
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" 2>/dev/null
  git rev-parse HEAD 2>/dev/null; date -u; } > "$OUT/env_$part.txt"

# The time a step may take: at most `cap` seconds, and no more than is left of `budget`.
limit() { local cap=$1 budget=$2; local rest=$((budget - SECONDS)); echo $((rest < cap ? rest : cap)); }

profiles() {
  local budget=${PROFILE_BUDGET_S:-550} models=(${MODELS:-llama2_7b qwen3_0_6b llama3_8b}) extra=()
  declare -A cap=([llama2_7b]=240 [qwen3_0_6b]=180 [llama3_8b]=300 [tiny_llama]=120)  # others: 240
  [[ $tiny == --tiny ]] && { models=(tiny_llama); extra=(--grid tiny --device cpu); }
  for m in "${models[@]}"; do
    local t; t=$(limit "${cap[$m]:-240}" "$budget")
    if ((t < 60)); then log "$m: skipped, ${t}s left"; continue; fi
    log "$m: profile (limit ${t}s)"
    timeout -k 5 "$t" $PY -m servebench.engine.profile --model "$m" --out "data/profiles/$HW" \
        "${extra[@]}" >> "$OUT/$part.log" 2>&1
    log "$m: exit $?"
    tar czf "$OUT/profiles_$HW.tar.gz" "data/profiles/$HW"
  done
}

runs() {
  local budget=${RUNS_BUDGET_S:-550} runs=reports/fidelity_$HW extra=()
  declare -A cap=([calibration]=200 [heldout]=330 [sweep]=250)
  [[ $tiny == --tiny ]] && extra=(--tiny --device cpu)
  [[ -n ${CUDAGRAPH_MODE:-} ]] && extra+=(--cudagraph-mode "$CUDAGRAPH_MODE")
  for role in ${ROLES:-calibration heldout sweep}; do
    local t; t=$(limit "${cap[$role]}" "$budget")
    if ((t < 30)); then log "$role: skipped, ${t}s left"; continue; fi
    log "$role: engine runs (limit ${t}s)"
    # fidelity.py starts no run after --budget-s (engine start included); the timeout stops a hung one.
    timeout -k 5 "$t" $PY benchmarks/fidelity.py gpu --runs "$runs" --model "${MODEL:-llama2_7b}" \
        --hardware "$HW" --roles "$role" \
        --budget-s $((t - 25)) "${extra[@]}" >> "$OUT/$part.log" 2>&1
    log "$role: exit $?, $(ls "$runs"/*/engine*/summary.json 2>/dev/null | wc -l) run folders in all"
    tar czf "$OUT/runs_$HW.tar.gz" "$runs"
  done
}

case $part in
  profiles) profiles ;;
  runs) runs ;;
  all) RUNS_BUDGET_S=${RUNS_BUDGET_S:-430} runs; PROFILE_BUDGET_S=${PROFILE_BUDGET_S:-560} profiles ;;
  *) echo "gpu_fidelity.sh: unknown part '$part' (profiles | runs | all)" >&2; exit 2 ;;
esac
grep -E "Traceback|Error|FAILED" "$OUT/$part.log" | head -5
log "done in ${SECONDS}s"
