"""Which implementation runs a kernel call: Triton, the torch reference, or torch.compile of the reference."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

# Triton reads this when a kernel is decorated, so it must be set before `kernels` is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# What impl="auto" runs on CUDA for the memory-bound element-wise ops. benchmarks/kernels_bench.py times
# Triton against torch.compile and prints the line to put here when compile wins on the target GPU.
CUDA_BACKEND: dict[str, str] = {"rms_norm": "triton", "apply_rotary": "triton", "silu_and_mul": "triton"}


def pick(op: str, x: torch.Tensor, impl: str) -> str:
    """Resolve impl ('auto' | 'triton' | 'torch' | 'compile') to what runs on x's device."""
    allowed = ("auto", "triton", "torch", "compile") if op in CUDA_BACKEND else ("auto", "triton", "torch")
    if impl not in allowed:
        raise ValueError(f"{op}: impl must be one of {allowed}, got {impl!r}")
    if impl == "auto":
        return CUDA_BACKEND.get(op, "triton") if x.is_cuda else "torch"
    if impl == "triton" and not x.is_cuda and not INTERPRET:
        raise ValueError(f"{op}: impl='triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                         "importing kernels")
    return impl


@functools.cache
def compiled(fn: Callable) -> Callable:
    """torch.compile of a reference function, built once per function."""
    return torch.compile(fn, dynamic=True)
