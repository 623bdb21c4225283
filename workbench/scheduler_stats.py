"""The counters of a run's schedulers for summary.json, from their `stats()` (the sim's schedulers, the
engine's one)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from servebench.engine.core import SchedulerStats


def scheduler_counts(stats: Sequence[SchedulerStats], duration_s: float) -> dict[str, Any]:
    """Steps and prefix-cache tokens queried and hit, summed over the schedulers, and the run's duration, in
    summary.json's order."""
    return {
        "num_steps": sum(s.num_steps for s in stats),
        "duration_s": duration_s,
        "prefix_cache_queries_tokens": sum(s.prefix_cache_queries_tokens for s in stats),
        "prefix_cache_hits_tokens": sum(s.prefix_cache_hits_tokens for s in stats),
    }


def per_replica_counts(replicas: Sequence[Sequence[SchedulerStats]]) -> dict[str, list]:
    """Counts per replica (summed over its pipeline virtual engines): how the router spread the load."""
    def total(count: Callable[[SchedulerStats], int]) -> list[int]:
        return [sum(count(s) for s in replica) for replica in replicas]

    queries = total(lambda s: s.prefix_cache_queries_tokens)
    hits = total(lambda s: s.prefix_cache_hits_tokens)
    return {
        "num_requests": total(lambda s: s.num_finished_requests),
        "num_steps": total(lambda s: s.num_steps),
        "num_preemptions": total(lambda s: s.num_preemptions),
        "prefix_cache_hit_rate": [h / q if q else None for h, q in zip(hits, queries, strict=True)],
    }
