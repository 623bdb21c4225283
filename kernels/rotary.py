"""Rotary position embedding: the cos/sin cache (HF transformers' frequency rules) and its application
(fused with the KV-cache write in kernels.kv_write.rotary_store_kv)."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from servebench.kernels import reference
from servebench.kernels.dispatch import compiled, pick


def build_cos_sin_cache(head_dim: int, max_position: int, base: float, rope_scaling: dict | None = None,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[max_position, rot_dim] cache of cos | sin halves (vLLM's layout), equal to the cos/sin that HF's
    rotary embedding computes. rope_scaling is the HF config's rope_scaling / rope_parameters dict
    (rope_type or type: default, linear, llama3, yarn; partial_rotary_factor honoured). Build it in the
    model dtype: HF rounds cos/sin to it."""
    params = rope_scaling or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    rot_dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim))
    attention_factor = 1.0
    if rope_type == "linear":
        inv_freq = inv_freq / params["factor"]
    elif rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, params)
    elif rope_type == "yarn":
        inv_freq, attention_factor = _yarn_inv_freq(rot_dim, base, params)
    elif rope_type != "default":
        raise ValueError(f"rope_scaling.rope_type={rope_type!r} is not supported: "
                         "use default, linear, llama3 or yarn")
    freqs = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return (torch.cat((freqs.cos(), freqs.sin()), dim=-1) * attention_factor).to(dtype)


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by factor, interpolate in between."""
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(dim: int, base: float, params: dict) -> tuple[torch.Tensor, float]:
    """YaRN: interpolated and extrapolated frequencies blended over a ramp, cos/sin scaled up."""
    factor, old_len = params["factor"], params["original_max_position_embeddings"]
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else _yarn_mscale(factor))

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(params.get("beta_fast") or 32), correction_dim(params.get("beta_slow") or 1)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = 1.0 / (factor * pos_freqs) * (1 - extrapolation) + 1.0 / pos_freqs * extrapolation
    return inv_freq, float(attention_factor)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@triton.jit
def _rotary_kernel(pos_ptr, q_ptr, k_ptr, cache_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_cache,
                   NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HALF: tl.constexpr,
                   HEADS_P: tl.constexpr, HALF_P: tl.constexpr, IS_NEOX: tl.constexpr):
    rotary_token(tl.program_id(0).to(tl.int64), pos_ptr, q_ptr, k_ptr, cache_ptr, stride_qt, stride_qh,
                 stride_kt, stride_kh, stride_cache, NUM_Q_HEADS, NUM_K_HEADS, HALF, HEADS_P, HALF_P,
                 IS_NEOX)


@triton.jit
def rotary_token(token, pos_ptr, q_ptr, k_ptr, cache_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                 stride_cache, NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HALF: tl.constexpr,
                 HEADS_P: tl.constexpr, HALF_P: tl.constexpr, IS_NEOX: tl.constexpr):
    """Rotate the q and k heads of one token in place, at its position's cos/sin."""
    pos = tl.load(pos_ptr + token).to(tl.int64)
    i = tl.arange(0, HALF_P)
    cos = tl.load(cache_ptr + pos * stride_cache + i, mask=i < HALF, other=0.0)
    sin = tl.load(cache_ptr + pos * stride_cache + HALF + i, mask=i < HALF, other=0.0)
    _rotate(q_ptr + token * stride_qt, stride_qh, cos, sin, NUM_Q_HEADS, HALF, HEADS_P, HALF_P, IS_NEOX)
    _rotate(k_ptr + token * stride_kt, stride_kh, cos, sin, NUM_K_HEADS, HALF, HEADS_P, HALF_P, IS_NEOX)


@triton.jit
def _rotate(x_ptr, stride_h, cos, sin, NUM_HEADS: tl.constexpr, HALF: tl.constexpr, HEADS_P: tl.constexpr,
            HALF_P: tl.constexpr, IS_NEOX: tl.constexpr):
    h = tl.arange(0, HEADS_P)[:, None]
    i = tl.arange(0, HALF_P)[None, :]
    mask = (h < NUM_HEADS) & (i < HALF)
    if IS_NEOX:  # halves [0, HALF) and [HALF, 2 * HALF)
        p1 = x_ptr + h * stride_h + i
        p2 = p1 + HALF
    else:  # interleaved pairs (GPT-J)
        p1 = x_ptr + h * stride_h + 2 * i
        p2 = p1 + 1
    x1 = tl.load(p1, mask=mask, other=0.0)
    x2 = tl.load(p2, mask=mask, other=0.0)
    o1, o2 = rotate_halves(x1, x2, cos[None, :], sin[None, :], x1.dtype)
    tl.store(p1, o1, mask=mask)
    tl.store(p2, o2, mask=mask)


@triton.jit
def rotate_halves(x1, x2, cos, sin, DT: tl.constexpr):
    """The rotation of the paired halves x1, x2 (values of dtype DT, held in any dtype) by cos and sin, in DT.
    Each product is rounded to DT before the sum, as HF's q * cos + rotate_half(q) * sin; so are cos, sin."""
    c, s = cos.to(DT).to(tl.float32), sin.to(DT).to(tl.float32)
    o1 = (x1 * c).to(DT).to(tl.float32) - (x2 * s).to(DT).to(tl.float32)
    o2 = (x2 * c).to(DT).to(tl.float32) + (x1 * s).to(DT).to(tl.float32)
    return o1.to(DT), o2.to(DT)


def apply_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
                 head_dim: int, is_neox: bool = True,
                 impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k in place and return them. q/k are [num_tokens, heads * head_dim] or
    [num_tokens, heads, head_dim] (views of a fused qkv projection are fine); positions [num_tokens];
    the first rot_dim = cos_sin_cache.shape[-1] dims of each head rotate (neox halves or GPT-J pairs)."""
    backend = pick("apply_rotary", q, impl)
    if backend != "triton":
        fn = reference.apply_rotary if backend == "torch" else compiled(reference.apply_rotary)
        return fn(positions, q, k, cos_sin_cache, head_dim, is_neox)
    q3, k3 = q.view(q.shape[0], -1, head_dim), k.view(k.shape[0], -1, head_dim)
    args, consts = rotary_args("apply_rotary", positions, q3, k3, cos_sin_cache, is_neox)
    _rotary_kernel[(q3.shape[0],)](*args, **consts, num_warps=4)
    return q, k


def rotary_args(op: str, positions: torch.Tensor, q3: torch.Tensor, k3: torch.Tensor,
                cos_sin_cache: torch.Tensor, is_neox: bool) -> tuple[tuple, dict]:
    """rotary_token's arguments after `token` (positional, then constexpr) for q3/k3 [tokens, heads, dim]."""
    if q3.stride(-1) != 1 or k3.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1:
        raise ValueError(f"{op}: q, k and cos_sin_cache need a contiguous last dimension")
    half = cos_sin_cache.shape[-1] // 2
    args = (positions, q3, k3, cos_sin_cache, q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1),
            cos_sin_cache.stride(0))
    consts = dict(NUM_Q_HEADS=q3.shape[1], NUM_K_HEADS=k3.shape[1], HALF=half,
                  HEADS_P=triton.next_power_of_2(max(q3.shape[1], k3.shape[1])),
                  HALF_P=triton.next_power_of_2(half), IS_NEOX=is_neox)
    return args, consts
