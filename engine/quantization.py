"""Quantized linear layers, vLLM's `quantization=`: which method a model runs with, and how each stores and
multiplies by its weights.

- fp8: a bf16/fp32 checkpoint's weights quantized at load to e4m3 with one scale per output channel
  (kernels.fp8: W8A8 on GPUs with fp8 tensor cores, weight-only elsewhere).
- awq, gptq: 4-bit checkpoints in their safetensors layouts (kernels.quant_layout), group size and format
  from the checkpoint's quantization_config. AWQ is repacked at load into GPTQ's layout, the one
  kernels.int4 computes with. With load_format="dummy" the random float weights are quantized here
  (round to nearest), so any model shape runs without a checkpoint.

The decoder layers' projections are quantized, as in vLLM; the embedding and LM head keep the model's dtype.
Each QuantizedLinear holds its parameters under the checkpoint's names; `output_dim` and `pack_factor` on a
parameter tell the loader where a q/k/v or gate/up shard goes (engine.loader).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from servebench.engine.config import QUANT_CONFIG_FILES, QUANTIZATION_METHODS, ModelConfig
from servebench.kernels import ops
from servebench.kernels.int4 import MIN_GROUP
from servebench.kernels.quant_layout import PACK, pack_gptq, quantize_fp8, quantize_int4, unpack_awq
from torch import nn

INT4_DEFAULTS = {"bits": 4, "group_size": 128}  # dummy weights with no quantization_config: AutoAWQ's


@dataclass(frozen=True, slots=True)
class QuantizationConfig:
    method: str  # one of engine.config.QUANTIZATION_METHODS
    group_size: int = -1  # int4: input rows per scale and zero point; -1: all of them (per channel)
    zero_offset: int = 0  # int4: what a checkpoint's qzeros hold less than the zero point (older GPTQ: 1)
    from_float: bool = False  # weights loaded as floats and quantized here (fp8; int4 with dummy weights)

    def linear_method(self) -> LinearMethod:
        return Fp8LinearMethod() if self.method == "fp8" else Int4LinearMethod(self)


def get_quant_config(quantization: str | None, cfg: ModelConfig,
                     load_format: str = "auto") -> QuantizationConfig | None:
    """The method the model runs with: `quantization` (EngineArgs'), which must agree with the checkpoint's
    quantization_config, or that config's method when `quantization` is None; None: unquantized."""
    checkpoint = cfg.quantization_config
    where = f"{cfg.path}: quantization_config"
    named = str(checkpoint.get("quant_method", "")).lower() if checkpoint else ""
    if checkpoint and not named and quantization is None:
        raise ValueError(f"{where} (from {' or '.join(QUANT_CONFIG_FILES)}) names no quant_method: pass "
                         "quantization='awq' or 'gptq'")
    method = quantization or named or None
    if method is None:
        return None
    if named and named != method:
        raise ValueError(f"quantization={method!r} but the checkpoint is quantized with {named!r} ({where})")
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"{where} has quant_method={named!r}, which is not supported: the engine loads "
                         "awq and gptq checkpoints, and quantizes bf16/fp32 ones with quantization='fp8'")
    if method == "fp8":
        if checkpoint:
            raise ValueError(f"{where}: fp8 checkpoints are not supported; load the bf16/fp32 checkpoint "
                             "with quantization='fp8' (dynamic FP8)")
        return QuantizationConfig("fp8", from_float=True)
    dummy = load_format == "dummy"
    if not checkpoint and not dummy:
        raise ValueError(f"quantization={method!r} needs a {method.upper()} checkpoint, and {cfg.path} has "
                         "no quantization_config (quantization='fp8' quantizes bf16/fp32 weights at load)")
    return _int4_config(method, checkpoint or INT4_DEFAULTS, where, dummy)


def _int4_config(method: str, q: dict, where: str, from_float: bool) -> QuantizationConfig:
    # Older AutoAWQ configs name the keys w_bit and q_group_size.
    bits, group_size = q.get("bits", q.get("w_bit")), q.get("group_size", q.get("q_group_size"))
    if bits != 4:
        raise ValueError(f"{where} has bits={bits}: only 4-bit {method} checkpoints are supported")
    per_group = isinstance(group_size, int) and group_size > 0 and group_size % MIN_GROUP == 0
    if group_size != -1 and not per_group:
        raise ValueError(f"{where} has group_size={group_size}: -1 (per channel) or a positive multiple of "
                         f"{MIN_GROUP} (the int4 kernel's smallest K tile) is supported")
    if method == "awq":
        if not q.get("zero_point", True):
            raise ValueError(f"{where} has zero_point=false: only AWQ with zero points is supported")
        if str(q.get("version", "gemm")).lower() != "gemm":
            raise ValueError(f"{where} has version={q['version']!r}: only AWQ's GEMM layout is supported")
        return QuantizationConfig(method, group_size, 0, from_float)
    if q.get("desc_act", False):
        raise ValueError(f"{where} has desc_act=true (act-order): only GPTQ checkpoints without it "
                         "are supported")
    # gptq_v2 (GPTQModel's) stores the zero points themselves; the older format stores them less one.
    offset = 0 if q.get("checkpoint_format") == "gptq_v2" else 1
    return QuantizationConfig(method, group_size, offset, from_float)


def _param(data: torch.Tensor, output_dim: int | None = 0, pack_factor: int = 1) -> nn.Parameter:
    """A frozen parameter; along output_dim each element holds pack_factor output columns (None: none)."""
    param = nn.Parameter(data, requires_grad=False)
    param.output_dim, param.pack_factor = output_dim, pack_factor
    return param


class QuantizedLinear(nn.Module):
    """Linear's interface (engine.models.llama) over weights its LinearMethod stores. swiglu: the output is
    the SwiGLU of a [gate; up] projection; the unquantized layer's split-K output does not apply here."""

    def __init__(self, in_features: int, out_features: int, bias: bool, quant: QuantizationConfig, *,
                 swiglu: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features, self.swiglu = in_features, out_features, swiglu
        self.method = quant.linear_method()
        self.method.create_weights(self)
        self.bias = _param(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(x)
        return ops.silu_and_mul(out) if self.swiglu else out

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T + b, before the SwiGLU (engine.lora_layers adds LoRA updates to it)."""
        return self.method.apply(self, x)

    def rotary_store_kv(self, x: torch.Tensor, rope: ops.RotaryStoreKV) -> torch.Tensor:
        return rope.store(self(x))


class LinearMethod(Protocol):
    """How a QuantizedLinear stores its weight and multiplies by it (vLLM's quant_method)."""

    def create_weights(self, layer: QuantizedLinear) -> None:
        """Register the parameters the checkpoint fills, shaped as it stores them."""

    def process_weights_after_loading(self, layer: QuantizedLinear) -> None:
        """Turn what the checkpoint filled into what `apply` multiplies by."""

    def apply(self, layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T + bias."""


class Fp8LinearMethod(LinearMethod):
    def create_weights(self, layer: QuantizedLinear) -> None:
        layer.weight = _param(torch.empty(layer.out_features, layer.in_features))

    def process_weights_after_loading(self, layer: QuantizedLinear) -> None:
        weight, scale = quantize_fp8(layer.weight.data)  # per output channel: the weight's rows
        layer.weight, layer.weight_scale = _param(weight), _param(scale)

    def apply(self, layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
        return ops.fp8_linear(x, layer.weight, layer.weight_scale, layer.bias)


class Int4LinearMethod(LinearMethod):
    def __init__(self, config: QuantizationConfig) -> None:
        self.config = config

    def create_weights(self, layer: QuantizedLinear) -> None:
        k, n = layer.in_features, layer.out_features
        group = k if self.config.group_size == -1 else self.config.group_size
        if k % group or n % PACK:
            raise ValueError(f"{self.config.method}: a layer of {k} inputs and {n} outputs does not fit "
                             f"group_size={group} (inputs) and {PACK} values an int32 (outputs)")
        if self.config.from_float:
            layer.weight = _param(torch.empty(n, k))
            return
        int32 = torch.int32
        if self.config.method == "awq":
            layer.qweight = _param(torch.empty(k, n // PACK, dtype=int32), 1, PACK)
        else:
            layer.qweight = _param(torch.empty(k // PACK, n, dtype=int32), 1)
            layer.g_idx = _param(torch.empty(k, dtype=int32), None)
        layer.qzeros = _param(torch.empty(k // group, n // PACK, dtype=int32), 1, PACK)
        layer.scales = _param(torch.empty(k // group, n), 1)

    def process_weights_after_loading(self, layer: QuantizedLinear) -> None:
        layer.zero_offset = 0
        if self.config.from_float:
            weight = layer.weight.data
            q, zeros, scales = quantize_int4(weight, self.config.group_size, scale_dtype=weight.dtype)
            del layer.weight
            layer.qweight, layer.qzeros = map(_param, pack_gptq(q, zeros, 0))
            layer.scales = _param(scales)
        elif self.config.method == "awq":
            layer.qweight, layer.qzeros = map(_param, pack_gptq(*unpack_awq(layer.qweight, layer.qzeros), 0))
        else:
            group = layer.in_features // layer.scales.shape[0]
            sequential = torch.arange(layer.in_features, device=layer.g_idx.device) // group
            # A tensor-parallel shard of a row-parallel layer holds groups from its first input's on.
            if not torch.equal(layer.g_idx.data - layer.g_idx.data[0], sequential.to(layer.g_idx.dtype)):
                raise ValueError("gptq: a layer's g_idx is not input row // group_size (act-order): "
                                 "only GPTQ checkpoints without desc_act are supported")
            del layer.g_idx
            layer.zero_offset = self.config.zero_offset

    def apply(self, layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
        return ops.int4_linear(x, layer.qweight, layer.qzeros, layer.scales, layer.bias, layer.zero_offset)


def process_weights_after_loading(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.method.process_weights_after_loading(module)
