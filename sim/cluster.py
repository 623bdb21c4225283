"""Deployments bigger than one engine: N replicas behind a router, each maybe pipelined over P stages.

A replica is its own Scheduler + KVCacheManager (no state is shared between replicas). Under pipeline
parallelism a replica runs vLLM V0's scheme: P virtual engines, each a Scheduler with 1/P of the KV
blocks and its own engine loop, whose batches share the P pipeline stages; a request lives in one
virtual engine, so it is in at most one in-flight batch, and up to P batches are in flight at once.
(vLLM V1 keeps one scheduler and a queue of P batches; the throughput and bubbles are the same, the
KV cache is not partitioned.) Arrivals go to the replica the router picks, then to that replica's
virtual engine with the fewest unfinished requests (V0's rule).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import simpy
from servebench.engine.core.graphs import GraphSizes
from servebench.engine.core.request import Request
from servebench.engine.core.scheduler import Scheduler
from servebench.sim.simulator import Engine, Simulation, StepTimeModel
from servebench.sim.specs import check_int, from_group

ROUTERS = ("round_robin", "least_outstanding", "prefix_aware")


@dataclass(slots=True)
class Deployment:
    """The `deployment` group."""

    num_replicas: int = 1
    router: str = "round_robin"

    def __post_init__(self) -> None:
        check_int("deployment.num_replicas", self.num_replicas, 1)
        if self.router not in ROUTERS:
            raise ValueError(f"deployment.router={self.router!r}: choose one of {', '.join(ROUTERS)}")


def deployment_spec(cfg: Mapping[str, Any] | None) -> Deployment:
    return from_group(Deployment, "deployment", cfg or {})


@dataclass(slots=True, eq=False)
class Replica:
    engines: list[Engine]  # one per pipeline virtual engine

    def outstanding(self) -> int:
        """Unfinished requests (waiting, running, swapped) over the replica's virtual engines."""
        return sum(len(e.scheduler.requests) for e in self.engines)

    def cached_prefix_blocks(self, req: Request) -> int:
        """Full blocks of `req`'s prompt that the replica's prefix cache holds now (a lookup, no side effect
        but filling `req.block_hashes`, which every replica computes alike)."""
        return max(e.scheduler.cached_prefix_blocks(req) for e in self.engines)

    def least_loaded_engine(self) -> Engine:
        engines = self.engines
        return engines[0] if len(engines) == 1 else min(engines, key=lambda e: len(e.scheduler.requests))


class RoundRobin:
    def __init__(self) -> None:
        self._next = 0

    def select(self, req: Request, replicas: Sequence[Replica]) -> int:
        return self._take_turn(len(replicas))

    def rotation(self, n: int) -> list[int]:
        """0..n-1 starting from the next replica in turn: a tie-break that spreads ties evenly (at low load
        every replica has 0 outstanding; ties to the lowest index would send it everything)."""
        first = self._take_turn(n)
        return [*range(first, n), *range(first)]

    def _take_turn(self, n: int) -> int:
        i = self._next
        self._next = (i + 1) % n
        return i


class LeastOutstanding:
    """Fewest unfinished requests; ties in turn."""

    def __init__(self) -> None:
        self._turn = RoundRobin()

    def select(self, req: Request, replicas: Sequence[Replica]) -> int:
        return min(self._turn.rotation(len(replicas)), key=lambda i: replicas[i].outstanding())


class PrefixAware:
    """The replica whose prefix cache holds the longest prefix of the prompt; ties: fewest unfinished
    requests, then in turn (like SGLang's cache-aware router, without its load-imbalance threshold)."""

    def __init__(self) -> None:
        self._turn = RoundRobin()

    def select(self, req: Request, replicas: Sequence[Replica]) -> int:
        return min(
            self._turn.rotation(len(replicas)),
            key=lambda i: (-replicas[i].cached_prefix_blocks(req), replicas[i].outstanding()),
        )


def make_router(name: str) -> RoundRobin | LeastOutstanding | PrefixAware:
    """`name`: one of ROUTERS (checked by `Deployment`)."""
    routers = {"round_robin": RoundRobin, "least_outstanding": LeastOutstanding, "prefix_aware": PrefixAware}
    return routers[name]()


class ClusterSimulation(Simulation):
    """`replicas[r]` lists replica r's schedulers (P of them under pipeline parallelism, else one);
    `step_times[r]` prices its steps; `router` picks a replica per arrival."""

    def __init__(
        self,
        replicas: Sequence[Sequence[Scheduler]],
        step_times: Sequence[StepTimeModel],
        requests: Iterable[Request],
        router: RoundRobin | LeastOutstanding | PrefixAware,
        on_finished: Callable[[int], None] | None = None,
        graph_sizes: GraphSizes | None = None,
        async_scheduling: bool = False,
        device_time_scale: float = 1.0,
    ) -> None:
        super().__init__(replicas[0][0], step_times[0], requests, on_finished, graph_sizes, async_scheduling,
                         device_time_scale)
        self.replicas = [
            Replica(self._engines(schedulers, step_time))
            for schedulers, step_time in zip(replicas, step_times, strict=True)
        ]
        self.engines = [e for replica in self.replicas for e in replica.engines]
        self.router = router

    def _engines(self, schedulers: Sequence[Scheduler], step_time: StepTimeModel) -> list[Engine]:
        stages = [simpy.Resource(self.env) for _ in schedulers] if len(schedulers) > 1 else None
        return [Engine(s, step_time, stages) for s in schedulers]

    def route(self, req: Request) -> Engine:
        replicas = self.replicas
        replica = replicas[0] if len(replicas) == 1 else replicas[self.router.select(req, replicas)]
        return replica.least_loaded_engine()
