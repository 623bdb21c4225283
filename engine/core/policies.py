"""Scheduling policies: small classes chosen by name in the config."""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterator

from engine.core.request import Request


class FCFSQueue:
    """Arrival order; a preempted request goes back to the front."""

    def __init__(self) -> None:
        self._q: deque[Request] = deque()

    def push(self, req: Request) -> None:
        self._q.append(req)

    def push_front(self, req: Request) -> None:
        self._q.appendleft(req)

    def peek(self) -> Request:
        return self._q[0]

    def pop(self) -> Request:
        return self._q.popleft()

    def remove(self, req: Request) -> None:
        self._q.remove(req)

    def __len__(self) -> int:
        return len(self._q)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._q)


class PriorityQueue:
    """Lowest `priority` value first, then arrival (vLLM's priority scheduling)."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, int, Request]] = []
        self._seq = itertools.count()

    def push(self, req: Request) -> None:
        heapq.heappush(self._heap, (req.priority, req.arrival_time, next(self._seq), req))

    push_front = push  # a preempted request keeps its rank by priority and arrival

    def peek(self) -> Request:
        return self._heap[0][3]

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[3]

    def remove(self, req: Request) -> None:
        self._heap = [e for e in self._heap if e[3] is not req]
        heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[Request]:
        return (e[3] for e in self._heap)


class LastAdmitted:
    """vLLM's victim: the most recently admitted running request.

    `select(running, current)` returns an index into `running`; `current` is the
    request that needs a block (those before it are already in this step's batch).
    """

    @staticmethod
    def select(running: list[Request], current: int) -> int:
        return len(running) - 1


class LowestPriority:
    """The running request with the largest priority value, latest arrival on ties."""

    @staticmethod
    def select(running: list[Request], current: int) -> int:
        return max(range(len(running)), key=lambda j: (running[j].priority, running[j].arrival_time))


QUEUE_POLICIES = {"fcfs": FCFSQueue, "priority": PriorityQueue}
VICTIM_POLICIES = {"last_admitted": LastAdmitted, "lowest_priority": LowestPriority}


def _choose(table: dict, name: str, key: str):
    if name not in table:
        raise ValueError(f"{key}={name!r} is not a known policy; choose one of {sorted(table)}")
    return table[name]()


def make_queue(name: str) -> FCFSQueue | PriorityQueue:
    return _choose(QUEUE_POLICIES, name, "scheduler.queue_policy")


def make_victim_policy(name: str) -> LastAdmitted | LowestPriority:
    return _choose(VICTIM_POLICIES, name, "scheduler.victim_policy")
