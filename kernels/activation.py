"""SwiGLU activation of the fused gate/up projection."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from servebench.kernels import reference
from servebench.kernels.dispatch import compiled, pick


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, inter, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    # silu is rounded to the activation dtype before the product, as HF's act_fn(gate) * up.
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    out = act * up.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """x [..., 2 * I] -> silu(x[..., :I]) * x[..., I:], shape [..., I], x's dtype."""
    backend = pick("silu_and_mul", x, impl)
    if backend != "triton":
        fn = reference.silu_and_mul if backend == "torch" else compiled(reference.silu_and_mul)
        return fn(x)
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * inter)
    if x2.stride(-1) != 1:
        raise ValueError("silu_and_mul: x needs a contiguous last dimension")
    out = torch.empty(x2.shape[0], inter, dtype=x.dtype, device=x.device)
    block = min(triton.next_power_of_2(inter), 1024)
    _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(inter, block))](
        x2, out, inter, x2.stride(0), out.stride(0), BLOCK=block, num_warps=4)
    return out.view(*x.shape[:-1], inter)
