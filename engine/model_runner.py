"""Runs one scheduler step on the device: swaps, input tensors, forward (eager or CUDA graph), sampling."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from engine.config import EngineArgs, ModelConfig
from engine.core.config import SchedulerConfig
from engine.core.kv_cache_manager import KVCacheManager
from engine.core.scheduler_output import SchedulerOutput
from engine.loader import load_model
from engine.models import AttentionMetadata
from engine.sampler import Sampler

# Without a GPU to measure, the KV cache gets this much host memory unless told otherwise.
CPU_KV_CACHE_BYTES = 1 << 30
GiB = 1 << 30


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, ... and max_num_seqs itself: a decode batch runs in the smallest graph that holds it."""
    sizes = [1 << i for i in range(max_num_seqs.bit_length()) if 1 << i < max_num_seqs]
    return [*sizes, max_num_seqs]


def _lengths(lists: list[list[int]]) -> np.ndarray:
    return np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))


def _flatten(lists: list[list[int]], total: int) -> np.ndarray:
    return np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int32, count=total)


@dataclass(slots=True)
class Batch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_rows: list[int]  # indices into SchedulerOutput.requests of the requests that sample
    logits_index: torch.Tensor  # the token row whose logits each of them samples from


@dataclass(slots=True)
class GraphInputs:
    """The static tensors every captured decode graph reads and writes."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    hidden: torch.Tensor


class ModelRunner:
    def __init__(self, args: EngineArgs, cfg: ModelConfig, sched: SchedulerConfig) -> None:
        self.device, self.dtype = args.torch_device, args.torch_dtype(cfg)
        self.block_size, self.max_model_len = args.block_size, sched.max_model_len
        self.max_blocks_per_seq = _cdiv(self.max_model_len, self.block_size)
        torch.manual_seed(args.seed)
        max_position = max(cfg.max_position_embeddings, self.max_model_len)
        self.model = load_model(cfg, self.dtype, self.device, max_position, args.load_format, args.seed)
        self.sampler = Sampler(self.device)
        self.kv_shape = (cfg.num_layers, self.block_size, cfg.num_kv_heads, cfg.head_dim)
        self.block_bytes = 2 * int(np.prod(self.kv_shape)) * self.dtype.itemsize
        self.num_gpu_blocks = self._num_gpu_blocks(args, sched)
        swap = sched.preemption_mode == "swap"
        self.num_cpu_blocks = int(args.swap_space * GiB) // self.block_bytes if swap else 0
        # One extra block at the end: where padded rows of a CUDA-graph batch write and read.
        self.pad_block = self.num_gpu_blocks
        self.kv_cache = self._allocate(self.num_gpu_blocks + 1)
        self.cpu_cache = self._allocate(self.num_cpu_blocks, swap=True)
        self._bind_cache(self.kv_cache[0], self.kv_cache[1])
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if self.device.type == "cuda" and not args.enforce_eager:
            self._capture_graphs(sched.max_num_seqs)

    # ---- KV cache ----------------------------------------------------------------
    def _allocate(self, num_blocks: int, swap: bool = False) -> torch.Tensor:
        """[2 (k, v), layers, blocks, block_size, kv heads, head dim]: a swap is one indexed copy.

        The device cache starts zeroed (a masked kernel load of stale NaNs would still poison a sum); swap
        space is always written before it is read, and left unzeroed it costs no host memory until used.
        """
        layers, *block = self.kv_shape
        shape = (2, layers, num_blocks, *block)
        if swap:
            return torch.empty(shape, dtype=self.dtype, pin_memory=self.device.type == "cuda")
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def _bind_cache(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Point every layer's attention at its k/v cache; a 4-d k, v is shared by all layers."""
        for i, layer in enumerate(self.model.model.layers):
            layer.self_attn.k_cache = k if k.dim() == 4 else k[i]
            layer.self_attn.v_cache = v if v.dim() == 4 else v[i]

    def _num_gpu_blocks(self, args: EngineArgs, sched: SchedulerConfig) -> int:
        if args.num_gpu_blocks_override is not None:
            return args.num_gpu_blocks_override
        if args.kv_cache_memory_bytes is not None:
            return args.kv_cache_memory_bytes // self.block_bytes
        if self.device.type == "cpu":
            return min(CPU_KV_CACHE_BYTES // self.block_bytes, sched.max_num_seqs * self.max_blocks_per_seq)
        free, total = torch.cuda.mem_get_info()
        peak = self._profile_run(sched)
        non_torch = total - free - torch.cuda.memory_reserved()  # CUDA context, other processes
        budget = int(total * args.gpu_memory_utilization) - peak - non_torch
        if budget < self.block_bytes:
            raise ValueError(
                f"no GPU memory left for the KV cache: weights and activations take {peak / GiB:.1f} GiB "
                f"of {total / GiB:.1f} GiB at gpu_memory_utilization={args.gpu_memory_utilization}; "
                "raise it, or lower max_num_batched_tokens / max_num_seqs")
        return budget // self.block_bytes

    @torch.inference_mode()
    def _profile_run(self, sched: SchedulerConfig) -> int:
        """Peak memory of the largest step (full token budget, most sequences), one layer's cache shared."""
        tokens = sched.max_num_batched_tokens
        seqs = max(min(sched.max_num_seqs, tokens), _cdiv(tokens, self.max_model_len))
        lens = [tokens // seqs + (i < tokens % seqs) for i in range(seqs)]
        first = list(itertools.accumulate((_cdiv(n, self.block_size) for n in lens), initial=0))
        _, *block = self.kv_shape
        scratch = torch.zeros(first[-1], *block, dtype=self.dtype, device=self.device)
        self._bind_cache(scratch, scratch)
        torch.cuda.reset_peak_memory_stats()
        tables = [list(range(first[i], first[i + 1])) for i in range(seqs)]
        batch = self._make_batch([[0] * n for n in lens], [0] * seqs, tables, list(range(seqs)))
        hidden = self.model(batch.input_ids, batch.positions, batch.meta)
        self.model.compute_logits(hidden[batch.logits_index]).sort(dim=-1)  # as the top-p sampler does
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del scratch, hidden
        torch.cuda.empty_cache()
        return peak

    def _swap(self, out: SchedulerOutput) -> None:
        if out.swap_out:
            gpu, cpu = (list(x) for x in zip(*out.swap_out))
            self.cpu_cache[:, :, cpu] = self.kv_cache[:, :, gpu].cpu()
        if out.swap_in:
            cpu, gpu = (list(x) for x in zip(*out.swap_in))
            self.kv_cache[:, :, gpu] = self.cpu_cache[:, :, cpu].to(self.device, non_blocking=True)

    # ---- one step -----------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, kv: KVCacheManager) -> list[int]:
        """Swap, run the step's forward and sample; the token of `out.requests[i]` is at i (-1: none)."""
        self._swap(out)
        sampled = [-1] * len(out.requests)
        if out.requests:
            batch = self._prepare(out, kv)
            hidden = self._forward(batch)
            if batch.sample_rows:
                logits = self.model.compute_logits(hidden[batch.logits_index])
                tokens = self.sampler(logits, [out.requests[i] for i in batch.sample_rows]).tolist()
                for i, tok in zip(batch.sample_rows, tokens):
                    sampled[i] = tok
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # the step's measured duration covers the GPU work
        return sampled

    def _prepare(self, out: SchedulerOutput, kv: KVCacheManager) -> Batch:
        token_ids, starts, tables, rows = [], [], [], []
        for i, (req, n) in enumerate(zip(out.requests, out.num_scheduled_tokens)):
            start = req.num_computed_tokens
            token_ids.append(req.all_token_ids[start:start + n])
            starts.append(start)
            tables.append(kv.block_ids(req.request_id))
            if start + n >= req.num_tokens:
                rows.append(i)
        return self._make_batch(token_ids, starts, tables, rows)

    def _make_batch(self, token_ids: list[list[int]], starts: list[int], tables: list[list[int]],
                    rows: list[int]) -> Batch:
        """Tensors for sequences whose new tokens `token_ids[i]` follow `starts[i]` tokens already cached."""
        # Vectorized over tokens: a numpy call per sequence would cost milliseconds a step at batch 256.
        bs = self.block_size
        lens = _lengths(token_ids)
        qsl = np.concatenate(([0], np.cumsum(lens)))
        seq_index = np.repeat(np.arange(len(lens)), lens)
        starts = np.asarray(starts, dtype=np.int64)
        positions = np.arange(qsl[-1]) - qsl[seq_index] + starts[seq_index]
        widths = _lengths(tables)
        block_tables = np.zeros((len(tables), widths.max()), dtype=np.int32)
        table_index = np.repeat(np.arange(len(tables)), widths)
        column = np.arange(widths.sum()) - np.repeat(np.cumsum(widths) - widths, widths)
        block_tables[table_index, column] = _flatten(tables, widths.sum())
        slots = block_tables[seq_index, positions // bs].astype(np.int64) * bs + positions % bs
        seq_lens = starts + lens
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(slots).to(dev), block_tables=torch.from_numpy(block_tables).to(dev),
            seq_lens=torch.from_numpy(seq_lens.astype(np.int32)).to(dev),
            query_start_loc=torch.from_numpy(qsl.astype(np.int32)).to(dev),
            max_query_len=int(lens.max()), max_seq_len=int(seq_lens.max()))
        return Batch(
            input_ids=torch.from_numpy(_flatten(token_ids, qsl[-1]).astype(np.int64)).to(dev),
            positions=torch.from_numpy(positions).to(dev), meta=meta, sample_rows=rows,
            logits_index=torch.from_numpy(qsl[1:][rows] - 1).to(dev))

    def _forward(self, batch: Batch) -> torch.Tensor:
        n = batch.input_ids.shape[0]
        if batch.meta.max_query_len == 1 and self.graphs and n <= max(self.graphs):
            return self._replay(batch)
        return self.model(batch.input_ids, batch.positions, batch.meta)

    # ---- CUDA graphs for decode steps ----------------------------------------------
    def _capture_graphs(self, max_num_seqs: int) -> None:
        sizes = graph_batch_sizes(max_num_seqs)
        m, dev = sizes[-1], self.device
        self.graph_inputs = g = GraphInputs(
            input_ids=torch.zeros(m, dtype=torch.long, device=dev),
            positions=torch.zeros(m, dtype=torch.long, device=dev),
            slot_mapping=torch.full((m,), self.pad_block * self.block_size, dtype=torch.long, device=dev),
            block_tables=torch.full((m, self.max_blocks_per_seq), self.pad_block, dtype=torch.int32,
                                    device=dev),
            seq_lens=torch.ones(m, dtype=torch.int32, device=dev),
            query_start_loc=torch.arange(m + 1, dtype=torch.int32, device=dev),
            hidden=torch.zeros(m, self.model.config.hidden_size, dtype=self.dtype, device=dev))
        pool = None
        with torch.inference_mode():
            for size in reversed(sizes):  # largest first, so the smaller graphs fit in its memory pool
                meta = AttentionMetadata(g.slot_mapping[:size], g.block_tables[:size], g.seq_lens[:size],
                                         g.query_start_loc[:size + 1], 1, self.max_model_len)
                g.hidden[:size] = self.model(g.input_ids[:size], g.positions[:size], meta)  # compile outside
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool):
                    g.hidden[:size] = self.model(g.input_ids[:size], g.positions[:size], meta)
                pool = graph.pool()
                self.graphs[size] = graph
        torch.cuda.synchronize()

    def _replay(self, batch: Batch) -> torch.Tensor:
        n, g, meta = batch.input_ids.shape[0], self.graph_inputs, batch.meta
        size = min(s for s in self.graphs if s >= n)
        g.input_ids[:n] = batch.input_ids
        g.positions[:n] = batch.positions
        g.slot_mapping[:n] = meta.slot_mapping
        g.slot_mapping[n:size] = self.pad_block * self.block_size
        g.seq_lens[:n] = meta.seq_lens
        g.seq_lens[n:size] = 1
        g.block_tables[:n, :meta.block_tables.shape[1]] = meta.block_tables
        g.block_tables[n:size, 0] = self.pad_block
        self.graphs[size].replay()
        return g.hidden[:n]
