"""Scheduling policies: small classes chosen by name in the config."""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Iterator

from servebench.engine.core.request import Request


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


class HeapQueue:
    """Smallest `rank(request)` first, arrival order on ties; a preempted request keeps its rank."""

    rank: Callable[[Request], tuple]

    def __init__(self) -> None:
        self._heap: list[tuple[tuple, int, Request]] = []
        self._seq = itertools.count()

    def push(self, req: Request) -> None:
        heapq.heappush(self._heap, (self.rank(req), next(self._seq), req))

    push_front = push

    def peek(self) -> Request:
        return self._heap[0][2]

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[2]

    def remove(self, req: Request) -> None:
        self._heap = [e for e in self._heap if e[2] is not req]
        heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[Request]:
        return (e[2] for e in self._heap)


class PriorityQueue(HeapQueue):
    """Lowest `priority` value first, then arrival (vLLM's priority scheduling)."""

    rank = staticmethod(lambda r: (r.priority, r.arrival_time))


class ShortestPromptFirst(HeapQueue):
    """Fewest prompt tokens first: cuts mean TTFT, can starve long prompts."""

    rank = staticmethod(lambda r: (r.num_prompt_tokens, r.arrival_time))


class EarliestDeadlineFirst(HeapQueue):
    """Earliest TTFT deadline (`Request.deadline`) first; requests without one go last, by arrival."""

    rank = staticmethod(lambda r: (r.deadline if r.deadline is not None else float("inf"), r.arrival_time))


class LastAdmitted:
    """vLLM's victim: the most recently admitted running request.

    `select(running)` returns the index into `running` of the request to preempt.
    """

    @staticmethod
    def select(running: list[Request]) -> int:
        return len(running) - 1


class LowestPriority:
    """The running request with the largest priority value, latest arrival on ties."""

    @staticmethod
    def select(running: list[Request]) -> int:
        return max(range(len(running)), key=lambda j: (running[j].priority, running[j].arrival_time))


class LeastComputed:
    """The running request with the fewest computed tokens: the least work lost to a recompute."""

    @staticmethod
    def select(running: list[Request]) -> int:
        return min(
            range(len(running)), key=lambda j: (running[j].num_computed_tokens, -running[j].arrival_time)
        )


class MostBlocks:
    """The running request holding the most KV blocks: frees the most memory at once.

    The oldest running request is never chosen (unless it is alone): two large requests would
    otherwise preempt each other forever, while this way the oldest always finishes.
    """

    @staticmethod
    def select(running: list[Request]) -> int:
        candidates = range(1, len(running)) if len(running) > 1 else range(1)
        return max(candidates, key=lambda j: (running[j].num_kv_slots, running[j].arrival_time))


class RecomputePreemption:
    """vLLM V1: drop the victim's KV and recompute it on readmission (the prefix cache may keep part)."""

    @staticmethod
    def swap(req: Request, num_blocks: int) -> bool:
        return False


class SwapPreemption:
    """vLLM V0's swap: copy the victim's KV blocks to CPU swap space (recompute if that is full)."""

    @staticmethod
    def swap(req: Request, num_blocks: int) -> bool:
        return True


class CostPreemption:
    """Per victim, the cheaper way back: swap iff copying its blocks out and in again over PCIe
    takes less than recomputing its computed tokens (prefix-cache hits on readmission are ignored)."""

    def __init__(self, swap_s_per_block: float, recompute_s_per_token: float) -> None:
        self.swap_s_per_block = swap_s_per_block
        self.recompute_s_per_token = recompute_s_per_token

    def swap(self, req: Request, num_blocks: int) -> bool:
        return 2 * num_blocks * self.swap_s_per_block < req.num_computed_tokens * self.recompute_s_per_token


QUEUE_POLICIES = {
    "fcfs": FCFSQueue,
    "priority": PriorityQueue,
    "shortest_prompt": ShortestPromptFirst,
    "edf": EarliestDeadlineFirst,
}
VICTIM_POLICIES = {
    "last_admitted": LastAdmitted,
    "lowest_priority": LowestPriority,
    "least_computed": LeastComputed,
    "most_blocks": MostBlocks,
}
PREEMPTION_MODES = {"recompute": RecomputePreemption, "swap": SwapPreemption, "cost": CostPreemption}


def check_choice(table: dict, name: str, key: str) -> None:
    """ValueError naming the config `key` and the choices unless `name` is one of `table`'s."""
    if name not in table:
        raise ValueError(f"{key}: unknown value {name!r} (choose from {', '.join(table)})")


def make_queue(name: str) -> FCFSQueue | HeapQueue:
    return QUEUE_POLICIES[name]()


def make_victim_policy(name: str) -> LastAdmitted | LowestPriority | LeastComputed | MostBlocks:
    return VICTIM_POLICIES[name]()


def make_preemption(
    mode: str, swap_s_per_block: float | None, recompute_s_per_token: float | None
) -> RecomputePreemption | SwapPreemption | CostPreemption:
    """The preemption mode's policy; mode=cost needs both prices (the simulator fills them from its
    step-time model)."""
    if mode != "cost":
        return PREEMPTION_MODES[mode]()
    costs = {"swap_s_per_block": swap_s_per_block, "recompute_s_per_token": recompute_s_per_token}
    for name, value in costs.items():
        if value is None or value < 0:
            raise ValueError(
                f"scheduler.preemption_mode=cost needs scheduler.{name} >= 0 (the simulator fills it "
                f"from its step-time model), got {value}"
            )
    return CostPreemption(swap_s_per_block, recompute_s_per_token)
