"""Plain torch references: the CPU path of every kernel and the ground truth of the tests.

They follow HF transformers' rounding (ops in the input dtype, reductions in fp32) so that the CPU engine
reproduces HF outputs; the Triton kernels round at the same points.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from servebench.kernels.quant_layout import dequantize_int4, dequantize_kv, quantize_kv


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    block_size = k_cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = quantize_kv(key[keep], k_cache.dtype, k_scale)
    v_cache[blocks, offsets] = quantize_kv(value[keep], v_cache.dtype, v_scale)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
                    k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    out = torch.zeros_like(q)
    block_size, group = k_cache.shape[1], q.shape[1] // k_cache.shape[2]
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        q_start, q_end = starts[i], starts[i + 1]
        if q_end == q_start:
            continue
        blocks = block_tables[i, : -(-seq_len // block_size)].long()
        k = dequantize_kv(k_cache[blocks].flatten(0, 1)[:seq_len], k_scale, q.dtype)
        v = dequantize_kv(v_cache[blocks].flatten(0, 1)[:seq_len], v_scale, q.dtype)
        k, v = (t.repeat_interleave(group, dim=1).float() for t in (k, v))
        scores = torch.einsum("qhd,khd->hqk", q[q_start:q_end].float(), k) * scale
        pos = torch.arange(seq_len - (q_end - q_start), seq_len, device=q.device)
        visible = torch.arange(seq_len, device=q.device)[None, :] <= pos[:, None]
        probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        out[q_start:q_end] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = (weight * h.to(x.dtype)).to(x.dtype)
    return out if residual is None else (out, x)


def apply_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
                 head_dim: int, is_neox: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)
    rot_dim = cos_sin_cache.shape[-1]
    for x in (q, k):
        rot = x.view(x.shape[0], -1, head_dim)[..., :rot_dim]
        c, s = cos.to(x.dtype), sin.to(x.dtype)
        x1, x2 = (rot.chunk(2, dim=-1) if is_neox else (rot[..., 0::2], rot[..., 1::2]))
        o1, o2 = x1 * c - x2 * s, x2 * c + x1 * s
        rot.copy_(torch.cat((o1, o2), dim=-1) if is_neox else torch.stack((o1, o2), dim=-1).flatten(-2))
    return q, k


def rotary_store_kv(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, is_neox: bool = True, k_scale: float = 1.0,
                    v_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    q, k = apply_rotary(positions, q, k, cos_sin_cache, k.shape[-1], is_neox)
    store_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return q, k


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None, zero_offset: int) -> torch.Tensor:
    """Dequantize (in fp32, rounded to x's dtype), then matmul: see kernels.quant_layout for the layout."""
    return F.linear(x, dequantize_int4(qweight, qzeros, scales, zero_offset).t().to(x.dtype), bias)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """Weight-only FP8: weight [N, K] e4m3 times its per-channel weight_scale [N, 1], rounded to x's dtype."""
    return F.linear(x, (weight.float() * weight_scale).to(x.dtype), bias)


def add_lora(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
             sorted_rows: torch.Tensor, slot_starts: torch.Tensor, slice_starts: tuple[int, ...]) -> None:
    """kernels.lora.add_lora, one adapter slot at a time: x @ A^T in fp32 rounded to y's dtype, then times B^T
    slice by slice in fp32, added to y and rounded."""
    starts, rank = slot_starts.tolist(), lora_b.shape[-1]
    bounds = [*slice_starts, y.shape[-1]]
    for slot in range(1, len(starts) - 1):
        if starts[slot] == starts[slot + 1]:
            continue
        rows = sorted_rows[starts[slot]:starts[slot + 1]].long()
        a, b = lora_a[slot - 1], lora_b[slot - 1]
        shrunk = (x[rows].float() @ a.float().T).to(y.dtype).float()
        delta = torch.cat([shrunk[:, s * rank:(s + 1) * rank] @ b[lo:hi].float().T
                           for s, (lo, hi) in enumerate(zip(bounds, bounds[1:]))], dim=1)
        y[rows] = (y[rows].float() + delta).to(y.dtype)
