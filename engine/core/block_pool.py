"""KV blocks, their reference counts, the prefix index and the free queue."""

from __future__ import annotations

from servebench.engine.core.eviction import make_free_queue


class BlockPool:
    """Owns every GPU KV block; a block is its id, its state lives in per-block lists.

    A free block that still holds a hash stays in the prefix index, reusable by a
    later request, until it is evicted. Free blocks without a hash are handed out
    first, so cached content lives as long as possible; among cached free blocks
    `eviction_policy` picks which goes first (lru, as vLLM; lfu; cost). Lists
    indexed by block id, rather than one object per block, keep the per-block
    work of allocating, caching and freeing to a few list operations.
    """

    def __init__(self, num_blocks: int, eviction_policy: str = "lru") -> None:
        self.num_blocks = num_blocks
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        # Scores of the lfu and cost free queues (engine.core.eviction), which reset them on eviction:
        self.hits = [0] * num_blocks  # prefix-cache hits on the block's current content
        self.value = [0] * num_blocks  # recompute it saves
        self._empty: list[int] = list(range(num_blocks - 1, -1, -1))
        self._cached_free = make_free_queue(eviction_policy, self.hits, self.value)
        self._index: dict[int, int] = {}  # block hash -> block id
        self.num_free = num_blocks

    def lookup(self, block_hash: int) -> int | None:
        """The block holding content with this chain hash, or None; the caller `touch`es the blocks it
        keeps."""
        return self._index.get(block_hash)

    def allocate(self, n: int) -> list[int]:
        """`n` blocks with one reference each: empty blocks first, then cached free ones evicted (their
        content leaves the prefix index). The caller checks `num_free` first; asking for more is a bug."""
        if n > self.num_free:
            raise RuntimeError(f"asked for {n} blocks with {self.num_free} free")
        self.num_free -= n
        empty = self._empty
        if n <= len(empty):
            out = empty[-1 : -n - 1 : -1]  # popped from the end, as a stack
            del empty[-n:]
        else:
            out = empty[::-1]
            empty.clear()
            self._evict(n - len(out), out)
        ref = self.ref_cnt
        for b in out:
            ref[b] = 1
        return out

    def _evict(self, n: int, out: list[int]) -> None:
        """Append `n` cached free blocks to `out`, dropping their content from the prefix index."""
        popitem, index, hashes = self._cached_free.popitem, self._index, self.block_hash
        for _ in range(n):
            b = popitem(last=False)[0]  # a scored queue also resets the block's hits and value
            del index[hashes[b]]
            hashes[b] = None
            out.append(b)

    def touch(self, blocks: list[int]) -> None:
        """Take a reference on cached blocks found by a prefix lookup."""
        ref, hits = self.ref_cnt, self.hits
        for b in blocks:
            if ref[b] == 0:
                del self._cached_free[b]
                self.num_free -= 1
            ref[b] += 1
            hits[b] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one reference on each of a request's blocks (its whole table, root first)."""
        cached_free = self._cached_free
        if cached_free.revalue is not None:
            cached_free.revalue(blocks)
        ref, hashes, empty = self.ref_cnt, self.block_hash, self._empty
        freed = 0
        # Tail blocks first: the end of a sequence is evicted before its shared head.
        for b in reversed(blocks):
            ref[b] -= 1
            if ref[b] == 0:
                if hashes[b] is None:
                    empty.append(b)
                else:
                    cached_free[b] = None
                freed += 1
        self.num_free += freed

    def cache(self, blocks: list[int], hashes: list[int], start: int, end: int) -> None:
        """Index full blocks[start:end] by hashes[start:end]; a duplicate of an indexed block stays out."""
        index, block_hash = self._index, self.block_hash
        for i in range(start, end):
            b, h = blocks[i], hashes[i]
            if block_hash[b] is None and h not in index:
                index[h] = b
                block_hash[b] = h

    def uncache(self, b: int) -> None:
        """Drop block `b` from the prefix index: its content will not be what the hash says (its tokens
        were never computed)."""
        h = self.block_hash[b]
        if h is not None:
            del self._index[h]
            self.block_hash[b] = None
            self.hits[b] = self.value[b] = 0

    def num_evictable(self, blocks: list[int]) -> int:
        """How many of `blocks` (a prefix hit) are free and cached: counted in `num_free` although taking them
        as a hit removes them from it."""
        ref = self.ref_cnt
        return sum(1 for b in blocks if ref[b] == 0)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by a request (cached free blocks count as free)."""
        return 1.0 - self.num_free / self.num_blocks if self.num_blocks else 0.0
