"""Runs one scheduler step on the device: swaps, input tensors, forward (eager or CUDA graph), sampling."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from servebench.engine.config import EngineArgs, ModelConfig
from servebench.engine.core.config import SchedulerConfig
from servebench.engine.core.graphs import graph_batch_sizes, padded_graph_batch
from servebench.engine.core.request import PENDING, Request
from servebench.engine.core.scheduler_output import SchedulerOutput
from servebench.engine.loader import load_model
from servebench.engine.models import AttentionMetadata
from servebench.engine.outputs import PositionLogprobs
from servebench.engine.sampler import Logprobs, Sampler, SamplerOutput

# Without a GPU to measure, the KV cache gets this much host memory unless told otherwise.
CPU_KV_CACHE_BYTES = 1 << 30
GiB = 1 << 30


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _lengths(lists: list[list[int]]) -> np.ndarray:
    return np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))


def _flatten(lists: list[list[int]], total: int) -> np.ndarray:
    return np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int32, count=total)


@dataclass(slots=True)
class HostBatch:
    """A step's model inputs as host arrays, before they move to the device."""

    input_ids: np.ndarray  # int64 [tokens]
    positions: np.ndarray  # int64 [tokens]
    slot_mapping: np.ndarray  # int64 [tokens]
    block_tables: np.ndarray  # int32 [seqs, widest table]
    seq_lens: np.ndarray  # int32 [seqs]
    query_start_loc: np.ndarray  # int32 [seqs + 1]
    max_query_len: int
    sample_rows: list[int]  # indices into SchedulerOutput.requests of the requests that sample
    logits_index: np.ndarray  # the token row whose logits each of them samples from
    # Async scheduling: token rows whose id is PENDING, and the rows of the previous step's sampled tokens
    # that hold them.
    pending_rows: np.ndarray | None = None
    pending_from: np.ndarray | None = None
    # prompt_logprobs: (request index, first position of its chunk, token rows whose logits score the prompt)
    prompt_rows: list[tuple[int, int, np.ndarray]] = field(default_factory=list)


@dataclass(slots=True)
class SampledTokens:
    """A step's sampled tokens (and logprobs) on their way to the host; `tolist()` waits for them and the
    step's GPU work."""

    host: torch.Tensor | None  # [rows] int64, pinned where the device is a GPU
    rows: list[int]  # indices into SchedulerOutput.requests of the requests that sampled
    num_requests: int
    done: torch.cuda.Event | None
    sampled_logprobs: Logprobs | None  # of the sampled tokens, for the requests that asked
    prompt: list[tuple[int, int, Logprobs]]  # (request index, first position of its chunk, its scores)
    failures: dict[int, Exception]  # request index -> why its part of the step failed (the rest went on)
    began: torch.cuda.Event | None = None  # recorded before the forward: `device_s` runs from it to `done`

    @classmethod
    def start(cls, sampled: SamplerOutput | None, rows: list[int], num_requests: int, device: torch.device,
              prompt: list[tuple[int, int, Logprobs]], failures: dict[int, Exception],
              began: torch.cuda.Event | None = None) -> SampledTokens:
        tokens, logprobs = (None, None) if sampled is None else (sampled.tokens, sampled.logprobs)
        if device.type != "cuda":
            return cls(tokens, rows, num_requests, None, logprobs, prompt, failures)
        host = None if tokens is None else _to_host(tokens)
        logprobs = None if logprobs is None else logprobs.map(_to_host)
        prompt = [(i, start, lp.map(_to_host)) for i, start, lp in prompt]
        done = torch.cuda.Event(enable_timing=began is not None)
        done.record()  # also when nothing sampled: the step's measured duration covers its GPU work
        return cls(host, rows, num_requests, done, logprobs, prompt, failures, began)

    def wait(self) -> None:
        if self.done is not None:
            self.done.synchronize()

    def tolist(self) -> list[int]:
        """The token of request i at i (-1: none)."""
        self.wait()
        sampled = [-1] * self.num_requests
        if self.host is not None:
            for i, tok in zip(self.rows, self.host.tolist()):
                sampled[i] = tok
        return sampled

    def logprobs(self, requests: list[Request]) -> dict[int, PositionLogprobs]:
        """Request index -> its sampled token's logprobs, for those of the step's `requests` that asked."""
        if self.sampled_logprobs is None:
            return {}
        index = [i for i in self.rows if requests[i].sampling_params.logprobs is not None]
        ks = [requests[i].sampling_params.logprobs for i in index]
        return dict(zip(index, self.sampled_logprobs.tolist(ks), strict=True))

    def prompt_logprobs(self, requests: list[Request]) -> list[tuple[int, int, list[PositionLogprobs]]]:
        """(request index, p, logprobs of its prompt tokens p + 1, p + 2, ...) for this step's chunks."""
        return [(i, start, lp.tolist([requests[i].sampling_params.prompt_logprobs] * len(lp.ranks)))
                for i, start, lp in self.prompt]

    @property
    def device_s(self) -> float:
        """Seconds the device spent on the step's forward and sampling, once `wait` returned (NaN without
        a CUDA device). Events time the stream: a step queued behind the previous one starts when it ends."""
        if self.began is None:
            return math.nan
        return self.began.elapsed_time(self.done) / 1e3


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """Start copying `t` to pinned host memory; it is there once the step's done event has passed."""
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)


class GraphInputs:
    """The static tensors every captured decode graph reads, as typed views into one byte buffer, so that a
    step's inputs reach the device in one copy from a pinned host twin with the same layout."""

    def __init__(self, buffer: torch.Tensor, max_seqs: int, max_blocks: int) -> None:
        self.buffer = buffer
        offset = 0

        def take(dtype: torch.dtype, *shape: int) -> torch.Tensor:
            nonlocal offset
            nbytes = int(np.prod(shape)) * dtype.itemsize
            view = buffer[offset:offset + nbytes].view(dtype).view(shape)
            offset += nbytes
            return view

        self.input_ids = take(torch.long, max_seqs)
        self.positions = take(torch.long, max_seqs)
        self.slot_mapping = take(torch.long, max_seqs)
        self.seq_lens = take(torch.int32, max_seqs)
        self.block_tables = take(torch.int32, max_seqs, max_blocks)
        # The block tables come last, so a batch of n copies bytes [0, end_of_row[n]).
        tables_at = offset - max_seqs * max_blocks * 4
        self.end_of_row = [tables_at + i * max_blocks * 4 for i in range(max_seqs + 1)]

    @staticmethod
    def nbytes(max_seqs: int, max_blocks: int) -> int:
        return max_seqs * (3 * 8 + 4 + 4 * max_blocks)


class ModelRunner:
    def __init__(self, args: EngineArgs, cfg: ModelConfig, sched: SchedulerConfig) -> None:
        self.device, self.dtype = args.torch_device, args.torch_dtype(cfg)
        self.block_size, self.max_model_len = args.block_size, sched.max_model_len
        self.max_blocks_per_seq = _cdiv(self.max_model_len, self.block_size)
        torch.manual_seed(args.seed)
        max_position = max(cfg.max_position_embeddings, self.max_model_len)
        self.model = load_model(cfg, self.dtype, self.device, max_position, args.load_format, args.seed,
                                args.quantization)
        self.sampler = Sampler(self.device)
        self.kv_shape = (cfg.num_layers, self.block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_dtype = args.kv_cache_torch_dtype(self.dtype)
        self.block_bytes = 2 * int(np.prod(self.kv_shape)) * self.kv_dtype.itemsize
        self.num_gpu_blocks = self._num_gpu_blocks(args, sched)
        swap = sched.preemption_mode != "recompute"  # swap, or cost (which may swap)
        self.num_cpu_blocks = int(args.swap_space * GiB) // self.block_bytes if swap else 0
        # One extra block at the end: where padded rows of a CUDA-graph batch write and read.
        self.pad_block = self.num_gpu_blocks
        self.kv_cache = self._allocate(self.num_gpu_blocks + 1)
        self.cpu_cache = self._allocate(self.num_cpu_blocks, swap=True)
        self._bind_cache(self.kv_cache[0], self.kv_cache[1])
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.graph_sizes: list[int] = []  # sorted keys of `graphs`
        self._turn = 0  # which pinned host twin of the graph inputs the next replay fills
        self._last_sampled: tuple[list[Request], list[int], torch.Tensor] | None = None
        if self.device.type == "cuda" and not args.enforce_eager:
            self._capture_graphs(sched.max_num_seqs)

    @property
    def weight_bytes(self) -> int:
        """Bytes of the model's parameters on the device, quantized as they are (a tied one counted once)."""
        return sum(p.nbytes for p in self.model.parameters())

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of the KV cache's usable blocks (not the padding block CUDA graphs write to)."""
        return self.num_gpu_blocks * self.block_bytes

    # ---- KV cache ----------------------------------------------------------------
    def _allocate(self, num_blocks: int, swap: bool = False) -> torch.Tensor:
        """[2 (k, v), layers, blocks, block_size, kv heads, head dim]: a swap is one indexed copy.

        The device cache starts zeroed (a masked kernel load of stale NaNs would still poison a sum); swap
        space is always written before it is read, and left unzeroed it costs no host memory until used.
        """
        layers, *block = self.kv_shape
        shape = (2, layers, num_blocks, *block)
        if swap:
            return torch.empty(shape, dtype=self.kv_dtype, pin_memory=self.device.type == "cuda")
        return torch.zeros(shape, dtype=self.kv_dtype, device=self.device)

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
        scratch = torch.zeros(first[-1], *block, dtype=self.kv_dtype, device=self.device)
        self._bind_cache(scratch, scratch)
        torch.cuda.reset_peak_memory_stats()
        tables = [list(range(first[i], first[i + 1])) for i in range(seqs)]
        batch = self._host_batch([[0] * n for n in lens], [0] * seqs, tables, list(range(seqs)))
        self._run_eager(batch).sort(dim=-1)  # as the top-p sampler does
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del scratch
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
    def execute(self, out: SchedulerOutput) -> SampledTokens:
        """Swap, run the step's forward and sample, and wait for the device (the step is done on return)."""
        result = self.launch(out)
        result.wait()
        out.device_s = result.device_s
        return result

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput) -> SampledTokens:
        """`execute` without waiting for the device: the host can schedule the next step meanwhile. Input
        tokens still PENDING are the previous launch's sampled tokens, gathered on the device."""
        self._swap(out)
        sampled, rows, prompt, failures, began = None, [], [], {}, None
        if out.requests:
            batch = self._prepare(out)
            rows = batch.sample_rows
            out.graph_batch = self._graph_batch(batch)
            if self.device.type == "cuda":
                began = torch.cuda.Event(enable_timing=True)
                began.record()
            logits = self._forward(batch, out.graph_batch)
            if rows:
                sampled = self.sampler(logits[:len(rows)], [out.requests[i] for i in rows])
                self._last_sampled = (out.requests, rows, sampled.tokens)
                failures = {rows[j]: e for j, e in sampled.failed.items()}
            prompt = self._prompt_logprobs(out, batch, logits[len(rows):], failures)
        return SampledTokens.start(sampled, rows, len(out.requests), self.device, prompt, failures, began)

    def _prompt_logprobs(self, out: SchedulerOutput, batch: HostBatch, logits: torch.Tensor,
                         failures: dict[int, Exception]) -> list[tuple[int, int, Logprobs]]:
        """Scores of the prompt tokens that this step's prefill chunks predict, for `prompt_logprobs`; a
        request whose scores cannot be computed (a long chunk's memory, say) goes to `failures` alone."""
        scored, at = [], 0
        for i, start, token_rows in batch.prompt_rows:
            req, m = out.requests[i], len(token_rows)
            targets = torch.tensor(req.all_token_ids[start + 1:start + 1 + m], device=self.device)
            try:
                scored.append((i, start, Logprobs.of(logits[at:at + m], targets,
                                                     req.sampling_params.prompt_logprobs)))
            except Exception as e:
                failures[i] = e
            at += m
        return scored

    def _prepare(self, out: SchedulerOutput) -> HostBatch:
        token_ids, starts, tables, rows, pending, scored = [], [], [], [], [], []
        for i, (req, n) in enumerate(zip(out.requests, out.num_scheduled_tokens)):
            start = req.num_computed_tokens
            tokens = req.all_token_ids
            token_ids.append(tokens[start:start + n])
            starts.append(start)
            tables.append(req.block_table)
            if start + n >= len(tokens):
                rows.append(i)
                if tokens[-1] == PENDING:
                    pending.append(i)
            # The chunk's rows up to the last prompt token but one predict the prompt's next tokens.
            end = min(start + n, req.num_prompt_tokens - 1)
            if req.sampling_params.prompt_logprobs is not None and end > start:
                scored.append((i, start, end))
        batch = self._host_batch(token_ids, starts, tables, rows)
        qsl = batch.query_start_loc
        batch.prompt_rows = [(i, start, qsl[i] + np.arange(end - start)) for i, start, end in scored]
        if pending:
            batch.pending_rows = batch.query_start_loc[1:][pending] - 1
            batch.pending_from = self._previous_rows([out.requests[i] for i in pending])
        return batch

    def _previous_rows(self, reqs: list[Request]) -> np.ndarray:
        """Rows of the previous launch's sampled tokens that belong to `reqs`."""
        prev_reqs, prev_rows, _ = self._last_sampled
        row_of = {prev_reqs[i].request_id: j for j, i in enumerate(prev_rows)}
        return np.fromiter((row_of[r.request_id] for r in reqs), dtype=np.int64, count=len(reqs))

    def _fill_pending(self, input_ids: torch.Tensor, batch: HostBatch) -> None:
        """Write the previous step's sampled tokens (still on the device) into the PENDING input rows."""
        dst, src = batch.pending_rows, batch.pending_from
        prev = self._last_sampled[2]
        m = len(dst)
        if np.array_equal(dst, src) and dst[-1] == m - 1:  # the steady decode batch: the same rows
            input_ids[:m].copy_(prev[:m])
            return
        dev = input_ids.device
        input_ids[torch.from_numpy(dst).to(dev)] = prev[torch.from_numpy(src).to(dev)]

    def _host_batch(self, token_ids: list[list[int]], starts: list[int], tables: list[list[int]],
                    rows: list[int]) -> HostBatch:
        """Inputs for sequences whose new tokens `token_ids[i]` follow `starts[i]` tokens already cached."""
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
        return HostBatch(
            input_ids=_flatten(token_ids, qsl[-1]).astype(np.int64), positions=positions, slot_mapping=slots,
            block_tables=block_tables, seq_lens=(starts + lens).astype(np.int32),
            query_start_loc=qsl.astype(np.int32), max_query_len=int(lens.max()), sample_rows=rows,
            logits_index=qsl[1:][rows] - 1)

    def _graph_batch(self, batch: HostBatch) -> int:
        """The captured batch a decode-only step replays in; 0: eager (prompt logprobs run eagerly too)."""
        if batch.max_query_len != 1 or batch.prompt_rows:
            return 0
        return padded_graph_batch(self.graph_sizes, len(batch.seq_lens))

    def _forward(self, batch: HostBatch, graph_batch: int) -> torch.Tensor:
        """Logits (float32) of the rows that sample, then of `batch.prompt_rows` (eager only)."""
        if graph_batch:
            logits = self._replay(batch, graph_batch)
            return logits if len(batch.sample_rows) == len(batch.seq_lens) else logits[batch.logits_index]
        return self._run_eager(batch)

    def _run_eager(self, batch: HostBatch) -> torch.Tensor:
        dev = self.device

        def put(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).to(dev)

        meta = AttentionMetadata(
            slot_mapping=put(batch.slot_mapping), block_tables=put(batch.block_tables),
            seq_lens=put(batch.seq_lens), query_start_loc=put(batch.query_start_loc),
            max_query_len=batch.max_query_len, max_seq_len=int(batch.seq_lens.max()))
        input_ids = put(batch.input_ids)
        if batch.pending_rows is not None:
            self._fill_pending(input_ids, batch)
        hidden = self.model(input_ids, put(batch.positions), meta)
        rows = np.concatenate([batch.logits_index, *(r for _, _, r in batch.prompt_rows)])
        return self.model.compute_logits(hidden[put(rows)])

    # ---- CUDA graphs for decode steps ----------------------------------------------
    def _capture_graphs(self, max_num_seqs: int) -> None:
        """Graphs of the forward and the LM head for decode batches of graph_batch_sizes(max_num_seqs)."""
        sizes = graph_batch_sizes(max_num_seqs)
        m, b = sizes[-1], self.max_blocks_per_seq
        nbytes = GraphInputs.nbytes(m, b)
        # Two pinned host twins, used in turn: with async scheduling the host fills one for the next step
        # while the copy from the other may still be queued behind the running step.
        self.graph_hosts = [GraphInputs(torch.zeros(nbytes, dtype=torch.uint8, pin_memory=True), m, b)
                            for _ in range(2)]
        self._host_uploaded = [torch.cuda.Event(), torch.cuda.Event()]  # recorded after each twin's copy
        self.graph_inputs = g = GraphInputs(torch.zeros(nbytes, dtype=torch.uint8, device=self.device), m, b)
        self._pad_graph_rows(self.graph_hosts[0], 0, m)
        self._upload_graph_inputs(0, m)
        # Held by the runner: a graph keeps no reference to the tensors it reads.
        self.graph_qsl = qsl = torch.arange(m + 1, dtype=torch.int32, device=self.device)
        self.graph_logits = torch.zeros(m, self.model.config.vocab_size, dtype=torch.float32,
                                        device=self.device)
        pool = None
        with torch.inference_mode():
            for size in reversed(sizes):  # largest first, so the smaller graphs fit in its memory pool
                meta = AttentionMetadata(g.slot_mapping[:size], g.block_tables[:size], g.seq_lens[:size],
                                         qsl[:size + 1], 1, self.max_model_len)

                def forward(size: int = size, meta: AttentionMetadata = meta) -> None:
                    hidden = self.model(g.input_ids[:size], g.positions[:size], meta)
                    self.graph_logits[:size] = self.model.compute_logits(hidden)

                forward()  # compile and autotune outside the capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool):
                    forward()
                pool = graph.pool()
                self.graphs[size] = graph
        self.graph_sizes = sizes
        torch.cuda.synchronize()

    def _pad_graph_rows(self, h: GraphInputs, start: int, end: int) -> None:
        """Rows [start, end) of a graph batch: a one-token context in the pad block, written there."""
        h.input_ids[start:end] = 0
        h.positions[start:end] = 0
        h.slot_mapping[start:end] = self.pad_block * self.block_size
        h.seq_lens[start:end] = 1
        h.block_tables[start:end, 0] = self.pad_block

    def _upload_graph_inputs(self, turn: int, size: int) -> None:
        h = self.graph_hosts[turn]
        end = h.end_of_row[size]
        self.graph_inputs.buffer[:end].copy_(h.buffer[:end], non_blocking=True)
        self._host_uploaded[turn].record()

    def _replay(self, batch: HostBatch, size: int) -> torch.Tensor:
        n = len(batch.seq_lens)
        turn = self._turn = self._turn ^ 1
        self._host_uploaded[turn].synchronize()  # its last copy has left: long done unless the GPU lags
        h = self.graph_hosts[turn]
        h.input_ids.numpy()[:n] = batch.input_ids
        h.positions.numpy()[:n] = batch.positions
        h.slot_mapping.numpy()[:n] = batch.slot_mapping
        h.seq_lens.numpy()[:n] = batch.seq_lens
        h.block_tables.numpy()[:n, :batch.block_tables.shape[1]] = batch.block_tables
        self._pad_graph_rows(h, n, size)
        self._upload_graph_inputs(turn, size)
        if batch.pending_rows is not None:
            self._fill_pending(self.graph_inputs.input_ids, batch)
        self.graphs[size].replay()
        return self.graph_logits[:n]
