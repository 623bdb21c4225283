"""Scheduler and cache knobs, with vLLM's names and (V1) defaults."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from servebench.engine.core.eviction import EVICTION_POLICIES
from servebench.engine.core.policies import PREEMPTION_MODES, QUEUE_POLICIES, VICTIM_POLICIES, check_choice

T = TypeVar("T")


def from_mapping(cls: type[T], values: Mapping[str, Any],
                 unknown_error: Callable[[list[str], list[str]], Exception]) -> T:
    """The dataclass `cls` built from `values`, after one check that every key names a field: otherwise
    `unknown_error(unknown keys, known keys)`, both sorted, is raised (each caller words it for its users)."""
    known = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise unknown_error(unknown, known)
    return cls(**values)


def default_max_num_batched_tokens(max_model_len: int, enable_chunked_prefill: bool) -> int:
    """vLLM's default token budget: 8192 with chunked prefill, else room for one whole prompt."""
    return 8192 if enable_chunked_prefill else max(max_model_len, 2048)


@dataclass(slots=True)
class SchedulerConfig:
    """What the scheduler may put in one step and which policies it uses; checked when built, so a bad
    value fails before any request is served."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int = 0  # 0: no per-request cap on a prefill chunk
    # Prefills in one step (0: no cap, as vLLM V1); of which longer than long_prefill_token_threshold
    # (0: no separate cap). As vLLM, a cap > 1 sets a zero threshold to 4 % of max_model_len.
    max_num_partial_prefills: int = 0
    max_long_partial_prefills: int = 0
    preemption_mode: str = "recompute"  # recompute | swap | cost
    # preemption_mode=cost swaps a victim iff moving its blocks out and back over PCIe takes less
    # than recomputing its tokens; the simulator fills both from its step-time model.
    swap_s_per_block: float | None = None
    recompute_s_per_token: float | None = None
    max_model_len: int = 4096
    queue_policy: str = "fcfs"  # fcfs | priority | shortest_prompt | edf
    victim_policy: str = "last_admitted"  # last_admitted | lowest_priority | least_computed | most_blocks
    max_waiting: int = 0  # 0: no cap; an arrival that finds this many waiting is shed
    shed_ttft_ms: float = 0.0  # 0: off; a waiting request past this long before its first token is shed
    max_loras: int = 0  # LoRA adapters in GPU slots at once; 0: no slot limit
    max_cpu_loras: int | None = None  # adapters kept in CPU memory (LRU); None: max_loras
    encoder_cache_size: int = 0  # encoder output tokens cached across requests by image hash; 0: none

    def __post_init__(self) -> None:
        check_choice(PREEMPTION_MODES, self.preemption_mode, "scheduler.preemption_mode")
        check_choice(QUEUE_POLICIES, self.queue_policy, "scheduler.queue_policy")
        check_choice(VICTIM_POLICIES, self.victim_policy, "scheduler.victim_policy")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"scheduler.{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "max_num_partial_prefills",
            "max_long_partial_prefills",
            "max_waiting",
            "shed_ttft_ms",
            "max_loras",
            "encoder_cache_size",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"scheduler.{name} must be >= 0, got {getattr(self, name)}")
        self._check_partial_prefills()
        if self.max_cpu_loras is None:
            self.max_cpu_loras = self.max_loras
        elif self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"scheduler.max_cpu_loras={self.max_cpu_loras} must be >= max_loras={self.max_loras}"
            )
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"scheduler.max_num_batched_tokens={self.max_num_batched_tokens} is smaller than "
                f"max_model_len={self.max_model_len} with chunked prefill off: a long prompt "
                "could never be scheduled; raise it or enable chunked prefill"
            )

    def _check_partial_prefills(self) -> None:
        cap, long_cap = self.max_num_partial_prefills, self.max_long_partial_prefills
        if long_cap and (not cap or long_cap > cap):
            raise ValueError(
                f"scheduler.max_long_partial_prefills={long_cap} needs max_num_partial_prefills >= it, "
                f"got {cap}"
            )
        if cap > 1 and not self.long_prefill_token_threshold:
            self.long_prefill_token_threshold = max(1, int(0.04 * self.max_model_len))


@dataclass(slots=True)
class CacheConfig:
    """How the KV cache is cut into blocks and sized, and whether and how it keeps prefixes."""

    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    swap_space: float = 4.0  # GiB of CPU memory for swapped-out KV blocks
    enable_prefix_caching: bool = True
    num_gpu_blocks_override: int | None = None
    eviction_policy: str = "lru"  # which cached free block goes first: lru | lfu | cost

    def __post_init__(self) -> None:
        check_choice(EVICTION_POLICIES, self.eviction_policy, "cache.eviction_policy")
        if self.block_size < 1:
            raise ValueError(f"cache.block_size must be >= 1, got {self.block_size}")
        util = self.gpu_memory_utilization
        if not isinstance(util, int | float) or not 0 < util <= 1:
            raise ValueError(
                f"cache.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.swap_space < 0:
            raise ValueError(f"cache.swap_space must be >= 0 GiB, got {self.swap_space}")
