"""Which cached free KV block the block pool evicts first (`cache.eviction_policy`).

A free queue holds the ids of free blocks that still hold a prefix-cache hash.
The pool uses it like an OrderedDict: `q[block_id] = None` when a block is freed,
`del q[block_id]` when a prefix hit takes it back, `q.popitem(last=False)` to
evict. LRU is the OrderedDict itself, so vLLM's default stays O(1) with no
Python-level call; the others keep a heap with lazy deletion.

Evicting a parent before its child orphans the child (a lookup stops at the
first miss), so every policy evicts leaf first: the pool frees a block table
tail first, a block's hits are never fewer than its child's (every hit on the
child hits the parent too), and `cost` passes a child's value up to its parents.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Iterator


class LRUQueue(OrderedDict):
    """vLLM's policy: the least recently freed block goes first."""

    revalue = None  # no per-block scores to keep up to date


class ScoredFreeQueue:
    """Smallest `scores[block]` first, least recently freed on ties; stale heap entries are skipped."""

    revalue = None  # only CostQueue derives scores from a block table before it is freed

    def __init__(self, hits: list[int], value: list[int], scores: list[int]) -> None:
        self._scores = scores
        self._hits, self._value = hits, value  # the pool's per-block lists, shared, not copied
        self._heap: list[tuple[int, int, int]] = []  # (score, free order, block id)
        self._live: dict[int, int] = {}  # block id -> free order of its current entry
        self._order = itertools.count()

    def __setitem__(self, block_id: int, _: None) -> None:
        order = next(self._order)
        self._live[block_id] = order
        heapq.heappush(self._heap, (self._scores[block_id], order, block_id))
        if len(self._heap) > 2 * len(self._live) + 64:  # too many stale entries: rebuild
            self._heap = [e for e in self._heap if self._live.get(e[2]) == e[1]]
            heapq.heapify(self._heap)

    def __delitem__(self, block_id: int) -> None:
        del self._live[block_id]

    def popitem(self, last: bool = False) -> tuple[int, None]:
        while True:
            _, order, block_id = heapq.heappop(self._heap)
            if self._live.get(block_id) == order:
                del self._live[block_id]
                self._hits[block_id] = self._value[block_id] = 0  # its content is gone
                return block_id, None

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[int]:
        return iter(self._live)

    def __contains__(self, block_id: object) -> bool:
        return block_id in self._live


class LFUQueue(ScoredFreeQueue):
    """The block with the fewest prefix-cache hits goes first (least recently freed on ties)."""

    def __init__(self, hits: list[int], value: list[int]) -> None:
        super().__init__(hits, value, hits)


class CostQueue(ScoredFreeQueue):
    """Keeps the blocks that save the most recompute: a block at depth d (1 = first block of a
    prompt) hit h times has saved d x h blocks of prefill; its value is the largest such product
    over itself and its cached descendants, and the lowest value goes first."""

    def __init__(self, hits: list[int], value: list[int]) -> None:
        super().__init__(hits, value, value)

    def revalue(self, table: list[int]) -> None:
        """Update the values along one request's block table (its chain, root first) before it is freed."""
        value, hits = self._value, self._hits
        best = 0
        for depth in range(len(table), 0, -1):
            b = table[depth - 1]
            best = max(best, value[b], depth * hits[b])
            value[b] = best


EVICTION_POLICIES = {"lru": LRUQueue, "lfu": LFUQueue, "cost": CostQueue}


def make_free_queue(name: str, hits: list[int], value: list[int]) -> LRUQueue | ScoredFreeQueue:
    """The free queue of policy `name` over a pool's per-block `hits` and `value` lists."""
    return LRUQueue() if name == "lru" else EVICTION_POLICIES[name](hits, value)
