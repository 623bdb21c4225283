"""int4 weight-only linear layers (AWQ, GPTQ): out = x @ W^T with W dequantized tile by tile in the kernel.

The weights are in GPTQ's layout (kernels.quant_layout; the engine repacks AWQ checkpoints at load): qweight
[K / 8, N] int32 packed along K, qzeros [K / G, N / 8] packed along N, holding z - zero_offset, scales
[K / G, N]. A program owns BLOCK_M rows of x and BLOCK_N output columns and walks K in tiles of BLOCK_K, a
divisor of the group size G, so a tile has one scale and zero per column: it loads the tile's packed words
(each of the 8 rows of a word asks for the same address, which the load unit serves once), unpacks,
computes (q - z) * s in fp32, rounds to x's dtype (the reference's rounding) and accumulates one tensor-core
dot in fp32. Decode-sized calls (M <= SMALL_M) and larger ones take separate tile candidates: a decode step
streams the 4-bit weights once, a prefill reuses each dequantized tile over many rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from servebench.kernels import reference
from servebench.kernels.dispatch import INTERPRET, pick

SMALL_M = 16  # rows up to which the decode candidates run
MIN_GROUP = 32  # the smallest K tile: a group size must be a multiple of it


def _configs(tiles: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in tiles]


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): not yet tuned on a GPU (benchmarks/quantized_decode.py).
SMALL_CONFIGS = _configs([(16, 32, 128, 4, 4), (16, 64, 128, 4, 4), (16, 32, 64, 4, 4), (16, 64, 64, 4, 3),
                          (16, 32, 32, 4, 4)])
LARGE_CONFIGS = _configs([(64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (64, 64, 128, 4, 3),
                          (128, 64, 32, 4, 4), (64, 64, 32, 4, 4)])
if INTERPRET:  # the CPU interpreter would run every candidate; BLOCK_K 32 divides every group size
    SMALL_CONFIGS, LARGE_CONFIGS = SMALL_CONFIGS[-1:], LARGE_CONFIGS[-1:]


@triton.jit
def int4_matmul_kernel(x_ptr, qw_ptr, s_ptr, qz_ptr, b_ptr, out_ptr, M, N, K,
                       stride_xm, stride_qw, stride_s, stride_qz, stride_om,
                       GROUP_SIZE: tl.constexpr, ZERO_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
                       PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """out[rows, cols] = x[rows] @ W[cols]^T (+ bias) for the BLOCK_M rows of program_id(1) and the BLOCK_N
    columns of program_id(0); K is a multiple of BLOCK_K, which divides GROUP_SIZE."""
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    kk = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + kk[None, :]
    w_ptrs = qw_ptr + (kk // 8)[:, None] * stride_qw + cols[None, :]
    w_shift = ((kk % 8) * 4)[:, None]
    z_shift = (cols % 8) * 4
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptrs + k0, mask=row_ok[:, None], other=0.0)
        packed = tl.load(w_ptrs + (k0 // 8) * stride_qw, mask=col_ok[None, :], other=0)
        group = k0 // GROUP_SIZE
        s = tl.load(s_ptr + group * stride_s + cols, mask=col_ok, other=0.0).to(tl.float32)
        z = (tl.load(qz_ptr + group * stride_qz + cols // 8, mask=col_ok, other=0) >> z_shift) & 0xF
        q = (packed >> w_shift) & 0xF
        w = ((q - (z + ZERO_OFFSET)[None, :]).to(tl.float32) * s[None, :]).to(x.dtype)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _fitting(configs: list[triton.Config], nargs: dict, **kwargs) -> list[triton.Config]:
    """The candidates whose K tile divides the group size (and so K)."""
    return [c for c in configs if nargs["GROUP_SIZE"] % c.kwargs["BLOCK_K"] == 0]


_KEY = ["N", "K", "GROUP_SIZE"]
TUNERS = {name: triton.autotune(configs=configs, key=_KEY, prune_configs_by={"early_config_prune": _fitting})(
    int4_matmul_kernel) for name, configs in (("small", SMALL_CONFIGS), ("large", LARGE_CONFIGS))}


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None = None, zero_offset: int = 0, impl: str = "auto") -> torch.Tensor:
    """F.linear(x, W, bias) for x [..., K] and the int4 weight W [N, K] in GPTQ's layout (module docstring),
    its group size K / scales.shape[0]; out in x's dtype."""
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    if x.shape[-1] != k:
        raise ValueError(f"int4_linear: x has {x.shape[-1]} features, the weight {k}")
    if pick("int4_linear", x, impl) == "torch":
        return reference.int4_linear(x, qweight, qzeros, scales, bias, zero_offset)
    if any(t.stride(-1) != 1 for t in (qweight, qzeros, scales)):
        raise ValueError("int4_linear: qweight, qzeros and scales need a contiguous last dimension")
    group_size = k // scales.shape[0]
    if group_size % MIN_GROUP:
        raise ValueError(f"int4_linear: group size {group_size} is not a multiple of {MIN_GROUP} "
                         "(the smallest K tile)")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        tuner = TUNERS["small" if m <= SMALL_M else "large"]
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, meta["BLOCK_M"]))  # noqa: E731
        tuner[grid](x2, qweight, scales, qzeros, bias if bias is not None else scales, out, m, n, k,
                    x2.stride(0), qweight.stride(0), scales.stride(0), qzeros.stride(0), out.stride(0),
                    group_size, ZERO_OFFSET=zero_offset, HAS_BIAS=bias is not None,
                    PRECISION="tf32x3" if x.dtype == torch.float32 else "tf32")
    return out.view(*x.shape[:-1], n)
