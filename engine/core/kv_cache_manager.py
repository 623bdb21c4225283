"""Per-request KV block tables on top of the block pool, plus CPU swap space."""

from __future__ import annotations

from servebench.engine.core.block_pool import BlockPool
from servebench.engine.core.request import PENDING, Request


def block_hashes(req: Request, block_size: int, num_full_blocks: int) -> list[int]:
    """Extend `req.block_hashes` to `num_full_blocks` chain hashes and return it.

    hash(parent hash, the block's token ids[, hashes of the images it overlaps]); the
    chain starts from the request's LoRA adapter and cache salt. Python's hash of
    int and str tuples is deterministic across processes when PYTHONHASHSEED is
    fixed; within one process (a run) it always is.
    """
    hashes = req.block_hashes
    start = len(hashes)
    if start >= num_full_blocks:
        return hashes
    tokens = req.all_token_ids
    parent = hashes[-1] if hashes else hash((req.lora_id or 0, req.cache_salt))
    if req.mm_positions:
        for i in range(start, num_full_blocks):
            lo = i * block_size
            key = (parent, tuple(tokens[lo : lo + block_size]))
            images = _images_in(req, lo, lo + block_size)
            parent = hash((*key, images) if images else key)  # a block without images hashes as text
            hashes.append(parent)
        return hashes
    append = hashes.append
    for lo in range(start * block_size, num_full_blocks * block_size, block_size):
        parent = hash((parent, tuple(tokens[lo : lo + block_size])))
        append(parent)
    return hashes


def _images_in(req: Request, lo: int, hi: int) -> tuple[str, ...]:
    """Hashes of the images whose placeholder tokens overlap [lo, hi)."""
    return tuple(h for h, (o, n) in zip(req.mm_hashes, req.mm_positions) if o < hi and o + n > lo)


class KVCacheManager:
    """Block tables of requests on top of the block pool, plus CPU swap space.

    A request's GPU block table is `req.block_table` (block ids, read by the executor too), of
    which the first `req.num_cached_blocks` are indexed.
    """

    def __init__(
        self,
        num_gpu_blocks: int,
        block_size: int,
        enable_caching: bool = True,
        num_cpu_blocks: int = 0,
        eviction_policy: str = "lru",
    ) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_gpu_blocks, eviction_policy)
        self.num_gpu_blocks = num_gpu_blocks
        self._cpu_free: list[int] = list(range(num_cpu_blocks - 1, -1, -1))
        self._swapped: dict[str, list[int]] = {}
        self.prefix_queries = 0  # tokens looked up at admission
        self.prefix_hits = 0  # of which found in the cache

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_free_cpu_blocks(self) -> int:
        return len(self._cpu_free)

    def get_computed_blocks(self, req: Request) -> list[int]:
        """Longest cached prefix of full blocks; never the last token, which must be computed."""
        if not self.enable_caching:
            return []
        max_blocks = (len(req.all_token_ids) - 1) // self.block_size
        lookup = self.pool.lookup
        hits = []
        for h in block_hashes(req, self.block_size, max_blocks):
            b = lookup(h)
            if b is None:
                break
            hits.append(b)
        return hits

    def allocate_slots(
        self, req: Request, num_new_tokens: int, computed_blocks: list[int] | None = None
    ) -> bool:
        """Make room for `num_new_tokens` more tokens, or change nothing and return False.

        `computed_blocks` (admission only) are prefix hits that become the head of the
        request's block table; `req.num_computed_tokens` must not include them yet.
        """
        if computed_blocks is not None:
            return self._admit(req, num_new_tokens, computed_blocks)
        bs = self.block_size
        table = req.block_table
        total = req.num_computed_tokens + num_new_tokens
        need = -(-total // bs) - len(table)
        if need > 0:
            if need > self.pool.num_free:
                return False
            table += self.pool.allocate(need)
            req.num_kv_slots = len(table) * bs
        if self.enable_caching and total // bs > req.num_cached_blocks:
            self._cache_full_blocks(req, total // bs)
        return True

    def _admit(self, req: Request, num_new_tokens: int, hits: list[int]) -> bool:
        bs = self.block_size
        pool = self.pool
        total = len(hits) * bs + num_new_tokens
        need = -(-total // bs) - len(hits)
        if need > pool.num_free - pool.num_evictable(hits):
            return False
        pool.touch(hits)
        table = hits + pool.allocate(need)
        req.block_table = table
        req.num_kv_slots = len(table) * bs
        req.num_cached_blocks = len(hits)
        self.prefix_queries += len(req.all_token_ids)
        self.prefix_hits += len(hits) * bs
        if self.enable_caching and total // bs > len(hits):
            self._cache_full_blocks(req, total // bs)
        return True

    def _cache_full_blocks(self, req: Request, num_full: int) -> None:
        tokens = req.all_token_ids
        if tokens[-1] == PENDING:  # async scheduling: a block is indexed once all its tokens are known
            num_full = min(num_full, (len(tokens) - 1) // self.block_size)
            if num_full <= req.num_cached_blocks:
                return
        hashes = block_hashes(req, self.block_size, num_full)
        self.pool.cache(req.block_table, hashes, req.num_cached_blocks, num_full)
        req.num_cached_blocks = num_full

    def free(self, req: Request) -> None:
        """Release everything `req` holds, on the GPU and in swap space; its indexed blocks whose tokens were
        computed stay in the prefix cache until evicted."""
        table = self._release_gpu_blocks(req)
        if table:
            self.pool.free(table)
        cpu = self._swapped.pop(req.request_id, None)
        if cpu:
            self._cpu_free.extend(cpu)

    def _release_gpu_blocks(self, req: Request) -> list[int]:
        """Detach the request's GPU blocks, unindexing those whose tokens were never computed.

        Blocks are indexed when slots are allocated, before the forward pass fills
        them; a request preempted after it was scheduled in the same step leaves
        such blocks behind, and no later request may hit on them.
        """
        table = req.block_table
        for b in table[req.num_computed_tokens // self.block_size : req.num_cached_blocks]:
            self.pool.uncache(b)
        req.block_table = []
        req.num_kv_slots = req.num_cached_blocks = 0
        return table

    def swap_out(self, req: Request) -> list[tuple[int, int]] | None:
        """Move the request's KV to CPU swap space: (gpu block, cpu block) copies, or None if it is full.

        The GPU blocks are freed at once; the executor copies them out before the
        step's forward pass can overwrite them.
        """
        if len(req.block_table) > len(self._cpu_free):
            return None
        table = self._release_gpu_blocks(req)
        cpu = [self._cpu_free.pop() for _ in table]
        self._swapped[req.request_id] = cpu
        self.pool.free(table)
        return list(zip(table, cpu))

    def swap_in(self, req: Request, num_new_tokens: int) -> list[tuple[int, int]] | None:
        """Bring a swapped request back and make room for its next tokens: (cpu, gpu) copies, or None."""
        cpu = self._swapped[req.request_id]
        bs = self.block_size
        total = req.num_computed_tokens + num_new_tokens
        need = max(-(-total // bs), len(cpu))
        if need > self.pool.num_free:
            return None
        table = self.pool.allocate(need)
        del self._swapped[req.request_id]
        self._cpu_free.extend(cpu)
        req.block_table = table
        req.num_kv_slots = len(table) * bs
        req.num_cached_blocks = 0
        if self.enable_caching and total // bs:
            self._cache_full_blocks(req, total // bs)
        return list(zip(cpu, table))
