"""The `scheduler` and `cache` groups as engine/core's config objects, built one way for every backend."""

from __future__ import annotations

from typing import Any

from servebench.engine.core import CacheConfig, SchedulerConfig
from servebench.engine.core.config import default_max_num_batched_tokens
from servebench.sim.specs import from_group
from servebench.workbench.schema import ConfigError


def scheduler_config(cfg: dict[str, Any], model_max_len: int) -> SchedulerConfig:
    """The `scheduler` group as a SchedulerConfig, with vLLM's rules for the null defaults."""
    s = dict(cfg["scheduler"])
    s["max_model_len"] = s.get("max_model_len") or model_max_len
    if s["max_model_len"] > model_max_len:
        raise ConfigError(
            f"scheduler.max_model_len={s['max_model_len']} exceeds the model's context length {model_max_len}"
        )
    if s.get("max_num_batched_tokens") is None:
        chunked = s.get("enable_chunked_prefill", True)
        s["max_num_batched_tokens"] = default_max_num_batched_tokens(s["max_model_len"], chunked)
    return from_group(SchedulerConfig, "scheduler", s)


def cache_config(cfg: dict[str, Any]) -> CacheConfig:
    values = dict(cfg["cache"])
    values.pop("kv_cache_dtype", None)  # bytes per block, not block bookkeeping: the backends read it
    return from_group(CacheConfig, "cache", values)

