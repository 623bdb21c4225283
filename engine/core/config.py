"""Scheduler and cache knobs, with vLLM's names and (V1) defaults."""

from __future__ import annotations

from dataclasses import dataclass


def default_max_num_batched_tokens(max_model_len: int, enable_chunked_prefill: bool) -> int:
    """vLLM's default token budget: 8192 with chunked prefill, else room for one whole prompt."""
    return 8192 if enable_chunked_prefill else max(max_model_len, 2048)


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int = 0  # 0: no per-request cap on a prefill chunk
    preemption_mode: str = "recompute"  # recompute | swap
    max_model_len: int = 4096
    queue_policy: str = "fcfs"  # fcfs | priority
    victim_policy: str = "last_admitted"  # last_admitted | lowest_priority

    def __post_init__(self) -> None:
        if self.preemption_mode not in ("recompute", "swap"):
            raise ValueError(f"scheduler.preemption_mode={self.preemption_mode!r}: choose recompute or swap")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"scheduler.{name} must be >= 1, got {getattr(self, name)}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"scheduler.max_num_batched_tokens={self.max_num_batched_tokens} is smaller than "
                f"max_model_len={self.max_model_len} with chunked prefill off: a long prompt "
                "could never be scheduled; raise it or enable chunked prefill"
            )


@dataclass(slots=True)
class CacheConfig:
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    swap_space: float = 4.0  # GiB of CPU memory for swapped-out KV blocks
    enable_prefix_caching: bool = True
    num_gpu_blocks_override: int | None = None

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"cache.block_size must be >= 1, got {self.block_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"cache.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.swap_space < 0:
            raise ValueError(f"cache.swap_space must be >= 0 GiB, got {self.swap_space}")
