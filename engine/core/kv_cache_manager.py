"""Per-request KV block tables on top of the block pool, plus CPU swap space."""

from __future__ import annotations

from engine.core.block_pool import BlockPool, KVBlock
from engine.core.request import Request


def block_hashes(req: Request, block_size: int, num_full_blocks: int) -> list[int]:
    """Extend `req.block_hashes` to `num_full_blocks` chain hashes and return it.

    hash(parent hash, the block's token ids); the chain starts from the request's
    cache salt, so adapter ids and image hashes separate otherwise equal prefixes.
    Python's hash of int tuples is deterministic across processes.
    """
    hashes = req.block_hashes
    tokens = req.all_token_ids
    parent = hashes[-1] if hashes else hash(req.cache_salt)
    for i in range(len(hashes), num_full_blocks):
        parent = hash((parent, tuple(tokens[i * block_size : (i + 1) * block_size])))
        hashes.append(parent)
    return hashes


class KVCacheManager:
    def __init__(
        self, num_gpu_blocks: int, block_size: int, enable_caching: bool = True, num_cpu_blocks: int = 0
    ) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_gpu_blocks, enable_caching)
        self.num_gpu_blocks = num_gpu_blocks
        self.num_cpu_blocks = num_cpu_blocks
        self._blocks: dict[str, list[KVBlock]] = {}
        self._block_ids: dict[str, list[int]] = {}  # the same tables as ids, for the executor
        self._num_cached: dict[str, int] = {}  # leading blocks of the request already indexed
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

    def block_ids(self, request_id: str) -> list[int]:
        return self._block_ids.get(request_id, [])

    def get_computed_blocks(self, req: Request) -> list[KVBlock]:
        """Longest cached prefix of full blocks; never the last token, which must be computed."""
        if not self.enable_caching:
            return []
        max_blocks = (req.num_tokens - 1) // self.block_size
        hits = []
        for h in block_hashes(req, self.block_size, max_blocks):
            block = self.pool.lookup(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def allocate_slots(
        self, req: Request, num_new_tokens: int, computed_blocks: list[KVBlock] | None = None
    ) -> bool:
        """Make room for `num_new_tokens` more tokens, or change nothing and return False.

        `computed_blocks` (admission only) are prefix hits that become the head of the
        request's block table; `req.num_computed_tokens` must not include them yet.
        """
        rid = req.request_id
        bs = self.block_size
        if computed_blocks is None:
            blocks = self._blocks[rid]
            total = req.num_computed_tokens + num_new_tokens
            need = -(-total // bs) - len(blocks)
            if need > 0:
                if need > self.pool.num_free:
                    return False
                new = self.pool.allocate(need)
                blocks.extend(new)
                self._block_ids[rid].extend([b.block_id for b in new])
                req.num_kv_slots = len(blocks) * bs
        else:
            total = len(computed_blocks) * bs + num_new_tokens
            need = -(-total // bs) - len(computed_blocks)
            if need > self.pool.num_free - self.pool.num_evictable(computed_blocks):
                return False
            self.pool.touch(computed_blocks)
            blocks = computed_blocks + self.pool.allocate(need)
            self._blocks[rid] = blocks
            self._block_ids[rid] = [b.block_id for b in blocks]
            req.num_kv_slots = len(blocks) * bs
            self._num_cached[rid] = len(computed_blocks)
            self.prefix_queries += req.num_tokens
            self.prefix_hits += len(computed_blocks) * bs
        if self.enable_caching and total // bs > self._num_cached[rid]:
            self._cache_full_blocks(req, blocks, total // bs)
        return True

    def _cache_full_blocks(self, req: Request, blocks: list[KVBlock], num_full: int) -> None:
        hashes = block_hashes(req, self.block_size, num_full)
        self.pool.cache(blocks, hashes, self._num_cached[req.request_id], num_full)
        self._num_cached[req.request_id] = num_full

    def free(self, req: Request) -> None:
        blocks = self._release_gpu_blocks(req)
        if blocks:
            self.pool.free(blocks)
        cpu = self._swapped.pop(req.request_id, None)
        if cpu:
            self._cpu_free.extend(cpu)

    def _release_gpu_blocks(self, req: Request) -> list[KVBlock] | None:
        """Detach the request's GPU blocks, unindexing those whose tokens were never computed.

        Blocks are indexed when slots are allocated, before the forward pass fills
        them; a request preempted after it was scheduled in the same step leaves
        such blocks behind, and no later request may hit on them.
        """
        req.num_kv_slots = 0
        blocks = self._blocks.pop(req.request_id, None)
        self._block_ids.pop(req.request_id, None)
        num_cached = self._num_cached.pop(req.request_id, 0)
        if blocks:
            for block in blocks[req.num_computed_tokens // self.block_size : num_cached]:
                self.pool.uncache(block)
        return blocks

    def swap_out(self, req: Request) -> list[tuple[int, int]] | None:
        """Move the request's KV to CPU swap space: (gpu block, cpu block) copies, or None if it is full.

        The GPU blocks are freed at once; the executor copies them out before the
        step's forward pass can overwrite them.
        """
        if len(self._blocks[req.request_id]) > len(self._cpu_free):
            return None
        blocks = self._release_gpu_blocks(req)
        cpu = [self._cpu_free.pop() for _ in blocks]
        self._swapped[req.request_id] = cpu
        self.pool.free(blocks)
        return [(b.block_id, c) for b, c in zip(blocks, cpu)]

    def swap_in(self, req: Request, num_new_tokens: int) -> list[tuple[int, int]] | None:
        """Bring a swapped request back and make room for its next tokens: (cpu, gpu) copies, or None."""
        cpu = self._swapped[req.request_id]
        total = req.num_computed_tokens + num_new_tokens
        need = max(-(-total // self.block_size), len(cpu))
        if need > self.pool.num_free:
            return None
        blocks = self.pool.allocate(need)
        del self._swapped[req.request_id]
        self._cpu_free.extend(cpu)
        self._blocks[req.request_id] = blocks
        self._block_ids[req.request_id] = [b.block_id for b in blocks]
        req.num_kv_slots = len(blocks) * self.block_size
        self._num_cached[req.request_id] = 0
        if self.enable_caching and total // self.block_size:
            self._cache_full_blocks(req, blocks, total // self.block_size)
        return [(c, b.block_id) for c, b in zip(cpu, blocks)]
