"""Engine arguments (vLLM's names and defaults) and the model facts read from a HF `config.json`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from servebench.engine.core.config import (
    CacheConfig,
    SchedulerConfig,
    default_max_num_batched_tokens,
    from_mapping,
)

DTYPES = {"float16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
          "float32": torch.float32, "float": torch.float32}
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
# vLLM's names: fp8 quantizes a bf16/fp32 checkpoint's weights at load; awq and gptq load 4-bit checkpoints.
QUANTIZATION_METHODS = ("fp8", "awq", "gptq")
KV_CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn}
CUDAGRAPH_MODES = ("NONE", "FULL_DECODE_ONLY", "FULL")  # vLLM's names of what CUDA graphs hold
DEFAULT_CUDAGRAPH_MODE = "FULL"
LORA_RANKS = (8, 16, 32, 64)  # max_lora_rank's choices (vLLM's, up to 64)
FP8_KV_CAPABILITY = (8, 9)  # Triton converts to and from e4m3 on Ada and Hopper GPUs, not before
# Where older AutoGPTQ and AutoAWQ checkpoints keep their quantization config (config.json has none).
QUANT_CONFIG_FILES = ("quantize_config.json", "quant_config.json")


@dataclass(slots=True)
class ModelConfig:
    """What the model code needs from config.json, the same for every supported family."""

    path: Path
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    initializer_range: float
    dtype: torch.dtype  # the checkpoint's
    sliding_window: int | None
    quantization_config: dict | None  # a quantized checkpoint's (engine.quantization reads it)

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model path {path} is not a local Hugging Face model directory (no config.json)")
        cfg = json.loads((path / "config.json").read_text())
        arch = (cfg.get("architectures") or ["?"])[0]
        if arch not in ARCHITECTURES:
            raise ValueError(f"{path / 'config.json'}: architectures={arch!r} is not supported; "
                             f"supported: {', '.join(ARCHITECTURES)}")
        heads = cfg["num_attention_heads"]
        return cls(
            path=path, architecture=arch, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"], num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=_rope_theta(cfg),
            rope_scaling=_rope_scaling(cfg),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            # Qwen2 hard-codes a q/k/v bias; Llama-style configs say it with attention_bias.
            qkv_bias=arch == "Qwen2ForCausalLM" or cfg.get("attention_bias", False),
            qk_norm=arch == "Qwen3ForCausalLM", initializer_range=cfg.get("initializer_range", 0.02),
            dtype=DTYPES.get(cfg.get("torch_dtype") or cfg.get("dtype") or "float32", torch.float32),
            sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None,
            quantization_config=_quantization_config(path, cfg),
        )

    @property
    def eos_token_ids(self) -> list[int]:
        """EOS ids from generation_config.json (Llama 3 lists several), else config.json."""
        for name in ("generation_config.json", "config.json"):
            file = self.path / name
            eos = json.loads(file.read_text()).get("eos_token_id") if file.is_file() else None
            if eos is not None:
                return eos if isinstance(eos, list) else [eos]
        return []


def _quantization_config(path: Path, cfg: dict) -> dict | None:
    if cfg.get("quantization_config"):
        return cfg["quantization_config"]
    for name in QUANT_CONFIG_FILES:
        if (path / name).is_file():
            return json.loads((path / name).read_text())
    return None


def _rope_params(cfg: dict) -> dict:
    # transformers 5 writes rope_parameters; released checkpoints have rope_theta + rope_scaling.
    return cfg.get("rope_parameters") or {}


def _rope_theta(cfg: dict) -> float:
    return float(cfg.get("rope_theta") or _rope_params(cfg).get("rope_theta") or 10000.0)


def _rope_scaling(cfg: dict) -> dict | None:
    scaling = cfg.get("rope_scaling") or {k: v for k, v in _rope_params(cfg).items() if k != "rope_theta"}
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    return None if kind == "default" else {**scaling, "rope_type": kind}


@dataclass(slots=True)
class EngineArgs:
    """The knobs of `LLM(...)` and `LLMEngine`, named and defaulted as in vLLM."""

    model: str
    tokenizer: str | None = None
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    swap_space: float = 4.0
    block_size: int = 16
    seed: int = 0
    enforce_eager: bool = False  # no CUDA graphs at all (cudagraph_mode NONE)
    # vLLM's compilation_config, of which only {"cudagraph_mode": ...} is read: FULL (the default: every
    # step up to 2048 tokens replays a CUDA graph) or FULL_DECODE_ONLY (decode steps only; the rest eager).
    compilation_config: dict | None = None
    load_format: str = "auto"
    # The KV cache's size in place of memory profiling: an engine-only knob, so not in engine/core's
    # CacheConfig, which the simulator shares.
    kv_cache_memory_bytes: int | None = None
    preemption_mode: str = "recompute"
    num_gpu_blocks_override: int | None = None
    scheduling_policy: str = "fcfs"
    device: str = "auto"
    # vLLM's --async-scheduling: the next step is scheduled and launched while this one runs on the GPU.
    async_scheduling: bool = False
    # None: the checkpoint's own quantization_config (none: unquantized); else QUANTIZATION_METHODS.
    quantization: str | None = None
    kv_cache_dtype: str = "auto"  # auto (the model's dtype) or fp8 / fp8_e4m3 (e4m3, scale 1.0)
    # Multi-LoRA (vLLM's knobs): adapters in GPU slots at once, the largest rank, adapters in the CPU cache
    # (None: max_loras). Requests name their adapter with an engine.lora.LoRARequest.
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None

    def __post_init__(self) -> None:
        self._check_tensor_parallel()
        self._check_compilation_config()
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: choose auto, float16, bfloat16 or float32")
        if self.load_format not in ("auto", "safetensors", "dummy"):
            raise ValueError(f"load_format={self.load_format!r}: choose auto, safetensors or dummy")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"device={self.device!r}: choose auto, cuda or cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but torch sees no CUDA device")
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization={self.quantization!r} is not supported: choose "
                             f"{', '.join(QUANTIZATION_METHODS)} (or None: the checkpoint's own)")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype={self.kv_cache_dtype!r} is not supported: choose "
                             f"{', '.join(KV_CACHE_DTYPES)}")
        self._check_lora()

    def _check_compilation_config(self) -> None:
        given = self.compilation_config or {}
        unknown = sorted(set(given) - {"cudagraph_mode"})
        if unknown:
            raise ValueError(f"compilation_config: {', '.join(unknown)} not supported; only cudagraph_mode")
        mode = given.get("cudagraph_mode", DEFAULT_CUDAGRAPH_MODE)
        if mode not in CUDAGRAPH_MODES:
            raise ValueError(f"compilation_config.cudagraph_mode={mode!r}: choose "
                             f"{', '.join(CUDAGRAPH_MODES)}")

    @property
    def cudagraph_mode(self) -> str:
        """NONE with enforce_eager, else compilation_config's (default FULL_DECODE_ONLY)."""
        if self.enforce_eager:
            return "NONE"
        return (self.compilation_config or {}).get("cudagraph_mode", DEFAULT_CUDAGRAPH_MODE)

    def _check_tensor_parallel(self) -> None:
        n = self.tensor_parallel_size
        if n < 1:
            raise ValueError(f"tensor_parallel_size={n} must be >= 1")
        if n == 1:
            return
        gpus = torch.cuda.device_count()
        if self.torch_device.type == "cuda" and gpus < n:
            raise ValueError(f"tensor_parallel_size={n} needs {n} GPUs; torch sees {gpus}")

    def _check_lora(self) -> None:
        if self.max_loras < 1:
            raise ValueError(f"max_loras={self.max_loras} must be >= 1")
        if self.max_lora_rank not in LORA_RANKS:
            raise ValueError(f"max_lora_rank={self.max_lora_rank}: choose one of "
                             f"{', '.join(map(str, LORA_RANKS))}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras={self.max_cpu_loras} must be >= max_loras={self.max_loras}")

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> EngineArgs:
        """Like `EngineArgs(model, **kwargs)`, with one clear error for unknown names."""
        return from_mapping(cls, {"model": model, **kwargs}, lambda unknown, known: TypeError(
            f"unknown engine argument(s): {', '.join(unknown)}; known: {', '.join(known)}"))

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self, model_config: ModelConfig) -> torch.dtype:
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        # As vLLM: a float32 checkpoint runs in half precision on a GPU (bfloat16 here, the safer range).
        if model_config.dtype == torch.float32 and self.torch_device.type == "cuda":
            return torch.bfloat16
        return model_config.dtype

    def kv_cache_torch_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The KV cache's dtype: the model's, or e4m3 (where this device's kernels can convert it)."""
        dtype = KV_CACHE_DTYPES[self.kv_cache_dtype] or model_dtype
        device = self.torch_device
        if dtype == torch.float8_e4m3fn and device.type == "cuda":
            capability = torch.cuda.get_device_capability(device)
            if capability < FP8_KV_CAPABILITY:
                raise ValueError(f"kv_cache_dtype={self.kv_cache_dtype!r} needs a GPU of compute capability "
                                 f"8.9 or newer (Ada, Hopper); {torch.cuda.get_device_name(device)} is "
                                 f"{capability[0]}.{capability[1]}")
        return dtype

    def resolved_max_model_len(self, model_config: ModelConfig) -> int:
        limit = model_config.max_position_embeddings
        if model_config.sliding_window:  # no sliding-window attention: stay inside one window
            limit = min(limit, model_config.sliding_window)
        if self.max_model_len is None:
            return limit
        if self.max_model_len > limit:
            raise ValueError(
                f"max_model_len={self.max_model_len} exceeds the model's limit of {limit} tokens "
                f"(max_position_embeddings / sliding_window in {model_config.path / 'config.json'})")
        return self.max_model_len

    def scheduler_config(self, max_model_len: int) -> SchedulerConfig:
        budget = self.max_num_batched_tokens
        if budget is None:
            budget = default_max_num_batched_tokens(max_model_len, self.enable_chunked_prefill)
        return SchedulerConfig(
            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=budget,
            enable_chunked_prefill=self.enable_chunked_prefill, preemption_mode=self.preemption_mode,
            max_model_len=max_model_len, queue_policy=self.scheduling_policy,
            max_loras=self.max_loras if self.enable_lora else 0, max_cpu_loras=self.max_cpu_loras,
        )

    def cache_config(self) -> CacheConfig:
        """The cache knobs as engine/core's CacheConfig: LLMEngine builds it once, for the scheduler and the
        model runner alike."""
        return CacheConfig(
            block_size=self.block_size, gpu_memory_utilization=self.gpu_memory_utilization,
            swap_space=self.swap_space, enable_prefix_caching=self.enable_prefix_caching,
            num_gpu_blocks_override=self.num_gpu_blocks_override,
        )
