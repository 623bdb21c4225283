"""Paged attention over a mixed batch of prefill chunks and decode rows.

One kernel, launched twice on the same batch with different tile shapes, so that no launch needs to know on
the host which sequences decode (no device sync, safe under CUDA graphs, sequences in any order):

- the decode launch (grid: sequences x kv heads x splits) handles the sequences with exactly one query token.
  Its tile is the GROUP query heads that share a kv head (padded to 16 rows for tl.dot), so every KV block is
  read once per kv head. When sequences x kv heads is too small to fill the GPU it splits each context over
  NUM_SPLITS programs (flash-decoding) and a reduce kernel merges their partial softmax states.
- the prefill launch (grid: query tiles x kv heads), only when max_query_len > 1, handles the sequences with
  several query tokens: each program takes BLOCK_Q consecutive query tokens x GROUP heads (BLOCK_M rows), runs
  tl.dot tiles over the visible keys (cached prefix + its own causal part) with an online softmax, and finds
  its sequence by binary search over query_start_loc (vLLM's unified-attention tiling).

In both, key tiles that every row of the program may see run without masks; only the tiles that cross the
causal diagonal or the end of the context are masked.

An fp8 (e4m3) cache is multiplied by its tensor's scale (k_scale, v_scale) in fp32 as each tile is loaded and
rounded to the query's dtype, as vLLM's Triton attention does: the dots stay on the 16-bit tensor-core path,
accumulating in fp32, and the softmax is fp32 as for any cache (an fp32 model's dots: tf32x3, as without fp8).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from servebench.kernels import reference
from servebench.kernels.dispatch import pdl, pdl_enter, pick
from servebench.kernels.quant_layout import FP8


@dataclass(slots=True, frozen=True)
class TileConfig:
    block_m: int  # query rows per program: query tokens x the heads of one kv group
    tile_n: int  # keys per inner-loop step
    num_warps: int
    num_stages: int


# Defaults for an H100 (head_dim 128); benchmarks/kernels_bench.py sweeps alternatives.
DECODE_TILE = TileConfig(block_m=16, tile_n=64, num_warps=4, num_stages=2)
PREFILL_TILE = TileConfig(block_m=128, tile_n=64, num_warps=8, num_stages=2)
# Flash-decoding splits a context until about this many programs run (a few waves on 132 SMs),
# keeping at least MIN_SPLIT_KEYS keys per split.
TARGET_PROGRAMS = 512
MIN_SPLIT_KEYS = 256


@triton.jit
def _find_seq(qsl_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """Sequence owning query tile `tile`; sequence i's tiles start at query_start_loc[i] // BLOCK_Q + i."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(qsl_ptr + mid) // BLOCK_Q + mid <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend(acc, l_i, m_i, q, pos, start, hi, bt_ptr, k_base, v_base, scale_log2, k_scale, v_scale,
            stride_kb, stride_ks, stride_vb, stride_vs,
            HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr,
            MASK: tl.constexpr, PRECISION: tl.constexpr, KV_FP8: tl.constexpr):
    """One online-softmax step over keys [start, start + TILE_N) (log2 domain)."""
    n = start + tl.arange(0, TILE_N)
    d = tl.arange(0, HEAD_DIM)
    if MASK:
        n_ok = n < hi
        blk = tl.load(bt_ptr + n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
    else:
        blk = tl.load(bt_ptr + n // BLOCK_SIZE).to(tl.int64)
    off = n % BLOCK_SIZE
    k_ptrs = k_base + blk[None, :] * stride_kb + off[None, :] * stride_ks + d[:, None]
    v_ptrs = v_base + blk[:, None] * stride_vb + off[:, None] * stride_vs + d[None, :]
    if MASK:
        k = tl.load(k_ptrs, mask=n_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=n_ok[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    if KV_FP8:
        k = (k.to(tl.float32) * k_scale).to(q.dtype)
        v = (v.to(tl.float32) * v_scale).to(q.dtype)
    s = tl.dot(q, k, input_precision=PRECISION) * scale_log2
    if MASK:
        s = tl.where(n[None, :] <= pos[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, l_i, m_new


# Neither the sequence count nor the block table's width (stride_bt: the widest table of an eager step,
# max_model_len's in a CUDA graph) may pick a compiled variant: Triton would compile one for each value that
# is 1 or a multiple of 16, and an eager step of a new kind would wait ~1 s for it at serving time.
@triton.jit(do_not_specialize=["num_seqs", "stride_bt"])
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
    block_tables_ptr, seq_lens_ptr, qsl_ptr, scale_log2, k_scale, v_scale, num_seqs,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, TILE_N: tl.constexpr,
    DECODE: tl.constexpr, NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
    PDL: tl.constexpr,
):
    kv_head = tl.program_id(1)
    if DECODE:
        seq = tl.program_id(0)
        q_tile = 0
    else:
        seq = _find_seq(qsl_ptr, tl.program_id(0), num_seqs, BLOCK_Q)
        q_tile = tl.program_id(0) - (tl.load(qsl_ptr + seq) // BLOCK_Q + seq)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    if DECODE:
        skip = q_len != 1
    else:
        skip = (q_len <= 1) | (q_tile * BLOCK_Q >= q_len)
    seq_len = tl.load(seq_lens_ptr + seq)
    # The step's metadata is no kernel's output: safe to read before waiting on the previous kernel.
    pdl_enter(PDL)
    if skip:
        return

    rows = tl.arange(0, BLOCK_M)
    q_idx = q_tile * BLOCK_Q + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (q_idx < q_len)
    token = (q_start + q_idx).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None], other=0.0)
    pos = seq_len - q_len + q_idx  # absolute position of each query row

    # Keys [0, kv_end) are visible to some row of this tile, keys [0, first + 1) to all of them.
    first = seq_len - q_len + q_tile * BLOCK_Q
    kv_end = tl.minimum(seq_len, first + BLOCK_Q)
    if NUM_SPLITS == 1:
        lo = 0
        hi = kv_end
    else:
        per_split = tl.cdiv(tl.cdiv(kv_end, TILE_N), NUM_SPLITS) * TILE_N
        lo = tl.program_id(2) * per_split
        hi = tl.minimum(lo + per_split, kv_end)
    mid = lo + tl.maximum(tl.minimum(hi, first + 1) - lo, 0) // TILE_N * TILE_N

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    bt_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh
    for start in range(lo, mid, TILE_N):
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, pos, start, hi, bt_ptr, k_base, v_base, scale_log2,
                                k_scale, v_scale, stride_kb, stride_ks, stride_vb, stride_vs,
                                HEAD_DIM, BLOCK_SIZE, TILE_N, False, PRECISION, KV_FP8)
    for start in range(mid, hi, TILE_N):
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, pos, start, hi, bt_ptr, k_base, v_base, scale_log2,
                                k_scale, v_scale, stride_kb, stride_ks, stride_vb, stride_vs,
                                HEAD_DIM, BLOCK_SIZE, TILE_N, True, PRECISION, KV_FP8)

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # l_i == 0 only for an empty context (padding)
        tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        part = (token * (tl.num_programs(1) * GROUP) + head) * NUM_SPLITS + tl.program_id(2)
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=row_ok[:, None])
        tl.store(part_m_ptr + part, m_i, mask=row_ok)
        tl.store(part_l_ptr + part, l_i, mask=row_ok)


@triton.jit
def _merge_splits_kernel(out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, qsl_ptr, stride_ot, stride_oh,
                         HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, PDL: tl.constexpr):
    seq, head = tl.program_id(0), tl.program_id(1)
    token = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - token
    pdl_enter(PDL)
    if q_len != 1:
        return
    token = token.to(tl.int64)
    part = (token * tl.num_programs(1) + head) * NUM_SPLITS + tl.arange(0, NUM_SPLITS)
    m = tl.load(part_m_ptr + part)
    l_s = tl.load(part_l_ptr + part)
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :])
    # Empty splits (contexts shorter than NUM_SPLITS tiles) carry m = -inf and weigh nothing.
    w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - tl.max(m, 0)))
    denom = tl.sum(w * l_s, 0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + tl.arange(0, HEAD_DIM),
             out.to(out_ptr.dtype.element_ty))


def default_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int) -> int:
    """Flash-decoding split count (a power of two): 1 when the batch fills the GPU or contexts are short."""
    programs = max(num_seqs * num_kv_heads, 1)
    splits = min(triton.cdiv(TARGET_PROGRAMS, programs), max_seq_len // MIN_SPLIT_KEYS)
    return 1 << (splits.bit_length() - 1) if splits > 1 else 1


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float, max_query_len: int,
                    max_seq_len: int, num_splits: int | None = None, impl: str = "auto", *,
                    k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Causal attention of q [num_tokens, num_heads, head_dim] over the paged cache
    [num_blocks, block_size, num_kv_heads, head_dim], in q's dtype or fp8 (k_cache * k_scale, v_cache *
    v_scale: kernels.kv_write); returns out shaped like q (dtype of q).

    Sequence i owns q[query_start_loc[i]:query_start_loc[i + 1]], the last tokens of its seq_lens[i]-token
    context, whose K/V are already in the cache. max_query_len must bound the query lengths (it gates the
    prefill launch); max_seq_len only guides num_splits (None: default_num_splits; a power of two forces
    flash-decoding for the single-token sequences). Rows of out past query_start_loc[-1] are left unset.
    """
    if pick("paged_attention", q, impl) == "torch":
        return reference.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                                         k_scale, v_scale)
    num_tokens, num_heads, head_dim = q.shape
    num_seqs, num_kv_heads = query_start_loc.shape[0] - 1, k_cache.shape[2]
    _check(q, k_cache, v_cache, block_tables, num_splits)
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
    if num_tokens == 0 or num_seqs == 0:
        return out
    if num_splits is None:
        num_splits = default_num_splits(num_seqs, num_kv_heads, max_seq_len)
    group = num_heads // num_kv_heads
    args = (q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc, scale, k_scale, v_scale, group)
    if num_splits == 1:
        _launch(*args, None, DECODE_TILE, decode=True, num_splits=1)
    else:
        part_m = torch.empty(num_tokens, num_heads, num_splits, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(*part_m.shape, head_dim, dtype=torch.float32, device=q.device)
        _launch(*args, (part_acc, part_m, part_l), DECODE_TILE, decode=True, num_splits=num_splits)
        chained = pdl(q)
        _merge_splits_kernel[(num_seqs, num_heads)](out, part_acc, part_m, part_l, query_start_loc,
                                                    out.stride(0), out.stride(1),
                                                    HEAD_DIM=head_dim, NUM_SPLITS=num_splits, PDL=chained,
                                                    num_warps=4, launch_pdl=chained)
    if max_query_len > 1:
        _launch(*args, None, PREFILL_TILE, decode=False, num_splits=1)
    return out


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
           num_splits: int | None) -> None:
    (_, num_heads, head_dim), num_kv_heads = q.shape, k_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"paged_attention: num_heads={num_heads} is not a multiple of "
                         f"num_kv_heads={num_kv_heads}")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"paged_attention: head_dim={head_dim} must be a power of two >= 16 (Triton kernel)")
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in (q.dtype, FP8):
        raise ValueError(f"paged_attention: the k and v caches ({k_cache.dtype}, {v_cache.dtype}) need one "
                         f"dtype, q's ({q.dtype}) or fp8")
    if any(t.stride(-1) != 1 for t in (q, k_cache, v_cache, block_tables)):
        raise ValueError("paged_attention: q, the KV cache and block_tables need a contiguous last dimension")
    if num_splits is not None and (num_splits < 1 or num_splits & (num_splits - 1)):
        raise ValueError(f"paged_attention: num_splits={num_splits} must be a power of two")


def _launch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
            block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
            k_scale: float, v_scale: float, group: int, parts: tuple[torch.Tensor, ...] | None,
            tile: TileConfig, decode: bool, num_splits: int) -> None:
    num_tokens, num_seqs, num_kv_heads = q.shape[0], query_start_loc.shape[0] - 1, k_cache.shape[2]
    if q.dtype == torch.float32:  # twice the bytes per element (and 3 tf32 dots): halve the tiles
        tile = replace(tile, block_m=max(tile.block_m // 2, 16), tile_n=max(tile.tile_n // 2, 16))
    block_m = max(tile.block_m, triton.next_power_of_2(group))
    block_q = 1 if decode else block_m // group
    grid = (num_seqs if decode else num_tokens // block_q + num_seqs, num_kv_heads, num_splits)
    part_acc, part_m, part_l = parts if parts is not None else (out, out, out)  # unused when num_splits == 1
    chained = pdl(q)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, part_acc, part_m, part_l,
        block_tables, seq_lens, query_start_loc, scale * 1.4426950408889634,  # log2(e): use exp2
        k_scale, v_scale, num_seqs,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        GROUP=group, HEAD_DIM=q.shape[2], BLOCK_SIZE=k_cache.shape[1],
        BLOCK_Q=block_q, BLOCK_M=block_m, TILE_N=tile.tile_n,
        DECODE=decode, NUM_SPLITS=num_splits, PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32",
        KV_FP8=k_cache.dtype == FP8, PDL=chained, num_warps=tile.num_warps, num_stages=tile.num_stages,
        launch_pdl=chained,
    )
