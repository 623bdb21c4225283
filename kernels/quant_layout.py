"""Quantized tensors in plain torch: AWQ's and GPTQ's packed int4 weights, FP8 (e4m3) weights, activations
and KV caches. The layouts are the checkpoints'; kernels.int4 and kernels.fp8 compute with them.

int4 (AWQ, GPTQ): a linear layer's weight W [N out, K in] is stored transposed and in groups of G input rows,
w[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n], with q and z in 0..15 and eight of them to an int32:
- GPTQ: qweight [K / 8, N] packed along K, nibble i of word r holding row 8 r + i; qzeros [K / G, N / 8]
  packed along N in the same order, holding z - 1 (the older GPTQ format's offset; gptq_v2 checkpoints and
  our own repacked weights hold z: `zero_offset` 0); scales [K / G, N]; g_idx [K], k // G without act-order.
- AWQ (AutoAWQ's GEMM version): qweight [K, N / 8] and qzeros [K / G, N / 8], both packed along N, nibble i
  of word j holding column 8 j + AWQ_ORDER[i]; scales [K / G, N]. The engine repacks it to GPTQ's layout.

FP8: e4m3 values with an fp32 scale per row (a weight's output channel, an activation's token), x = q * s;
an fp8 KV cache holds K / k_scale and V / v_scale with one scale per tensor.
"""

from __future__ import annotations

import torch

PACK = 8  # 4-bit values per int32
SEQUENTIAL = tuple(range(PACK))
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's GEMM packing: the order its dequantization unpacks fastest

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
# vLLM's floor for a dynamic scale: a row of zeros quantizes to zeros instead of dividing by zero.
FP8_MIN_SCALE = 1.0 / (FP8_MAX * 512.0)


def pack_int4(values: torch.Tensor, dim: int, order: tuple[int, ...] = SEQUENTIAL) -> torch.Tensor:
    """values in 0..15, eight to an int32 along `dim` (its size a multiple of 8): nibble i of each word holds
    entry order[i] of its eight."""
    v = values.movedim(dim, -1).to(torch.int32)
    if v.shape[-1] % PACK:
        raise ValueError(f"pack_int4: dimension {dim} has {v.shape[-1]} values, not a multiple of {PACK}")
    v = v.reshape(*v.shape[:-1], -1, PACK)
    packed = torch.zeros(v.shape[:-1], dtype=torch.int32, device=v.device)
    for nibble, entry in enumerate(order):
        packed |= v[..., entry] << (4 * nibble)
    return packed.movedim(-1, dim).contiguous()


def unpack_int4(packed: torch.Tensor, dim: int, order: tuple[int, ...] = SEQUENTIAL) -> torch.Tensor:
    """The inverse of pack_int4: int32 values in 0..15, eight times as many along `dim`."""
    p = packed.movedim(dim, -1)
    shifts = 4 * torch.arange(PACK, dtype=torch.int32, device=p.device)
    nibbles = (p.unsqueeze(-1) >> shifts) & 0xF  # >> is arithmetic on int32: the mask drops the sign
    values = nibbles[..., [order.index(entry) for entry in range(PACK)]]
    return values.reshape(*p.shape[:-1], -1).movedim(-1, dim).contiguous()


def quantize_int4(weight: torch.Tensor, group_size: int, sym: bool = False,
                  scale_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, ...]:
    """Round-to-nearest int4 of weight [N, K] in groups of group_size input rows (-1: one group):
    (q [K, N], zeros [K / G, N], scales [K / G, N] in scale_dtype). Asymmetric as AutoAWQ (zero point from
    each group's min and max), or symmetric as GPTQ's sym=True (zero 8, scale from the largest magnitude)."""
    n, k = weight.shape
    g = k if group_size == -1 else group_size
    if k % g:
        raise ValueError(f"quantize_int4: {k} input features are not a multiple of group_size={g}")
    w = weight.float().t().reshape(k // g, g, n)
    if sym:
        scales = 2 * w.abs().amax(1) / 15
        zeros = torch.full_like(scales, 8.0)
    else:
        hi, lo = w.amax(1), w.amin(1)
        scales = (hi - lo).clamp(min=1e-5) / 15
        zeros = (-torch.round(lo / scales)).clamp(0, 15)
    # Quantized with the scale as stored, so that dequantizing the checkpoint gives the nearest values.
    scales = scales.clamp(min=1e-5).to(scale_dtype)
    q = (torch.round(w / scales.float()[:, None]) + zeros[:, None]).clamp(0, 15)
    return q.reshape(k, n).to(torch.int32), zeros.to(torch.int32), scales


def pack_awq(q: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight [K, N / 8], qzeros [K / G, N / 8]) in AutoAWQ's GEMM layout, from quantize_int4's q, zeros."""
    return pack_int4(q, 1, AWQ_ORDER), pack_int4(zeros, 1, AWQ_ORDER)


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [K, N], zeros [K / G, N]) of an AWQ checkpoint's qweight and qzeros."""
    return unpack_int4(qweight, 1, AWQ_ORDER), unpack_int4(qzeros, 1, AWQ_ORDER)


def pack_gptq(q: torch.Tensor, zeros: torch.Tensor,
              zero_offset: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight [K / 8, N], qzeros [K / G, N / 8]) in GPTQ's layout, qzeros holding zeros - zero_offset.
    With the older format's offset of 1 a zero point of 0 cannot be stored (it reads back as 16)."""
    return pack_int4(q, 0), pack_int4((zeros - zero_offset) & 0xF, 1)


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor,
                zero_offset: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [K, N], zeros [K / G, N]) of GPTQ-layout qweight and qzeros."""
    return unpack_int4(qweight, 0), unpack_int4(qzeros, 1) + zero_offset


def dequantize_int4(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                    zero_offset: int) -> torch.Tensor:
    """W^T [K, N] in fp32 from GPTQ-layout tensors (the group size is K / scales.shape[0])."""
    q, zeros = unpack_gptq(qweight, qzeros, zero_offset)
    group = q.shape[0] // scales.shape[0]
    return (q - zeros.repeat_interleave(group, 0)).float() * scales.float().repeat_interleave(group, 0)


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values, fp32 scales [..., 1]) with one scale per row of x (the last dimension's slices): the
    row's largest magnitude maps to FP8_MAX."""
    amax = x.abs().amax(-1, keepdim=True).float()
    scale = (amax / FP8_MAX).clamp(min=FP8_MIN_SCALE)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_kv(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """x as a KV cache of `dtype` stores it: an fp8 cache holds x / scale, saturated to e4m3's range (an
    e4m3 value past it would be NaN)."""
    if dtype != FP8:
        return x.to(dtype)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(dtype)


def dequantize_kv(cache: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """What the attention kernels compute with: an fp8 cache times its scale, rounded to the query's dtype."""
    if cache.dtype != FP8:
        return cache
    return (cache.float() * scale).to(dtype)
