#!/usr/bin/env bash
# The simulator's step-time profiles and the fidelity engine runs in one device call (~10-11 min on an H100):
# H100 whole-step profiles of Llama-2-7B (then the fidelity engine runs, then Qwen3-0.6B; Llama-3-8B with
# --llama3 if the budget allows), written where the repo reads them
# (data/profiles/h100_80g/, reports/fidelity/) and archived in $OUT/profiles_fidelity.tar.gz after each part. A failed or timed-out
# part does not stop the next one.
# Usage on the device: OUT=/some/dir bash benchmarks/gpu_profiles_fidelity.sh [all|part1|part2|profiles] [--llama3]
# (profiles: re-profile Llama-2-7B and Qwen3-0.6B only, under 5 min)
# Then on a CPU machine: python benchmarks/fidelity.py compare   (writes reports/fidelity.{json,md})
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/progress.log"; }
# Hydra/OmegaConf/SimPy wheels (pure Python, carried in .whl/); the GPU part imports none of them
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || log "wheel install failed (not needed by this script)"
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  date -u; } 2>&1 | tee "$OUT/env.txt"

# One archive: the device tool brings back at most 8 files, 2 folders deep.
save() { tar czf "$OUT/profiles_fidelity.tar.gz" $(ls -d data/profiles/h100_80g reports/fidelity 2>/dev/null); }

profile() {  # model, time limit (s)
  log "profile $1: start"
  timeout "$2" python3 -m servebench.engine.profile --model "$1" --out data/profiles/h100_80g > "$OUT/profile_$1.log" 2>&1
  log "profile $1: exit $? ($(tail -1 "$OUT/profile_$1.log"))"
  save
}

# Two device calls fit the 10-minute limit: part1 (Llama-2-7B profile, fidelity runs), part2 (the others).
part=${1:-all}
if [[ $part == all || $part == part1 ]]; then
  profile llama2_7b 180
  log "fidelity gpu: start"
  timeout 390 python3 benchmarks/fidelity.py gpu --budget-s 320 2>&1 | tee "$OUT/fidelity_gpu.log" \
      | grep -E "^\[|FAILED|Error"
  log "fidelity gpu: exit ${PIPESTATUS[0]}"
  save
fi
if [[ $part == all || $part == part2 ]]; then
  profile qwen3_0_6b 130
  [[ "${2:-}" == --llama3 ]] && profile llama3_8b 210
fi
if [[ $part == profiles ]]; then
  profile llama2_7b 150
  profile qwen3_0_6b 100
fi
log "done"
