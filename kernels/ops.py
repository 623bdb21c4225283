"""Triton kernels of the engine's forward pass, each with a plain torch reference (kernels.reference).

Every op takes impl='auto' | 'triton' | 'torch' (and 'compile' for the element-wise ops): 'auto' runs
Triton on CUDA tensors (or torch.compile where kernels.dispatch.CUDA_BACKEND says so) and the torch
reference on CPU; 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before this package is imported.

Fusions the Llama model uses: linear(..., split_k=True) may return SplitK partial sums, which only rms_norm
consumes (it reduces them); linear(..., swiglu=True) applies SwiGLU to a [gate; up] projection in the same
kernel; rotary_store_kv rotates q and k and writes k and v into the paged cache in one kernel, and
linear_rotary_store_kv does that in the qkv projection's kernel itself for decode-sized batches.

Quantized serving: int4_linear (AWQ/GPTQ weights, kernels.int4) and fp8_linear (FP8 weights, kernels.fp8);
the KV-cache ops also take an fp8 cache with per-tensor scales (k_scale, v_scale). Multi-LoRA serving:
add_lora adds each row's adapter update to a projection (kernels.lora, SGMV shrink and expand).
"""

from servebench.kernels.activation import silu_and_mul
from servebench.kernels.attention import paged_attention
from servebench.kernels.fp8 import fp8_linear
from servebench.kernels.int4 import int4_linear
from servebench.kernels.kv_write import rotary_store_kv, store_kv
from servebench.kernels.linear import RotaryStoreKV, SplitK, linear, linear_rotary_store_kv
from servebench.kernels.lora import LoRAIndices, add_lora
from servebench.kernels.norm import rms_norm
from servebench.kernels.rotary import apply_rotary, build_cos_sin_cache

__all__ = ["LoRAIndices", "RotaryStoreKV", "SplitK", "add_lora", "apply_rotary", "build_cos_sin_cache",
           "fp8_linear", "int4_linear", "linear", "linear_rotary_store_kv", "paged_attention", "rms_norm",
           "rotary_store_kv", "silu_and_mul", "store_kv"]
