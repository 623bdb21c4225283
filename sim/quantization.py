"""Quantized weights (AWQ, GPTQ, FP8) and an FP8 KV cache: their memory and their step-time effect.

Memory: the layers' matmul weights take `Quantization.bytes_per_weight` bytes (int4: 0.5 byte plus a
scale and zero point per group of `group_size` weights; fp8: 1 byte); the embedding, LM head and norms
stay in the model's dtype, as vLLM loads them. An fp8 KV cache stores 1 byte per element, so the same
memory holds twice the blocks (vLLM docs, "Quantized KV Cache").

Time: `QuantizedRoofline` is the roofline with the matmuls reading the quantized bytes and running at
`gemm_speedup` x the bf16 FLOP rate, and attention reading the KV cache's bytes. `QuantizationTerm` adds
its difference to the plain roofline on top of whichever step-time model runs (for Vidur's bf16
profiles: their measured time plus the roofline's saving). The factors and their sources:
- int4 weight-only (AWQ, GPTQ): vLLM runs both with the Marlin kernels on sm80+ (awq_marlin,
  gptq_marlin). Marlin (Frantar et al., "MARLIN: Mixed-Precision Auto-Regressive Parallel Inference on
  Large Language Models", arXiv:2408.11743) reaches close to the ideal 4x at batch sizes up to 16-32
  (memory-bound: the roofline's bytes term) and falls back to about bf16 speed when compute-bound,
  minus dequantization in the main loop: `gemm_efficiency` 0.9 of the bf16 rate there.
- fp8 W8A8 (vLLM `quantization=fp8`): on Hopper the fp8 tensor cores double the dense peak (H100 SXM
  datasheet: 1979 vs 989 TFLOP/s), so `gemm_speedup` = peak_fp8_tflops / peak_tflops. The A100 has no
  fp8 tensor cores: vLLM then runs fp8 checkpoints weight-only through the FP8 Marlin kernel (vLLM docs,
  "FP8 W8A8": "Ampere GPUs are supported for W8A16 (weight-only FP8) utilizing FP8 Marlin"), which is
  what the simulator models there too, with a note in the run's summary.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from servebench.engine.core.scheduler_output import SchedulerOutput
from servebench.sim.specs import HardwareSpec, ModelSpec, ParallelSpec, block_bytes, from_group
from servebench.sim.step_time import RooflineStepTime

METHODS = ("none", "awq", "gptq", "fp8")
KV_CACHE_DTYPES = {"auto": None, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}  # vLLM's names -> bytes per element


@dataclass(slots=True)
class Quantization:
    """One `conf/quantization/*.yaml`: how the layers' matmul weights are stored and computed."""

    method: str = "none"
    weight_bits: int = 16
    group_size: int | None = None  # weights per scale group (int4 methods); None: per channel or tensor
    group_bytes: float = 0.0  # bytes of scale (+ zero point) per group
    fp8_compute: bool = False  # W8A8: activations in fp8 too, on fp8 tensor cores where the GPU has them
    gemm_efficiency: float = 1.0  # compute-bound GEMM rate relative to bf16 (dequantization overhead)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"quantization.method={self.method!r}: choose one of {', '.join(METHODS)}")
        if self.weight_bits not in (4, 8, 16):
            raise ValueError(f"quantization.weight_bits={self.weight_bits}: choose 4, 8 or 16")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"quantization.group_size={self.group_size}: must be >= 1 or null")
        if not 0 < self.gemm_efficiency <= 1:
            raise ValueError(f"quantization.gemm_efficiency={self.gemm_efficiency}: must be in (0, 1]")

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def bytes_per_weight(self) -> float:
        return self.weight_bits / 8 + (self.group_bytes / self.group_size if self.group_size else 0.0)

    def gemm_speedup(self, hw: HardwareSpec) -> float:
        """Compute-bound GEMM rate relative to bf16 on `hw`."""
        fp8 = self.fp8_compute and hw.peak_fp8_tflops is not None
        return (hw.peak_fp8_tflops / hw.peak_tflops if fp8 else 1.0) * self.gemm_efficiency

    def note(self, hw: HardwareSpec) -> str:
        if not self.enabled:
            return "none"
        if self.fp8_compute and hw.peak_fp8_tflops is None:
            return (
                f"{self.method}: {hw.name} has no fp8 tensor cores; simulated as weight-only fp8 "
                "(W8A16, FP8 Marlin, as vLLM runs it on Ampere)"
            )
        speedup = self.gemm_speedup(hw)
        return f"{self.method}: {self.bytes_per_weight:.3f} bytes/weight, GEMM rate {speedup:.2f}x bf16"


def quantization_spec(cfg: Mapping[str, Any] | None) -> Quantization:
    return from_group(Quantization, "quantization", cfg or {})


def kv_dtype_bytes(kv_cache_dtype: str) -> int | None:
    """Bytes per KV element for `cache.kv_cache_dtype`; None: the model's dtype ('auto')."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        choices = ", ".join(KV_CACHE_DTYPES)
        raise ValueError(f"cache.kv_cache_dtype={kv_cache_dtype!r}: choose one of {choices}")
    return KV_CACHE_DTYPES[kv_cache_dtype]


class QuantizedRoofline(RooflineStepTime):
    """The roofline with quantized matmul weights and a KV cache of `kv_bytes` bytes per element."""

    def __init__(
        self,
        model: ModelSpec,
        hw: HardwareSpec,
        parallel: ParallelSpec,
        block_size: int,
        quant: Quantization,
        kv_bytes: int | None,
    ) -> None:
        super().__init__(model, hw, parallel, block_size)
        tp, kv_bytes = self._tp, kv_bytes or model.dtype_bytes
        self._linear_bytes = model.linear_params_per_layer * quant.bytes_per_weight / tp
        self._linear_flops_per_token /= quant.gemm_speedup(hw)  # same work at a higher (or lower) rate
        self._kv_bytes_per_token = 2 * parallel.kv_heads_per_gpu(model) * model.head_dim * kv_bytes
        self._swap_s_per_block = block_bytes(model, parallel, block_size, kv_bytes) / (hw.pcie_gbs * 1e9)


class QuantizationTerm:
    """Seconds a step gains (negative) or loses from quantization: quantized minus plain roofline."""

    def __init__(
        self,
        model: ModelSpec,
        hw: HardwareSpec,
        parallel: ParallelSpec,
        block_size: int,
        quant: Quantization,
        kv_bytes: int | None,
    ) -> None:
        self._plain = RooflineStepTime(model, hw, parallel, block_size).predict
        self._quantized = QuantizedRoofline(model, hw, parallel, block_size, quant, kv_bytes).predict

    def __call__(self, out: SchedulerOutput) -> float:
        return self._quantized(out) - self._plain(out)
