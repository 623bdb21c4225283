"""FP8 (e4m3) linear layers: a weight [N, K] in e4m3 with one fp32 scale per output channel.

Where the GPU has fp8 tensor cores (compute capability >= 8.9: Ada, Hopper) and torch._scaled_mm takes
row-wise scales, W8A8 as vLLM's quantization="fp8": the activations are quantized per token on the fly
(quantize_fp8: one Triton launch, a scale per row from the row's largest magnitude) and the product runs in
fp8 with both scales applied in its epilogue, bf16 out. Elsewhere (the CPU, older GPUs, fp16 or fp32 models)
weight-only: the weight dequantized to x's dtype, then an ordinary matmul (kernels.reference.fp8_linear).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from servebench.kernels import reference
from servebench.kernels.dispatch import pick
from servebench.kernels.quant_layout import FP8, FP8_MAX, FP8_MIN_SCALE
from servebench.kernels.quant_layout import quantize_fp8 as quantize_fp8_reference

E4M3_MAX = tl.constexpr(FP8_MAX)
MIN_SCALE = tl.constexpr(FP8_MIN_SCALE)
SCALED_MM_CAPABILITY = (8, 9)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_x + cols, mask=cols < K, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), 0) / E4M3_MAX, MIN_SCALE)
    q = tl.clamp(x / scale, -E4M3_MAX, E4M3_MAX).to(q_ptr.dtype.element_ty)
    tl.store(q_ptr + row * stride_q + cols, q, mask=cols < K)
    tl.store(s_ptr + row, scale)


def quantize_fp8(x: torch.Tensor, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """kernels.quant_layout.quantize_fp8 of x [M, K]: (e4m3 [M, K], fp32 scales [M, 1]), one launch."""
    if pick("quantize_fp8", x, impl) == "torch":
        return quantize_fp8_reference(x)
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError("quantize_fp8: x must be [rows, K] with a contiguous last dimension")
    q = torch.empty(x.shape, dtype=FP8, device=x.device)
    scale = torch.empty(x.shape[0], 1, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(x.shape[1])
    _quantize_rows_kernel[(x.shape[0],)](x, q, scale, x.shape[1], x.stride(0), q.stride(0), BLOCK=block,
                                         num_warps=min(max(block // 512, 1), 16))
    return q, scale


@functools.cache
def _has_fp8_tensor_cores(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= SCALED_MM_CAPABILITY


def scaled_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether fp8_linear runs W8A8 for x and weight [N, K]: a CUDA GPU with fp8 tensor cores, bf16 x (the
    row-wise scaled product's only output dtype) and N, K multiples of 16 (its tile constraint)."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_scaled_mm")
            and _has_fp8_tensor_cores(x.device) and weight.shape[0] % 16 == 0 and weight.shape[1] % 16 == 0)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None = None, impl: str = "auto") -> torch.Tensor:
    """F.linear(x, weight * weight_scale, bias) for an e4m3 weight [N, K] and fp32 weight_scale [N, 1]:
    W8A8 where scaled_mm_supported, else weight-only (module docstring)."""
    if pick("fp8_linear", x, impl) == "torch" or not scaled_mm_supported(x, weight):
        return reference.fp8_linear(x, weight, weight_scale, bias)
    x2 = x.reshape(-1, x.shape[-1])
    xq, x_scale = quantize_fp8(x2 if x2.stride(-1) == 1 else x2.contiguous(), impl)
    # weight.t() is column-major, as the second operand must be; scale_b is [1, N].
    out = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale.view(1, -1),
                           out_dtype=x.dtype)
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], weight.shape[0])
