"""The paged KV cache's tensors: how many blocks fit (the device's memory less the largest step's peak), the
device cache and the host swap space, bound to the model's attention layers."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import torch
from servebench.engine.config import ModelConfig
from servebench.engine.core.config import CacheConfig, SchedulerConfig
from servebench.engine.host_to_device import to_device
from servebench.engine.input_batch import HostBatch, host_batch
from servebench.engine.models import LlamaForCausalLM

# Without a GPU to measure, the KV cache gets this much host memory unless told otherwise.
CPU_KV_CACHE_BYTES = 1 << 30
GiB = 1 << 30


class KVCache:
    """The blocks the scheduler hands out, as [2 (k, v), layers, blocks, block_size, kv heads, head dim]
    tensors (a swap is one indexed copy): on the device, with one block more at the end (`pad_block`), and in
    host swap space."""

    def __init__(self, model: LlamaForCausalLM, model_config: ModelConfig, dtype: torch.dtype,
                 device: torch.device, sched: SchedulerConfig, cache: CacheConfig,
                 kv_cache_memory_bytes: int | None, forward: Callable[[HostBatch], torch.Tensor]) -> None:
        """Blocks of `dtype` elements (fp8 with kv_cache_dtype=fp8), as many as
        `cache.num_gpu_blocks_override`, else `kv_cache_memory_bytes`, else the device memory
        `cache.gpu_memory_utilization` leaves once `forward` (eager) ran the largest step `sched` allows."""
        self.dtype, self.device, self.block_size = dtype, device, cache.block_size
        self.kv_shape = (model_config.num_layers, self.block_size, model_config.num_kv_heads,
                         model_config.head_dim)
        self.block_bytes = 2 * int(np.prod(self.kv_shape)) * dtype.itemsize
        self.peak_bytes: int | None = None  # device memory the largest step took, where it was measured
        blocks = self._num_gpu_blocks(model, sched, cache, kv_cache_memory_bytes, forward)
        # Tensor-parallel ranks hold the same blocks (each its KV heads of them): as many as the fullest has.
        self.num_gpu_blocks = blocks if model.tp is None else model.tp.min(blocks, device)
        swap = sched.preemption_mode != "recompute"  # swap, or cost (which may swap)
        self.num_cpu_blocks = int(cache.swap_space * GiB) // self.block_bytes if swap else 0
        # One extra block at the end: where padded rows of a CUDA-graph batch write and read.
        self.pad_block = self.num_gpu_blocks
        self.gpu = self._allocate(self.num_gpu_blocks + 1)
        self.cpu = self._allocate(self.num_cpu_blocks, swap=True)
        _bind(model, self.gpu[0], self.gpu[1])

    def _allocate(self, num_blocks: int, swap: bool = False) -> torch.Tensor:
        """The device cache starts zeroed (a masked kernel load of stale NaNs would still poison a sum); swap
        space is always written before it is read, and left unzeroed it costs no host memory until used.
        Swap space is block-major ([blocks, 2, layers, ...]): a block is one contiguous stretch of pinned
        memory, so that it crosses the bus in one asynchronous copy."""
        layers, *block = self.kv_shape
        if swap:
            return torch.empty((num_blocks, 2, layers, *block), dtype=self.dtype,
                               pin_memory=self.device.type == "cuda")
        return torch.zeros((2, layers, num_blocks, *block), dtype=self.dtype, device=self.device)

    def swap(self, swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]]) -> None:
        """Queue the copies of a step's swapped-out (device, host) blocks to the host and of its swapped-in
        (host, device) blocks back, on the stream the step's forward runs on (which therefore cannot
        overwrite or read them first). The blocks are gathered (or scattered) on the device, and each run of
        consecutive host blocks is one asynchronous copy: the host never waits for the bus."""
        if swap_out:
            gpu, cpu = zip(*swap_out)
            blocks = self.gpu[:, :, self._device_index(gpu)].movedim(2, 0).contiguous()
            for i, start, n in consecutive_runs(cpu):
                self.cpu[start:start + n].copy_(blocks[i:i + n], non_blocking=True)
        if swap_in:
            cpu, gpu = zip(*swap_in)
            blocks = torch.empty((len(cpu), *self.cpu.shape[1:]), dtype=self.dtype, device=self.device)
            for i, start, n in consecutive_runs(cpu):
                blocks[i:i + n].copy_(self.cpu[start:start + n], non_blocking=True)
            self.gpu[:, :, self._device_index(gpu)] = blocks.movedim(0, 2)

    def _device_index(self, ids: tuple[int, ...]) -> torch.Tensor:
        """Block ids on the device (a Python list as an index would be copied with a wait for the device)."""
        return to_device(list(ids), self.device, torch.long)

    def _num_gpu_blocks(self, model: LlamaForCausalLM, sched: SchedulerConfig, cache: CacheConfig,
                        kv_cache_memory_bytes: int | None, forward: Callable[[HostBatch], torch.Tensor]
                        ) -> int:
        if cache.num_gpu_blocks_override is not None:
            return cache.num_gpu_blocks_override
        if kv_cache_memory_bytes is not None:
            return kv_cache_memory_bytes // self.block_bytes
        if self.device.type == "cpu":
            max_blocks_per_seq = -(-sched.max_model_len // self.block_size)
            return min(CPU_KV_CACHE_BYTES // self.block_bytes, sched.max_num_seqs * max_blocks_per_seq)
        self.peak_bytes = peak = self._profile_run(model, sched, forward)
        # Both at one moment (after the profile run gave its scratch back): a collection between the two
        # would count the memory it freed as another process's.
        free, total = torch.cuda.mem_get_info()
        non_torch = total - free - torch.cuda.memory_reserved()  # CUDA context, other processes
        budget = int(total * cache.gpu_memory_utilization) - peak - non_torch
        if budget < self.block_bytes:
            raise ValueError(
                f"no GPU memory left for the KV cache: weights and activations take {peak / GiB:.1f} GiB "
                f"of {total / GiB:.1f} GiB at gpu_memory_utilization={cache.gpu_memory_utilization}; "
                "raise it, or lower max_num_batched_tokens / max_num_seqs")
        return budget // self.block_bytes

    @torch.inference_mode()
    def _profile_run(self, model: LlamaForCausalLM, sched: SchedulerConfig,
                     forward: Callable[[HostBatch], torch.Tensor]) -> int:
        """Peak memory of the largest step (full token budget, most sequences), one layer's cache shared."""
        bs = self.block_size
        tokens = sched.max_num_batched_tokens
        seqs = max(min(sched.max_num_seqs, tokens), -(-tokens // sched.max_model_len))
        lens = [tokens // seqs + (i < tokens % seqs) for i in range(seqs)]
        first = list(itertools.accumulate((-(-n // bs) for n in lens), initial=0))
        _, *block = self.kv_shape
        scratch = torch.zeros(first[-1], *block, dtype=self.dtype, device=self.device)
        _bind(model, scratch, scratch)
        torch.cuda.reset_peak_memory_stats()
        tables = [list(range(first[i], first[i + 1])) for i in range(seqs)]
        batch = host_batch([[0] * n for n in lens], [0] * seqs, tables, list(range(seqs)), bs)
        forward(batch).sort(dim=-1)  # as the top-p sampler does
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del scratch
        torch.cuda.empty_cache()
        return peak


def consecutive_runs(ids: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(position in `ids`, first id, length) of each run of consecutive ids."""
    runs: list[tuple[int, int, int]] = []
    for i, b in enumerate(ids):
        if runs and runs[-1][1] + runs[-1][2] == b:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((i, b, 1))
    return runs


def _bind(model: LlamaForCausalLM, k: torch.Tensor, v: torch.Tensor) -> None:
    """Point every layer's attention at its k/v cache; a 4-d k, v is shared by all layers."""
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.k_cache = k if k.dim() == 4 else k[i]
        layer.self_attn.v_cache = v if v.dim() == 4 else v[i]
