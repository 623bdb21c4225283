"""Write the step's new keys/values into the paged KV cache, alone (store_kv) or right after the rotary
embedding of q and k in the same kernel (rotary_store_kv, what the model runs).

The cache is in the model's dtype or in fp8 (e4m3, vLLM's kv_cache_dtype="fp8"): then each value is divided
by its tensor's scale (k_scale, v_scale) and saturated to e4m3's range as it is written
(kernels.quant_layout.quantize_kv), and the attention kernels multiply it back.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from servebench.kernels import reference
from servebench.kernels.dispatch import pick
from servebench.kernels.quant_layout import FP8, FP8_MAX
from servebench.kernels.rotary import rotary_args, rotary_token

E4M3_MAX = tl.constexpr(FP8_MAX)


@triton.jit
def to_cache(x, scale, cache_ptr, KV_FP8: tl.constexpr):
    """x as the cache at cache_ptr stores it (kernels.quant_layout.quantize_kv)."""
    if KV_FP8:
        return tl.clamp(x.to(tl.float32) / scale, -E4M3_MAX, E4M3_MAX).to(cache_ptr.dtype.element_ty)
    return x.to(cache_ptr.dtype.element_ty)


@triton.jit
def _store_kv_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     stride_key_t, stride_key_h, stride_val_t, stride_val_h,
                     stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, k_scale, v_scale,
                     NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                     KV_HEADS_P: tl.constexpr, DIM_P: tl.constexpr, KV_FP8: tl.constexpr):
    _store_kv_token(tl.program_id(0).to(tl.int64), key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                    stride_key_t, stride_key_h, stride_val_t, stride_val_h,
                    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, k_scale, v_scale,
                    NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, KV_HEADS_P, DIM_P, KV_FP8)


@triton.jit
def _rotary_store_kv_kernel(pos_ptr, q_ptr, k_ptr, cos_sin_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                            stride_cache, key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                            stride_key_t, stride_key_h, stride_val_t, stride_val_h,
                            stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
                            k_scale, v_scale,
                            NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HALF: tl.constexpr,
                            HEADS_P: tl.constexpr, HALF_P: tl.constexpr, IS_NEOX: tl.constexpr,
                            NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                            KV_HEADS_P: tl.constexpr, DIM_P: tl.constexpr, KV_FP8: tl.constexpr):
    # key_ptr is k_ptr: the keys go to the cache as rotated here.
    token = tl.program_id(0).to(tl.int64)
    rotary_token(token, pos_ptr, q_ptr, k_ptr, cos_sin_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                 stride_cache, NUM_Q_HEADS, NUM_K_HEADS, HALF, HEADS_P, HALF_P, IS_NEOX)
    # The cache takes k as just rotated in place, by other threads of this program: make their stores
    # visible before reading k back (a barrier orders global memory within the CTA).
    tl.debug_barrier()
    _store_kv_token(token, key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                    stride_key_t, stride_key_h, stride_val_t, stride_val_h,
                    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, k_scale, v_scale,
                    NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, KV_HEADS_P, DIM_P, KV_FP8)


@triton.jit
def _store_kv_token(token, key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                    stride_key_t, stride_key_h, stride_val_t, stride_val_h,
                    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, k_scale, v_scale,
                    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    KV_HEADS_P: tl.constexpr, DIM_P: tl.constexpr, KV_FP8: tl.constexpr):
    """Copy one token's keys and values into its cache slot; a negative slot (padding token) is skipped."""
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:
        block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
        h = tl.arange(0, KV_HEADS_P)[:, None]
        d = tl.arange(0, DIM_P)[None, :]
        mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
        k = tl.load(key_ptr + token * stride_key_t + h * stride_key_h + d, mask=mask)
        v = tl.load(value_ptr + token * stride_val_t + h * stride_val_h + d, mask=mask)
        tl.store(k_cache_ptr + block * stride_kcb + offset * stride_kcs + h * stride_kch + d,
                 to_cache(k, k_scale, k_cache_ptr, KV_FP8), mask=mask)
        tl.store(v_cache_ptr + block * stride_vcb + offset * stride_vcs + h * stride_vch + d,
                 to_cache(v, v_scale, v_cache_ptr, KV_FP8), mask=mask)


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, impl: str = "auto", *, k_scale: float = 1.0,
             v_scale: float = 1.0) -> None:
    """Write key/value [num_tokens, num_kv_heads, head_dim] into k_cache/v_cache
    [num_blocks, block_size, num_kv_heads, head_dim] at slot_mapping[i] = block_id * block_size + offset;
    tokens with a negative slot (padding) are skipped. In place. An fp8 cache stores key / k_scale and
    value / v_scale."""
    if pick("store_kv", key, impl) == "torch":
        reference.store_kv(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
        return
    args, consts = _store_kv_args("store_kv", key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    _store_kv_kernel[(key.shape[0],)](*args, **consts, num_warps=4)


def rotary_store_kv(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, is_neox: bool = True, impl: str = "auto", *,
                    k_scale: float = 1.0, v_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rotary(positions, q, k, cos_sin_cache, head_dim, is_neox) then store_kv(k, v, k_cache, v_cache,
    slot_mapping, k_scale=k_scale, v_scale=v_scale) in one launch: q [num_tokens, num_heads, head_dim], k/v
    [num_tokens, num_kv_heads, head_dim] (views of a fused qkv projection are fine). q and k rotate in place
    and are returned."""
    if pick("rotary_store_kv", q, impl) == "torch":
        return reference.rotary_store_kv(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping,
                                         is_neox, k_scale, v_scale)
    rot_args, rot_consts = rotary_args("rotary_store_kv", positions, q, k, cos_sin_cache, is_neox)
    kv_args, kv_consts = _store_kv_args("rotary_store_kv", k, v, k_cache, v_cache, slot_mapping, k_scale,
                                        v_scale)
    _rotary_store_kv_kernel[(q.shape[0],)](*rot_args, *kv_args, **rot_consts, **kv_consts, num_warps=4)
    return q, k


def _store_kv_args(op: str, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slot_mapping: torch.Tensor, k_scale: float,
                   v_scale: float) -> tuple[tuple, dict]:
    """_store_kv_token's arguments after `token` (positional, then constexpr)."""
    num_tokens, num_heads, head_dim = key.shape
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"{op}: slot_mapping has shape {tuple(slot_mapping.shape)}, "
                         f"expected one slot per token ({num_tokens},)")
    for t in (key, value, k_cache, v_cache):
        if t.stride(-1) != 1:
            raise ValueError(f"{op}: key, value and the caches need a contiguous last dimension")
    args = (key, value, k_cache, v_cache, slot_mapping, key.stride(0), key.stride(1), value.stride(0),
            value.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), k_scale, v_scale)
    consts = dict(NUM_KV_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
                  KV_HEADS_P=triton.next_power_of_2(num_heads), DIM_P=triton.next_power_of_2(head_dim),
                  KV_FP8=kv_fp8(op, k_cache, v_cache))
    return args, consts


def kv_fp8(op: str, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether the caches are fp8 (e4m3); both are, or neither."""
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"{op}: the k and v caches need one dtype, got {k_cache.dtype} and {v_cache.dtype}")
    return k_cache.dtype == FP8
