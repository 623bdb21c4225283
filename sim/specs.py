"""Model, hardware and parallelism specs, and the KV-cache capacity they imply.

Specs are built from plain mappings (a Hydra group's node, e.g. `cfg.model`) by
`model_spec`, `hardware_spec` and `parallel_spec`, which name any missing or unknown key. `from_group`
builds them, and every other group's dataclass (the simulator's deployment features, the scheduler and
cache configs), the same way.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from servebench.engine.core.config import from_mapping

GiB = 1 << 30
T = TypeVar("T")


@dataclass(slots=True)
class ModelSpec:
    """Shape of a dense decoder-only transformer with a gated (SwiGLU) MLP: Llama, Qwen, Mistral."""

    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    max_model_len: int
    head_dim: int | None = None  # None: hidden_size // num_attention_heads (Qwen3 sets it explicitly)
    dtype_bytes: int = 2
    tie_word_embeddings: bool = False
    hf_name: str | None = None  # Hugging Face repo id, for the engine's loader
    vidur_name: str | None = None  # folder under vidur_profiles/compute/<device>/
    # What the engine needs to build the same shape with random weights (backend=engine, no checkpoint)
    architecture: str = "LlamaForCausalLM"
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    vision_encoder: dict[str, Any] | None = None  # vision-language models: the tower's shape (sim.multimodal)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"model.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"model.num_key_value_heads={self.num_key_value_heads}"
            )

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def linear_params_per_layer(self) -> int:
        """Weights of the layer's matmuls: qkv and o projections, gate/up and down projections."""
        attn = self.hidden_size * (self.q_size + 2 * self.kv_size) + self.q_size * self.hidden_size
        return attn + 3 * self.hidden_size * self.intermediate_size

    @property
    def params_per_layer(self) -> int:
        return self.linear_params_per_layer + 2 * self.hidden_size  # + two RMSNorm weights

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        heads = 1 if self.tie_word_embeddings else 2
        return self.num_layers * self.params_per_layer + heads * self.embedding_params + self.hidden_size

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.kv_size * self.dtype_bytes

    @property
    def flops_per_token(self) -> int:
        """Matmul FLOPs of one token through all layers and the LM head, attention scores excluded."""
        return 2 * (self.num_layers * self.linear_params_per_layer + self.embedding_params)

    def attention_flops(self, new_tokens: int, context_tokens: int) -> float:
        """QK^T and PV FLOPs of a causal chunk of `new_tokens` after `context_tokens` cached ones."""
        pairs = new_tokens * (context_tokens + (new_tokens + 1) / 2)
        return 4 * self.num_layers * self.q_size * pairs


@dataclass(slots=True)
class HardwareSpec:
    """One accelerator. Achievable rates are peak x efficiency (efficiencies are fitted from profiles)."""

    name: str
    peak_tflops: float  # dense bf16/fp16 tensor-core peak (datasheet)
    mem_bandwidth_gbs: float  # HBM bandwidth, GB/s (datasheet)
    mem_gib: float  # device memory as CUDA reports it
    pcie_gbs: float  # achievable host<->device copy bandwidth, GB/s (KV swap)
    interconnect_gbs: float  # achievable all-reduce bus bandwidth between GPUs of one host, GB/s
    interconnect_latency_s: float  # fixed cost of one collective (launch + synchronisation)
    matmul_efficiency: float = 0.8
    attention_efficiency: float = 0.5
    memory_efficiency: float = 0.85
    cpu_overhead_s: float = 0.0  # per step: scheduling, input preparation, sampling, launch gaps
    per_request_overhead_s: float = 0.0  # per request in the batch, on top of cpu_overhead_s
    peak_fp8_tflops: float | None = None  # dense fp8 tensor-core peak; None: no fp8 tensor cores (A100)
    vidur_device: str | None = None  # 'a100' | 'h100': folder under vidur_profiles/compute/
    network: str | None = None  # folder under vidur_profiles/network/, e.g. h100_dgx

    def __post_init__(self) -> None:
        for key in ("matmul_efficiency", "attention_efficiency", "memory_efficiency"):
            if not 0 < getattr(self, key) <= 1:
                raise ValueError(f"hardware.{key} must be in (0, 1], got {getattr(self, key)}")

    @property
    def matmul_flops(self) -> float:
        return self.peak_tflops * 1e12 * self.matmul_efficiency

    @property
    def attention_flops(self) -> float:
        return self.peak_tflops * 1e12 * self.attention_efficiency

    @property
    def mem_bandwidth(self) -> float:
        """Achievable HBM bandwidth in bytes/s."""
        return self.mem_bandwidth_gbs * 1e9 * self.memory_efficiency


@dataclass(slots=True)
class ParallelSpec:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1

    def __post_init__(self) -> None:
        for key in ("tensor_parallel_size", "pipeline_parallel_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"parallel.{key} must be >= 1, got {getattr(self, key)}")

    def check(self, model: ModelSpec) -> None:
        """Raise ValueError unless `model` can be sharded this way (vLLM's rules)."""
        tp, kv = self.tensor_parallel_size, model.num_key_value_heads
        if model.num_attention_heads % tp:
            raise ValueError(
                f"parallel.tensor_parallel_size={tp} does not divide "
                f"model.num_attention_heads={model.num_attention_heads} of {model.name}"
            )
        if kv % tp and tp % kv:
            raise ValueError(
                f"parallel.tensor_parallel_size={tp} and model.num_key_value_heads={kv} of {model.name}: "
                "one must divide the other"
            )
        if self.pipeline_parallel_size > model.num_layers:
            raise ValueError(
                f"parallel.pipeline_parallel_size={self.pipeline_parallel_size} exceeds "
                f"model.num_layers={model.num_layers} of {model.name}"
            )

    def kv_heads_per_gpu(self, model: ModelSpec) -> int:
        # fewer KV heads than GPUs: vLLM replicates each head
        return max(1, model.num_key_value_heads // self.tensor_parallel_size)

    def layers_per_stage(self, model: ModelSpec) -> int:
        return math.ceil(model.num_layers / self.pipeline_parallel_size)


def from_group(cls: type[T], group: str, values: Mapping[str, Any]) -> T:
    """The dataclass `cls` from a config group's mapping (a Hydra node such as `cfg.model`), through
    engine/core's `from_mapping`; a ValueError names `group.key` for a missing or an unknown key."""
    values = dict(values)
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        # None counts as missing: a group's YAML leaves a key it cannot fill as null
        if required and values.get(f.name) is None:
            raise ValueError(f"{group}.{f.name} is missing")
    return from_mapping(cls, values, lambda unknown, known: ValueError(
        f"{group}.{unknown[0]} is not a known key (known: {', '.join(known)})"))


def check_int(key: str, value: Any, minimum: int) -> None:
    """Raise ValueError naming `key` unless `value` is an integer >= `minimum` (a bool is no integer)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key}={value!r}: must be an integer >= {minimum}")


def model_spec(cfg: Mapping[str, Any]) -> ModelSpec:
    """Build from a mapping such as a Hydra `cfg.model` node (DictConfig is a Mapping)."""
    return from_group(ModelSpec, "model", cfg)


def hardware_spec(cfg: Mapping[str, Any]) -> HardwareSpec:
    return from_group(HardwareSpec, "hardware", cfg)


def parallel_spec(cfg: Mapping[str, Any] | None = None) -> ParallelSpec:
    return from_group(ParallelSpec, "parallel", cfg or {})


def block_bytes(
    model: ModelSpec, parallel: ParallelSpec, block_size: int, kv_dtype_bytes: int | None = None
) -> int:
    """Bytes one KV block (K and V of `block_size` tokens) takes on each GPU; `kv_dtype_bytes` (fp8 KV
    cache: 1) defaults to the model's dtype."""
    per_layer = 2 * parallel.kv_heads_per_gpu(model) * model.head_dim * (kv_dtype_bytes or model.dtype_bytes)
    return block_size * parallel.layers_per_stage(model) * per_layer


def weight_bytes_per_gpu(
    model: ModelSpec, parallel: ParallelSpec, linear_weight_bytes: float | None = None
) -> int:
    """Weights on the fullest GPU: its layers' share, plus the embedding and LM head (vocab-sharded).
    `linear_weight_bytes`: bytes per weight of the layers' matmuls in a quantized checkpoint (norms,
    embedding and LM head stay in the model's dtype)."""
    tp, dt = parallel.tensor_parallel_size, model.dtype_bytes
    linear = model.linear_params_per_layer
    per_layer = (model.params_per_layer - linear) * dt + linear * (linear_weight_bytes or dt)
    # one stage holds both vocab matrices only without pipelining and with untied embeddings
    vocab_mats = 2 if parallel.pipeline_parallel_size == 1 and not model.tie_word_embeddings else 1
    return int(parallel.layers_per_stage(model) * per_layer + vocab_mats * model.embedding_params * dt) // tp


def default_activation_reserve(model: ModelSpec, parallel: ParallelSpec, max_num_batched_tokens: int) -> int:
    """Memory vLLM's profiling run would hold back besides weights: ~1 GiB outside PyTorch (CUDA
    context, NCCL, CUDA graphs) plus the peak activations of one layer at `max_num_batched_tokens`
    (residual and hidden state, qkv, gate/up and SiLU output)."""
    tp = parallel.tensor_parallel_size
    per_token = 4 * model.hidden_size + (model.q_size + 2 * model.kv_size + 3 * model.intermediate_size) // tp
    return GiB + max_num_batched_tokens * per_token * model.dtype_bytes


def num_gpu_blocks(
    model: ModelSpec,
    hw: HardwareSpec,
    parallel: ParallelSpec,
    gpu_memory_utilization: float,
    block_size: int,
    activation_reserve_bytes: int | None = None,
    max_num_batched_tokens: int = 8192,
    linear_weight_bytes: float | None = None,
    kv_dtype_bytes: int | None = None,
) -> int:
    """KV blocks per GPU: (utilization x memory - weights - activation reserve) / block bytes.

    `activation_reserve_bytes` defaults to
    `default_activation_reserve(model, parallel, max_num_batched_tokens)`; `linear_weight_bytes` and
    `kv_dtype_bytes` as in `weight_bytes_per_gpu` and `block_bytes` (quantized weights, fp8 KV cache).
    """
    parallel.check(model)
    budget = gpu_memory_utilization * hw.mem_gib * GiB
    weights = weight_bytes_per_gpu(model, parallel, linear_weight_bytes)
    reserve = activation_reserve_bytes
    if reserve is None:
        reserve = default_activation_reserve(model, parallel, max_num_batched_tokens)
    blocks = int((budget - weights - reserve) // block_bytes(model, parallel, block_size, kv_dtype_bytes))
    if blocks < 1:
        raise ValueError(
            f"model {model.name} does not fit on {hw.name}: {weights / GiB:.1f} GiB of weights and "
            f"{reserve / GiB:.1f} GiB of activations per GPU leave no KV cache in gpu_memory_utilization="
            f"{gpu_memory_utilization} x {hw.mem_gib} GiB; raise tensor_parallel_size, "
            "pipeline_parallel_size or gpu_memory_utilization"
        )
    return blocks


def num_cpu_blocks(
    swap_space_gib: float,
    model: ModelSpec,
    parallel: ParallelSpec,
    block_size: int,
    kv_dtype_bytes: int | None = None,
) -> int:
    """KV blocks that `swap_space` GiB of CPU memory holds per GPU (vLLM's `swap_space` is per GPU)."""
    return int(swap_space_gib * GiB // block_bytes(model, parallel, block_size, kv_dtype_bytes))
