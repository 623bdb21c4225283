"""Linear layers of decode steps: a few rows times a weight matrix, a pure stream over the weights.

cuBLAS picks its GEMM kernels for large M; at M <= SKINNY_MAX_M (decode batches of 1 to 16) its best reaches
~2.6 TB/s on an H100 (benchmarks/decode_breakdown.py), while the step is bound by reading every weight once.
This kernel gives each program a slab of BLOCK_N weight rows and streams it along K with deep software
pipelining, so many loads are in flight per SM; the rows of x ride along in one tensor-core dot per tile.

split_k serves the layers with few output columns (o_proj, down_proj: N = 4096, 128 slabs of 32 for 132
SMs), where too few loads are in flight: SPLIT_K programs share a slab, each over a slice of K, and store
fp32 partial sums (SplitK). The RMSNorm that always follows these layers reduces them (kernels.rms_norm), so
the split costs no extra launch. The autotuner picks SPLIT_K per weight shape, 1 included. SPLIT_K 4 streams
faster still alone (benchmarks/decode_breakdown.py --sweep) but the norm then reads twice the partials: in a
whole decode step 1 or 2 measured best (results/h100_decode_variants.log).

Column pairing: a decode step is ~8 kernels a layer, each with a fixed launch-to-drain cost, so the
element-wise op after a projection runs in its epilogue. swiglu (gate_up_proj): each program streams
BLOCK_N / 2 rows of the gate half of the weight and the same rows of the up half, so its tile holds both
operands of its outputs, and it stores silu(gate) * up (kernels.silu_and_mul's rounding): no SwiGLU launch,
half the writes. linear_rotary_store_kv (qkv_proj): each program's halves are dims c and c + head_dim / 2 of
one head, which is what the neox rotary pairs; it rotates q and k and writes k and v to the paged cache: no
rotary launch. Together -0.2 ms a batch-1 step on an H100 (results/h100_swiglu_merge_ab.log,
results/h100_rope_ab.log). Tried and dropped (A/B logs in results/): SwiGLU fused into down_proj's stream
(recomputed for the 16 padded rows of every program: +1 ms), the RMSNorm computed inside the next
projection (the kernel grew by what the norm launches cost), prefetching the next layer's weights into L2
(slower), .cg / evict_first weight loads (no change).

Programmatic dependent launch (kernels.dispatch.pdl, on the GPUs it measured faster on): each program asks
for the first PREFETCH_BYTES of its weight rows into L2 while the previous kernel drains, waits for it, and
lets the next kernel launch once past its K loop. With the configs PINNED for the GPU, the batch-1
Llama-2-7B step on an H100 went from 5.17 to 5.08 ms (results/h100_pin_pdl_ab.log).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from servebench.kernels.activation import silu_and_mul
from servebench.kernels.dispatch import INTERPRET, device_name, pdl, pick
from servebench.kernels.kv_write import kv_fp8, rotary_store_kv, to_cache
from servebench.kernels.quant_layout import FP8
from servebench.kernels.rotary import rotate_halves

SKINNY_MAX_M = 16  # above this, the step is no longer a pure weight stream: cuBLAS
SPLITS = (1, 2)  # split-K counts the autotuner may pick
HALF_DTYPES = (torch.float16, torch.bfloat16)

# Candidates timed once per weight shape (N, K) on first use: the winners of `benchmarks/decode_breakdown.py
# --sweep` (48 configs) on an H100 over the Llama-2-7B shapes (2.36-2.96 TB/s against cuBLAS's 2.12-2.69);
# with split_k, each of them at every count in SPLITS (the sweep times SPLIT_K 2 and 4 for o and down).
_TILES = [(32, 128, 4), (32, 512, 3), (32, 512, 4), (64, 256, 4), (64, 128, 3)]  # BLOCK_N, BLOCK_K, stages
CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": 1}, num_warps=4, num_stages=s)
           for bn, bk, s in _TILES]
SPLIT_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=4, num_stages=s)
                 for bn, bk, s in _TILES for sk in SPLITS]
if INTERPRET:  # the CPU interpreter would run every candidate
    CONFIGS, SPLIT_CONFIGS = CONFIGS[:1], SPLIT_CONFIGS[:1]
# Timed alone, candidates within a few percent of each other swap places from run to run, and which one wins
# alone is not always what makes the decode step fastest. On the GPUs named here, shapes named here take the
# config that the whole step measured best (BLOCK_N, BLOCK_K, SPLIT_K, stages, by tuner and weight shape;
# benchmarks/results/h100_pin_sweep.log): on an H100 with PDL, a batch-1 Llama-2-7B step of 5.08 ms, against
# 5.10-5.31 ms with any one shape's config changed and 5.14-5.27 ms over the autotuner's own picks.
PINNED: dict[str, dict[tuple[str, int, int], tuple[int, int, int, int]]] = {
    "NVIDIA H100 80GB HBM3": {
        ("plain", 32000, 4096): (64, 256, 1, 4), ("split", 4096, 4096): (64, 256, 2, 4),
        ("split", 4096, 11008): (64, 256, 2, 4), ("swiglu", 22016, 4096): (64, 256, 1, 4),
        ("rope", 12288, 4096): (64, 128, 1, 3)},
}
PREFETCH_BYTES = 1024  # of each weight row's slice, requested into L2 before waiting on the previous kernel


@dataclass(slots=True)
class SplitK:
    """A linear layer's output left as fp32 partial sums over slices of K, for kernels.rms_norm to reduce."""

    partials: torch.Tensor  # [splits, rows, N] fp32
    dtype: torch.dtype  # of the layer's output: the sum is rounded to it, as the unsplit kernel rounds
    shape: torch.Size  # of the layer's output, [..., N]

    def reduce(self) -> torch.Tensor:
        """The layer's output, as linear() without split_k returns it (up to fp32 summation order)."""
        return self.partials.sum(0).to(self.dtype).view(self.shape)


@triton.jit
def _prefetch_l2(ptrs, nbytes):
    """Ask for nbytes (a multiple of 16; 0: nothing) at each of ptrs to be brought into L2."""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.u32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; "
        "mov.u32 $0, 0; }", "=r,l,r", [ptrs, nbytes], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _rotary_store_kv_tile(x1, x2, out_ptr, rows, row_ok, stride_om, first_pair, pos_ptr, cs_ptr, stride_cs,
                          slot_ptr, kc_ptr, vc_ptr, stride_cb, stride_cbs, stride_ch, k_scale, v_scale,
                          HALF: tl.constexpr, NQ: tl.constexpr, NKV: tl.constexpr, HEAD_DIM: tl.constexpr,
                          CACHE_BLOCK: tl.constexpr, KV_FP8: tl.constexpr):
    """The epilogue of a qkv projection tile: x1, x2 [rows, HALF] are dims c and c + HEAD_DIM / 2 of one head
    (pairs first_pair...); q and k heads are rotated (neox, kernels.rotary's rounding), all are stored to
    out, and k and v heads also to the paged cache at each row's slot (negative: padding, skipped), as
    kernels.kv_write stores them (an fp8 cache: divided by k_scale or v_scale)."""
    dt = out_ptr.dtype.element_ty
    head = first_pair // (HEAD_DIM // 2)
    c = first_pair % (HEAD_DIM // 2) + tl.arange(0, HALF)
    if head < NQ + NKV:
        pos = tl.load(pos_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        cos = tl.load(cs_ptr + pos[:, None] * stride_cs + c[None, :], mask=row_ok[:, None], other=0.0)
        sin = tl.load(cs_ptr + pos[:, None] * stride_cs + HEAD_DIM // 2 + c[None, :], mask=row_ok[:, None],
                      other=0.0)
        o1, o2 = rotate_halves(x1, x2, cos, sin, dt)
    else:
        o1, o2 = x1.to(dt), x2.to(dt)
    col = head * HEAD_DIM + c
    tl.store(out_ptr + rows[:, None] * stride_om + col[None, :], o1, mask=row_ok[:, None])
    tl.store(out_ptr + rows[:, None] * stride_om + (col + HEAD_DIM // 2)[None, :], o2, mask=row_ok[:, None])
    if head >= NQ:
        slot = tl.load(slot_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
        if head < NQ + NKV:
            cache = kc_ptr
            scale = k_scale
        else:
            cache = vc_ptr
            scale = v_scale
        base = ((slot // CACHE_BLOCK) * stride_cb + (slot % CACHE_BLOCK) * stride_cbs
                + ((head - NQ) % NKV) * stride_ch)
        ok = (row_ok & (slot >= 0))[:, None]
        tl.store(cache + base[:, None] + c[None, :], to_cache(o1, scale, cache, KV_FP8), mask=ok)
        tl.store(cache + base[:, None] + (c + HEAD_DIM // 2)[None, :], to_cache(o2, scale, cache, KV_FP8),
                 mask=ok)


@triton.jit
def skinny_matmul_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_os, stride_om,
                         pos_ptr, cs_ptr, stride_cs, slot_ptr, kc_ptr, vc_ptr, stride_cb, stride_cbs,
                         stride_ch, k_scale, v_scale, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                         SWIGLU: tl.constexpr = False, ROPE: tl.constexpr = False, NQ: tl.constexpr = 0,
                         NKV: tl.constexpr = 0, HEAD_DIM: tl.constexpr = 2, CACHE_BLOCK: tl.constexpr = 1,
                         KV_FP8: tl.constexpr = False, PDL: tl.constexpr = False, PREFETCH: tl.constexpr = 0):
    """out[split] = x[:, Ks] @ w[:, Ks].T over the BLOCK_N columns of program_id(0) and the K slice Ks of
    split = program_id(1). The column pairing modes (SPLIT_K 1), where the program's tile is two halves of
    BLOCK_N / 2 columns each, from first + [0, HALF) and second + [0, HALF):
    SWIGLU: w is [gate; up] (N = 2 I); the halves are the same gate and up rows, and out [M, I] gets
    silu(gate) * up; ROPE: w is a qkv projection (NQ, NKV, NKV heads of HEAD_DIM); the halves are dims c and
    c + HEAD_DIM / 2 of one head, rotated and written to the cache in _rotary_store_kv_tile."""
    HALF: tl.constexpr = BLOCK_N // 2
    rows = tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    if SWIGLU:
        j = tl.arange(0, BLOCK_N)
        out_col = tl.program_id(0) * HALF + j % HALF
        cols = out_col + (j // HALF) * (N // 2)  # weight rows: gate for j < HALF, then up
        col_ok = out_col < N // 2
    elif ROPE:
        j = tl.arange(0, BLOCK_N)
        pair = tl.program_id(0) * HALF + j % HALF  # HALF divides HEAD_DIM / 2: one head per program
        cols = (pair // (HEAD_DIM // 2)) * HEAD_DIM + pair % (HEAD_DIM // 2) + (j // HALF) * (HEAD_DIM // 2)
        col_ok = cols < N
    else:
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
    row_ok = rows < M
    if SPLIT_K == 1:  # the loop bounds the unsplit kernel was tuned with
        k_lo, k_hi = 0, K
    else:
        # Each split takes whole K tiles (only K's last tile is partial); a split that starts past the end
        # of K stores zeros, so the partials buffer needs no zeroing pass.
        span = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
        k_lo = split * span
        k_hi = tl.minimum(k_lo + span, K)
    x_base = x_ptr + rows[:, None] * stride_xm
    w_base = w_ptr + cols.to(tl.int64)[:, None] * stride_wn
    if PDL:  # kernels.dispatch.pdl; the weights are no kernel's output: safe to ask for before waiting
        if PREFETCH > 0:
            nbytes = (tl.maximum(tl.minimum(k_hi - k_lo, PREFETCH // 2), 0) * 2).to(tl.uint32)
            rows_at = w_ptr + tl.where(col_ok, cols, 0).to(tl.int64) * stride_wn + k_lo
            _prefetch_l2(rows_at.to(tl.int64), tl.full([BLOCK_N], 0, tl.uint32) + nbytes)
        tl.extra.cuda.gdc_wait()
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        x = tl.load(x_base + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_base + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if SWIGLU or ROPE:
        # Rounded as the unfused ops round: the projection to the activation dtype first.
        dt = out_ptr.dtype.element_ty
        first, second = tl.split(tl.permute(tl.reshape(acc.to(dt).to(tl.float32), (BLOCK_M, 2, HALF)),
                                            (0, 2, 1)))
    if ROPE:
        _rotary_store_kv_tile(first, second, out_ptr, rows, row_ok, stride_om, tl.program_id(0) * HALF,
                              pos_ptr, cs_ptr, stride_cs, slot_ptr, kc_ptr, vc_ptr, stride_cb, stride_cbs,
                              stride_ch, k_scale, v_scale, HALF, NQ, NKV, HEAD_DIM, CACHE_BLOCK, KV_FP8)
    elif SWIGLU:
        gate, up = first, second
        act = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
        out_cols = tl.program_id(0) * HALF + tl.arange(0, HALF)
        tl.store(out_ptr + rows[:, None] * stride_om + out_cols[None, :], (act * up).to(dt),
                 mask=row_ok[:, None] & (out_cols < N // 2)[None, :])
    else:
        tl.store(out_ptr + split * stride_os + rows[:, None] * stride_om + cols[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _pinned(name: str, configs: list[triton.Config], nargs: dict, **kwargs) -> list[triton.Config]:
    """The autotuner's candidates for one call: PINNED's config where it names this GPU and shape."""
    pin = PINNED.get(device_name(nargs["w_ptr"].device), {}).get((name, nargs["N"], nargs["K"]))
    if pin is None:
        return configs
    block_n, block_k, split_k, stages = pin
    return [triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k}, num_warps=4,
                          num_stages=stages)]


_KEY = ["N", "K"]
TUNERS = {name: triton.autotune(configs=SPLIT_CONFIGS if name == "split" else CONFIGS, key=_KEY,
                                prune_configs_by={"early_config_prune": functools.partial(_pinned, name)})(
    skinny_matmul_kernel) for name in ("plain", "split", "swiglu", "rope")}


def tuned_configs() -> dict[str, str]:
    """What the autotuners chose so far, per weight shape (N, K): for benchmark reports."""
    return {f"{name} {key[:2]}": str(cfg)
            for name, tuner in TUNERS.items() for key, cfg in tuner.cache.items()}


def _streams(x: torch.Tensor, weight: torch.Tensor, impl: str) -> bool:
    """Whether the streaming kernel takes x [..., K] times weight (else F.linear)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (pick("linear", x, impl) != "torch" and 0 < rows <= SKINNY_MAX_M and x.dtype in HALF_DTYPES
            and x.stride(-1) == 1 and weight.stride(-1) == 1)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, impl: str = "auto", *,
           split_k: bool = False, swiglu: bool = False) -> torch.Tensor | SplitK:
    """F.linear(x, weight, bias); the streaming kernel for at most SKINNY_MAX_M rows of half-precision x.

    split_k: when the streaming kernel runs and there is no bias, the result may be a SplitK whose only
    consumer must be kernels.rms_norm; otherwise a tensor.
    swiglu: weight is a fused [gate; up] projection; returns silu_and_mul(F.linear(x, weight, bias))."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    n, k = weight.shape
    if not _streams(x, weight, impl) or (swiglu and (bias is not None or n % 2)):
        out = F.linear(x, weight, bias)
        return silu_and_mul(out, impl) if swiglu else out
    if x.shape[-1] != k:
        raise ValueError(f"linear: x has {x.shape[-1]} features, weight {tuple(weight.shape)}")
    x2 = x.reshape(rows, k)
    if swiglu:
        out = torch.empty(1, rows, n // 2, dtype=x.dtype, device=x.device)
        _launch(TUNERS["swiglu"], x2, weight, bias, out, swiglu=True)
        return out.view(*x.shape[:-1], n // 2)
    out_shape = torch.Size((*x.shape[:-1], n))
    if split_k and bias is None:
        partials = torch.empty(max(SPLITS), rows, n, dtype=torch.float32, device=x.device)
        _launch(TUNERS["split"], x2, weight, bias, partials)
        # The autotuner records the config it ran; tuned before any CUDA-graph capture, so reading it on
        # the host is safe there.
        splits = TUNERS["split"].best_config.kwargs["SPLIT_K"]
        return SplitK(partials[:splits], x.dtype, out_shape)
    out = torch.empty(1, rows, n, dtype=x.dtype, device=x.device)
    _launch(TUNERS["plain"], x2, weight, bias, out)
    return out.view(out_shape)


@dataclass(slots=True)
class RotaryStoreKV:
    """What linear_rotary_store_kv's kernel needs beyond the projection (see kernels.rotary_store_kv)."""

    positions: torch.Tensor
    cos_sin_cache: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    slot_mapping: torch.Tensor
    num_heads: int
    num_kv_heads: int
    head_dim: int
    k_scale: float = 1.0  # of an fp8 cache (kernels.kv_write)
    v_scale: float = 1.0

    def fusable(self, x: torch.Tensor) -> bool:
        """Whether the streaming kernel can do it: full neox rotary over heads of a multiple of 64 dims (each
        program's half tile, 16 or 32 pairs, within one head), one cache layout for k and v."""
        return (self.cos_sin_cache.shape[-1] == self.head_dim and self.head_dim % 64 == 0
                and self.k_cache.stride() == self.v_cache.stride() and self.k_cache.dtype in (x.dtype, FP8)
                and self.k_cache.stride(-1) == 1 and self.cos_sin_cache.stride(-1) == 1)

    def store(self, qkv: torch.Tensor, impl: str = "auto") -> torch.Tensor:
        """kernels.rotary_store_kv on the heads of a q/k/v projection's output qkv [rows, (num_heads + 2
        num_kv_heads) head_dim]: q and k rotated in place, k and v written to the cache. Returns qkv."""
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        rows = qkv.shape[0]
        q, k, v = (t.view(rows, -1, self.head_dim) for t in qkv.split([q_size, kv_size, kv_size], dim=-1))
        rotary_store_kv(self.positions, q, k, v, self.cos_sin_cache, self.k_cache, self.v_cache,
                        self.slot_mapping, impl=impl, k_scale=self.k_scale, v_scale=self.v_scale)
        return qkv


def linear_rotary_store_kv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           rope: RotaryStoreKV, impl: str = "auto") -> torch.Tensor:
    """qkv = linear(x, weight, bias) for a fused q/k/v projection of x [rows, hidden], then
    kernels.rotary_store_kv on its heads (neox): q and k rotated in qkv, k and v written to the paged
    cache. For decode-sized batches one
    streaming kernel, whose programs each hold dims c and c + head_dim / 2 of one head (column pairing, as
    swiglu pairs gate and up rows): no rotary launch, the same rounding."""
    rows = x.shape[0]
    if not (_streams(x, weight, impl) and rope.fusable(x)):
        return rope.store(linear(x, weight, bias, impl), impl)
    out = torch.empty(1, rows, weight.shape[0], dtype=x.dtype, device=x.device)
    _launch(TUNERS["rope"], x.reshape(rows, -1), weight, bias, out, rope=rope)
    return out.view(rows, -1)


def _launch(kernel: triton.runtime.Autotuner, x2: torch.Tensor, weight: torch.Tensor,
            bias: torch.Tensor | None, out: torch.Tensor, swiglu: bool = False,
            rope: RotaryStoreKV | None = None) -> None:
    """out [splits, rows, N] = the split-K partials of x2 @ weight.T (+ bias): splits = 1 unless tuned;
    with swiglu, out [1, rows, N / 2] = SwiGLU of the [gate; up] product; with rope, rotated and cached."""
    n, k = weight.shape
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
    if rope is None:
        rope_args, consts = (x2, x2, 0, x2, x2, x2, 0, 0, 0, 1.0, 1.0), {}
    else:
        kc = rope.k_cache
        rope_args = (rope.positions, rope.cos_sin_cache, rope.cos_sin_cache.stride(0), rope.slot_mapping, kc,
                     rope.v_cache, kc.stride(0), kc.stride(1), kc.stride(2), rope.k_scale, rope.v_scale)
        consts = {"ROPE": True, "NQ": rope.num_heads, "NKV": rope.num_kv_heads, "HEAD_DIM": rope.head_dim,
                  "CACHE_BLOCK": kc.shape[1], "KV_FP8": kv_fp8("linear_rotary_store_kv", kc, rope.v_cache)}
    chained = pdl(x2)
    aligned = weight.stride(0) * weight.element_size() % 16 == 0 and weight.data_ptr() % 16 == 0
    kernel[grid](x2, weight, bias if bias is not None else weight, out, x2.shape[0], n, k,
                 x2.stride(0), weight.stride(0), out.stride(0), out.stride(1), *rope_args,
                 HAS_BIAS=bias is not None, BLOCK_M=16, SWIGLU=swiglu, **consts, PDL=chained,
                 PREFETCH=PREFETCH_BYTES if chained and aligned else 0, launch_pdl=chained)
