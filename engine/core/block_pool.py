"""KV blocks, their reference counts, the prefix index and the free queue."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(slots=True, eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None


class BlockPool:
    """Owns every GPU KV block.

    A free block that still holds a hash stays in the prefix index, reusable by a
    later request, until it is evicted. Free blocks without a hash are handed out
    first, so cached content lives as long as possible; among cached free blocks
    the least recently freed is evicted first (LRU, as vLLM).
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.enable_caching = enable_caching
        self.num_blocks = num_blocks
        self._empty: list[int] = list(range(num_blocks - 1, -1, -1))
        self._cached_free: OrderedDict[int, None] = OrderedDict()
        self._index: dict[int, int] = {}  # block hash -> block id
        self.num_free = num_blocks

    def lookup(self, block_hash: int) -> KVBlock | None:
        block_id = self._index.get(block_hash)
        return None if block_id is None else self.blocks[block_id]

    def allocate(self, n: int) -> list[KVBlock]:
        if n > self.num_free:
            raise RuntimeError(f"asked for {n} blocks with {self.num_free} free")
        blocks, empty, cached_free, index = self.blocks, self._empty, self._cached_free, self._index
        out = []
        for _ in range(n):
            if empty:
                block = blocks[empty.pop()]
            else:
                block = blocks[cached_free.popitem(last=False)[0]]
                del index[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            out.append(block)
        self.num_free -= n
        return out

    def touch(self, blocks: list[KVBlock]) -> None:
        """Take a reference on cached blocks found by a prefix lookup."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._cached_free[block.block_id]
                self.num_free -= 1
            block.ref_cnt += 1

    def free(self, blocks: list[KVBlock]) -> None:
        # Tail blocks first: the end of a sequence is evicted before its shared head.
        for block in reversed(blocks):
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.block_hash is None:
                    self._empty.append(block.block_id)
                else:
                    self._cached_free[block.block_id] = None
                self.num_free += 1

    def cache(self, blocks: list[KVBlock], hashes: list[int], start: int, end: int) -> None:
        """Index full blocks[start:end] by hashes[start:end]; a duplicate of an indexed block stays out."""
        index = self._index
        for i in range(start, end):
            block, h = blocks[i], hashes[i]
            if block.block_hash is None and h not in index:
                index[h] = block.block_id
                block.block_hash = h

    def uncache(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            del self._index[block.block_hash]
            block.block_hash = None

    def num_evictable(self, blocks: list[KVBlock]) -> int:
        return sum(1 for b in blocks if b.ref_cnt == 0)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks if self.num_blocks else 0.0
