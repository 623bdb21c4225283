"""Which implementation runs a kernel call: Triton, the torch reference, or torch.compile of the reference."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl

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


# GPUs whose decode step programmatic dependent launch measured faster (batch-1 Llama-2-7B, one call each,
# benchmarks/results/h100_pin_pdl_ab.log): H100 5.17 -> 5.08 ms (with kernels.linear.PINNED). On an H200 it
# measured 3.86 -> 3.92 ms.
PDL_GPUS = frozenset({"NVIDIA H100 80GB HBM3"})


def pdl(x: torch.Tensor) -> bool:
    """Whether the decode-step kernels on x's device chain through programmatic dependent launch (PDL_GPUS).

    Each such kernel is launched with launch_pdl, so the GPU may start it while the kernel before it drains:
    its launch and setup (and the linear layers' request for their first weight bytes into L2, which no
    kernel writes) overlap that kernel's tail. gdc_wait then holds it until the previous kernel has finished
    and its writes are visible; every kernel launched so calls it, which makes the ordering transitive.
    gdc_launch_dependents lets the next kernel start: the small kernels (RMSNorm, attention, split merge)
    call it at entry, the linear layers only after their K loop. Called at entry there (session 4), the
    next kernel's programs took the SM slots that the linear layer's later waves needed: +0.2 ms a batch-1
    Llama-2-7B step on an H100, where called after the loop it gives -0.1 ms."""
    return x.is_cuda and not INTERPRET and device_name(x.device) in PDL_GPUS


@functools.cache
def device_name(device: torch.device) -> str:
    """torch.cuda.get_device_name, once per device ('cpu' for the CPU)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


@triton.jit
def pdl_enter(ON: tl.constexpr):
    """The start of a kernel with little work per program (kernels.dispatch.pdl): let the next kernel
    launch, then wait for the previous one."""
    if ON:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
