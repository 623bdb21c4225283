"""The counters of a run's schedulers for summary.json. The one place the workbench reads scheduler
internals (`kv.prefix_queries`, `recorder.request_rows`): a public `Scheduler.stats()` would replace them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from servebench.engine.core import Scheduler


def scheduler_counts(schedulers: Sequence[Scheduler], duration_s: float) -> dict[str, Any]:
    """Steps and prefix-cache tokens queried and hit, summed over the schedulers, and the run's duration, in
    summary.json's order."""
    return {
        "num_steps": sum(s.num_steps for s in schedulers),
        "duration_s": duration_s,
        "prefix_cache_queries_tokens": sum(s.kv.prefix_queries for s in schedulers),
        "prefix_cache_hits_tokens": sum(s.kv.prefix_hits for s in schedulers),
    }


def per_replica_counts(replicas: list[list[Scheduler]]) -> dict[str, list]:
    """Counts per replica (summed over its pipeline virtual engines): how the router spread the load."""
    def total(fn) -> list:
        return [sum(fn(s) for s in replica) for replica in replicas]

    queries = total(lambda s: s.kv.prefix_queries)
    hits = total(lambda s: s.kv.prefix_hits)
    return {
        "num_requests": total(lambda s: len(s.recorder.request_rows)),
        "num_steps": total(lambda s: s.num_steps),
        "num_preemptions": total(lambda s: s.num_preemptions),
        "prefix_cache_hit_rate": [h / q if q else None for h, q in zip(hits, queries, strict=True)],
    }
