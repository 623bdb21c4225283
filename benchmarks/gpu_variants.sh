#!/usr/bin/env bash
# A/B of kernel variants in one device call, on one GPU: each variant is a copy of kernels/ under
# .ab/<name>/kernels (gitignored; carry .ab), which shadows the repo's on PYTHONPATH while
# decode_breakdown.py times the batch-1 and batch-8 decode step and its kernels. Run the baseline first and
# again last, so that drift of the card shows.
# Usage on the device: OUT=... bash benchmarks/gpu_variants.sh NAME...   (LIMIT: seconds per variant, 100)
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  2>&1 | tee -a "$OUT/variants.log"
for v in "$@"; do
  echo "=== $v  [$(date -u +%H:%M:%S)]" | tee -a "$OUT/variants.log"
  PYTHONPATH=$PWD/.ab/$v:$PWD timeout "${LIMIT:-100}" python3 benchmarks/decode_breakdown.py --batches 1 8 \
    2>&1 | tee -a "$OUT/variants.log" | grep -E "^batch|launches|skinny|Error|error" | head -12
done
