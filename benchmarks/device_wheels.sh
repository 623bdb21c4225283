#!/usr/bin/env bash
# The pure-Python wheels the device scripts install with `pip --no-index` (the GPU machine has torch, triton,
# transformers, pandas, pytest, httpx and prometheus-client, but no Hydra, SimPy, FastAPI or uvicorn, and no
# network): run here, then carry `.whl` (`run(..., carry=[".whl"])`). About 4 MB, for the device's Python 3.12.
#   bash benchmarks/device_wheels.sh [DIR]   (default .whl)
# fastapi >= 0.16x imports opentelemetry's API at start: without it the server part fails with
# "No module named 'opentelemetry'".
set -eu
dir=${1:-.whl}
mkdir -p "$dir"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dir" \
    fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5 typing-inspection==0.4.5 \
    annotated-types annotated-doc uvicorn==0.55.0 opentelemetry-api importlib-metadata zipp \
    hydra-core==1.3.8 omegaconf==2.3.1 simpy==4.1.2
python3 -m pip wheel -q --no-deps -w "$dir" antlr4-python3-runtime==4.9.3  # sdist only: built here
ls "$dir"
