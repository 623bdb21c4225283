"""RMSNorm, optionally fused with the residual add that precedes it and with the reduction of a split-K
linear layer's partial sums (kernels.linear.SplitK) that produce its input."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from servebench.kernels import reference
from servebench.kernels.dispatch import compiled, pdl, pdl_enter, pick
from servebench.kernels.linear import SplitK


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr, eps, hidden,
                     stride_xs, stride_x, stride_r, stride_o, stride_nr,
                     SPLITS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
                     PDL: tl.constexpr):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    if SPLITS:  # x holds SPLITS fp32 partial sums: their sum, rounded as the unsplit layer rounds its output
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for s in tl.static_range(SPLITS):
            acc += tl.load(x_ptr + s * stride_xs + row * stride_x + cols, mask=mask, other=0.0)
        x = acc.to(out_ptr.dtype.element_ty)
    else:
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # The sum is rounded to the activation dtype before the norm, as in HF's decoder layers.
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(new_res_ptr + row * stride_nr + cols, x, mask=mask)
    h = x.to(tl.float32)
    h = h * tl.rsqrt(tl.sum(h * h, 0) / hidden + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out = w * h.to(x.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor | SplitK, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             impl: str = "auto") -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """out = weight * rmsnorm(x) in x's dtype (statistics in fp32, HF's rounding); x [..., hidden].
    With residual: x + residual is normalized and (out, x + residual) is returned.
    x may be a SplitK: x.reduce() (partials summed in fp32, rounded to x.dtype) is what gets normalized."""
    split = x if isinstance(x, SplitK) else None
    backend = pick("rms_norm", x if split is None else split.partials, impl)
    if backend != "triton":
        fn = reference.rms_norm if backend == "torch" else compiled(reference.rms_norm)
        return fn(x if split is None else split.reduce(), weight, eps, residual)
    if split is not None:  # [splits, rows, hidden]
        src, splits, dtype, shape = split.partials, split.partials.shape[0], split.dtype, split.shape
    else:
        src, splits, dtype, shape = x.reshape(1, -1, x.shape[-1]), 0, x.dtype, x.shape
    rows, hidden = src.shape[1], shape[-1]
    out = torch.empty(rows, hidden, dtype=dtype, device=src.device)
    res2 = residual.reshape(-1, hidden) if residual is not None else out
    new_res = torch.empty_like(out) if residual is not None else out
    for t in (src, res2, weight):
        if t.stride(-1) != 1:
            raise ValueError("rms_norm: x, residual and weight need a contiguous last (hidden) dimension")
    block = triton.next_power_of_2(hidden)
    chained = pdl(src)
    _rms_norm_kernel[(rows,)](
        src, res2, weight, out, new_res, eps, hidden,
        src.stride(0), src.stride(1), res2.stride(0), out.stride(0), new_res.stride(0),
        SPLITS=splits, HAS_RESIDUAL=residual is not None, BLOCK=block, PDL=chained, launch_pdl=chained,
        num_warps=min(max(block // 512, 1), 16),
    )
    out = out.view(shape)
    return out if residual is None else (out, new_res.view(shape))
