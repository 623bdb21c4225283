"""Multi-LoRA: each token row of a batch adds its own adapter's low-rank update to a linear layer's output, as
Punica's and S-LoRA's SGMV kernels do (shrink to the rank, expand back).

The adapters sit in slot tables: A [slots, S * R, K] and B [slots, N, R] for a projection of K inputs and N
outputs made of S slices (a fused q/k/v projection has three, q, k and v, whose output columns start at
`slice_starts`). Slice s of an adapter uses rows [s R, s R + r) of A and columns [0, r) of B, zero beyond its
rank r <= R; the LoRA scaling is folded into B. Table index i holds adapter slot i + 1; slot 0 is the base
model, whose rows add nothing.

The rows are grouped by slot on the host (LoRAIndices): each program takes BLOCK_M rows of one slot, so its
adapter's tile is loaded once for all of them and multiplied in one tensor-core dot. Shrink writes
x @ A^T in fp32, split along K into SPLIT_K partial sums for decode-sized groups (where one slot's few rows
give too few programs to stream A); expand sums them, rounds to the model's dtype (the reference's
rounding), multiplies by B^T and adds the result to y in place. Programs of a slot with fewer rows than their
block exit at once, so the grid (rows of the largest group, all slots) can be fixed for a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from servebench.kernels import reference
from servebench.kernels.dispatch import pick

SHRINK_BLOCK_K = 64
MAX_SPLIT_K = 16
SMALL_M = 16  # groups of at most this many rows take 16-row blocks and split shrink's K


@dataclass(slots=True)
class LoRAIndices:
    """A batch's token rows grouped by adapter slot: the rows of slot s are
    `sorted_rows[slot_starts[s]:slot_starts[s + 1]]` (slot 0: no adapter)."""

    sorted_rows: torch.Tensor  # int32 [rows]
    slot_starts: torch.Tensor  # int32 [slots + 2]
    max_rows: int  # rows of the largest adapter group (a CUDA graph: its batch); 0: no row has an adapter


@triton.jit
def _group_rows(sorted_ptr, starts_ptr, slot, pid_m, BLOCK_M: tl.constexpr):
    """This program's rows (row ids, which are valid) of adapter `slot`, and whether it has any."""
    start = tl.load(starts_ptr + slot)
    end = tl.load(starts_ptr + slot + 1)
    at = start + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = at < end
    rows = tl.load(sorted_ptr + at, mask=ok, other=0).to(tl.int64)
    return rows, ok, start + pid_m * BLOCK_M < end


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, out_ptr, sorted_ptr, starts_ptr, K, stride_xm, stride_at, stride_ar,
                   stride_os, stride_om, R: tl.constexpr, SPLIT_K: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[split, rows, s R:(s + 1) R] = x[rows, K slice] @ A[slot, s R:(s + 1) R, K slice]^T for the rows of
    program_id(0), slice s and split of program_id(1), adapter table index program_id(2)."""
    table = tl.program_id(2)
    rows, row_ok, busy = _group_rows(sorted_ptr, starts_ptr, table + 1, tl.program_id(0), BLOCK_M)
    if busy:
        s, split = tl.program_id(1) // SPLIT_K, tl.program_id(1) % SPLIT_K
        r = s * R + tl.arange(0, R)
        span = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
        k_lo = split * span
        x_base = x_ptr + rows[:, None] * stride_xm
        a_base = a_ptr + table.to(tl.int64) * stride_at + r[:, None] * stride_ar
        acc = tl.zeros([BLOCK_M, R], dtype=tl.float32)
        for k0 in range(k_lo, tl.minimum(k_lo + span, K), BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            x = tl.load(x_base + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            a = tl.load(a_base + k[None, :], mask=k_ok[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(a), acc, input_precision=PRECISION)
        tl.store(out_ptr + split * stride_os + rows[:, None] * stride_om + r[None, :], acc,
                 mask=row_ok[:, None])


@triton.jit
def _expand_slice(acc, shrunk_ptr, rows, row_ok, stride_ss, stride_sm, b, cols, lo, hi, s: tl.constexpr,
                  R: tl.constexpr, SPLIT_K: tl.constexpr, PRECISION: tl.constexpr):
    """acc + (the rows' shrunk slice s, its split-K partials summed) @ B^T over the columns [lo, hi)."""
    r = s * R + tl.arange(0, R)
    ptrs = shrunk_ptr + rows[:, None] * stride_sm + r[None, :]
    shrunk = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    for split in tl.static_range(1, SPLIT_K):
        shrunk += tl.load(ptrs + split * stride_ss, mask=row_ok[:, None], other=0.0)
    in_slice = (cols >= lo) & (cols < hi)
    b_slice = tl.where(in_slice[:, None], b, tl.zeros_like(b))
    return tl.dot(shrunk.to(b.dtype), tl.trans(b_slice), acc, input_precision=PRECISION)


@triton.jit
def _expand_kernel(shrunk_ptr, b_ptr, y_ptr, sorted_ptr, starts_ptr, N, SLICE1, SLICE2, stride_ss, stride_sm,
                   stride_bt, stride_bn, stride_ym, R: tl.constexpr, NUM_SLICES: tl.constexpr,
                   SPLIT_K: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """y[rows, cols] += shrunk[rows] @ B[slot, cols]^T, each column with its slice's part of shrunk (slices
    start at 0, SLICE1, SLICE2), for the rows of program_id(0), the BLOCK_N columns of program_id(1),
    adapter table index program_id(2)."""
    table = tl.program_id(2)
    rows, row_ok, busy = _group_rows(sorted_ptr, starts_ptr, table + 1, tl.program_id(0), BLOCK_M)
    if busy:
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        b = tl.load(b_ptr + table.to(tl.int64) * stride_bt + cols[:, None] * stride_bn
                    + tl.arange(0, R)[None, :], mask=col_ok[:, None], other=0.0)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc = _expand_slice(acc, shrunk_ptr, rows, row_ok, stride_ss, stride_sm, b, cols, 0,
                            SLICE1, 0, R, SPLIT_K, PRECISION)
        if NUM_SLICES > 1:
            acc = _expand_slice(acc, shrunk_ptr, rows, row_ok, stride_ss, stride_sm, b, cols, SLICE1,
                                SLICE2, 1, R, SPLIT_K, PRECISION)
        if NUM_SLICES > 2:
            acc = _expand_slice(acc, shrunk_ptr, rows, row_ok, stride_ss, stride_sm, b, cols, SLICE2,
                                N, 2, R, SPLIT_K, PRECISION)
        ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        y = tl.load(ptrs, mask=mask, other=0.0)
        tl.store(ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=mask)


def add_lora(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
             indices: LoRAIndices, slice_starts: tuple[int, ...] = (0,), impl: str = "auto") -> None:
    """y[t] += the LoRA update of row t's adapter, in place, for y [rows, N] = a projection of x [rows, K]:
    for each slice s (output columns from slice_starts[s]), (x[t] @ A[s R:(s + 1) R]^T) @ B[cols]^T, with
    A = lora_a[slot - 1] [S R, K] and B = lora_b[slot - 1] [N, R] (module docstring)."""
    if indices.max_rows == 0:
        return
    num_slices, rank = len(slice_starts), lora_b.shape[-1]
    if lora_a.shape[1] != num_slices * rank or num_slices > 3:
        raise ValueError(f"add_lora: lora_a {tuple(lora_a.shape)} does not hold {num_slices} slices of rank "
                         f"{rank} (at most 3)")
    if pick("add_lora", x, impl) == "torch":
        reference.add_lora(y, x, lora_a, lora_b, indices.sorted_rows, indices.slot_starts, slice_starts)
        return
    _launch(y, x, lora_a, lora_b, indices, slice_starts)


def _launch(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
            indices: LoRAIndices, slice_starts: tuple[int, ...]) -> None:
    tables, num_slices, rank = lora_a.shape[0], len(slice_starts), lora_b.shape[-1]
    k, n = x.shape[-1], y.shape[-1]
    if rank < 16 or rank & (rank - 1) or any(t.stride(-1) != 1 for t in (y, x, lora_a, lora_b)):
        raise ValueError("add_lora: the rank needs to be a power of two >= 16 (a tensor-core dot), and every "
                         "tensor a contiguous last dimension")
    small = indices.max_rows <= SMALL_M
    block_m = 16 if small else 64
    split_k = max(1, min(MAX_SPLIT_K, triton.cdiv(k, SHRINK_BLOCK_K) // 4)) if small else 1
    shrunk = torch.empty(split_k, y.shape[0], num_slices * rank, dtype=torch.float32, device=x.device)
    precision = "tf32x3" if x.dtype == torch.float32 else "tf32"
    blocks_m = triton.cdiv(indices.max_rows, block_m)
    rows, starts = indices.sorted_rows, indices.slot_starts
    _shrink_kernel[(blocks_m, num_slices * split_k, tables)](
        x, lora_a, shrunk, rows, starts, k, x.stride(0), lora_a.stride(0), lora_a.stride(1), shrunk.stride(0),
        shrunk.stride(1), R=rank, SPLIT_K=split_k, PRECISION=precision, BLOCK_M=block_m,
        BLOCK_K=SHRINK_BLOCK_K, num_warps=4)
    block_n = 64
    bounds = [*slice_starts[1:], n, n]
    _expand_kernel[(blocks_m, triton.cdiv(n, block_n), tables)](
        shrunk, lora_b, y, rows, starts, n, bounds[0], bounds[1], shrunk.stride(0), shrunk.stride(1),
        lora_b.stride(0), lora_b.stride(1), y.stride(0), R=rank, NUM_SLICES=num_slices, SPLIT_K=split_k,
        PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
