"""Linear layers of decode steps: a few rows times a weight matrix, a pure stream over the weights.

cuBLAS picks its GEMM kernels for large M; at M <= SKINNY_MAX_M (decode batches of 1 to 16) its best reaches
~2.6 TB/s on an H100 (benchmarks/decode_breakdown.py), while the step is bound by reading every weight once.
This kernel gives each program a slab of BLOCK_N weight rows and streams it along K with deep software
pipelining, so many loads are in flight per SM; the rows of x ride along in one tensor-core dot per tile.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.dispatch import INTERPRET, pick

SKINNY_MAX_M = 16  # above this, the step is no longer a pure weight stream: cuBLAS

# Candidates timed once per weight shape (N, K) on first use: the winners of `benchmarks/decode_breakdown.py
# --sweep` (48 configs) on an H100 over the Llama-2-7B shapes (2.36-2.96 TB/s against cuBLAS's 2.12-2.69).
CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=4, num_stages=s)
           for bn, bk, s in [(32, 128, 4), (32, 512, 3), (32, 512, 4), (64, 256, 4), (64, 128, 3)]]
if INTERPRET:  # the CPU interpreter would run every candidate
    CONFIGS = CONFIGS[:1]


@triton.autotune(configs=CONFIGS, key=["N", "K"])
@triton.jit
def _skinny_matmul_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                          HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    x_base = x_ptr + rows[:, None] * stride_xm
    w_base = w_ptr + cols.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        x = tl.load(x_base + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_base + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           impl: str = "auto") -> torch.Tensor:
    """F.linear(x, weight, bias); the streaming kernel for at most SKINNY_MAX_M rows of half-precision x."""
    backend = pick("linear", x, impl)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if backend == "torch" or rows == 0 or rows > SKINNY_MAX_M or x.dtype == torch.float32:
        return F.linear(x, weight, bias)
    n, k = weight.shape
    x2 = x.reshape(rows, k)
    if x2.stride(-1) != 1 or weight.stride(-1) != 1:
        return F.linear(x, weight, bias)
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _skinny_matmul_kernel[grid](x2, weight, bias if bias is not None else weight, out, rows, n, k,
                                x2.stride(0), weight.stride(0), out.stride(0),
                                HAS_BIAS=bias is not None, BLOCK_M=16)
    return out.view(*x.shape[:-1], n)
