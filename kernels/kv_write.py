"""Write the step's new keys/values into the paged KV cache."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import reference
from kernels.dispatch import pick


@triton.jit
def _store_kv_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
                     NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                     HEADS_P: tl.constexpr, DIM_P: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:  # padding token
        return
    block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
    h = tl.arange(0, HEADS_P)[:, None]
    d = tl.arange(0, DIM_P)[None, :]
    mask = (h < NUM_HEADS) & (d < HEAD_DIM)
    k = tl.load(key_ptr + token.to(tl.int64) * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(value_ptr + token.to(tl.int64) * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(k_cache_ptr + block * stride_kcb + offset * stride_kcs + h * stride_kch + d,
             k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + block * stride_vcb + offset * stride_vcs + h * stride_vch + d,
             v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, impl: str = "auto") -> None:
    """Write key/value [num_tokens, num_kv_heads, head_dim] into k_cache/v_cache
    [num_blocks, block_size, num_kv_heads, head_dim] at slot_mapping[i] = block_id * block_size + offset;
    tokens with a negative slot (padding) are skipped. In place."""
    if pick("store_kv", key, impl) == "torch":
        reference.store_kv(key, value, k_cache, v_cache, slot_mapping)
        return
    num_tokens, num_heads, head_dim = key.shape
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"store_kv: slot_mapping has shape {tuple(slot_mapping.shape)}, "
                         f"expected one slot per token ({num_tokens},)")
    for t in (key, value, k_cache, v_cache):
        if t.stride(-1) != 1:
            raise ValueError("store_kv: key, value and the caches need a contiguous last dimension")
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        HEADS_P=triton.next_power_of_2(num_heads), DIM_P=triton.next_power_of_2(head_dim),
        num_warps=4,
    )
