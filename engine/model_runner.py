"""Runs one scheduler step on the device: swaps, input tensors, forward (eager or CUDA graph), sampling."""

from __future__ import annotations

import numpy as np
import torch
from servebench.engine.config import EngineArgs, ModelConfig
from servebench.engine.core.config import CacheConfig, SchedulerConfig
from servebench.engine.core.graphs import graph_batch_sizes, padded_graph_batch
from servebench.engine.core.scheduler_output import SchedulerOutput
from servebench.engine.input_batch import HostBatch, prepare
from servebench.engine.kv_cache import KVCache
from servebench.engine.loader import load_model
from servebench.engine.models import AttentionMetadata
from servebench.engine.pending_tokens import PendingTokens
from servebench.engine.sampled_tokens import SampledTokens
from servebench.engine.sampler import Logprobs, Sampler


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
    def __init__(self, args: EngineArgs, cfg: ModelConfig, sched: SchedulerConfig, cache: CacheConfig
                 ) -> None:
        self.device, self.dtype = args.torch_device, args.torch_dtype(cfg)
        self.block_size, self.max_model_len = cache.block_size, sched.max_model_len
        self.max_blocks_per_seq = -(-self.max_model_len // self.block_size)
        torch.manual_seed(args.seed)
        max_position = max(cfg.max_position_embeddings, self.max_model_len)
        self.model = load_model(cfg, self.dtype, self.device, max_position, args.load_format, args.seed)
        self.sampler = Sampler(self.device)
        self.pending_tokens = PendingTokens()
        self.kv_cache = KVCache(self.model, cfg, self.dtype, self.device, sched, cache,
                                args.kv_cache_memory_bytes, self._run_eager)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.graph_sizes: list[int] = []  # sorted keys of `graphs`
        self._turn = 0  # which pinned host twin of the graph inputs the next replay fills
        if self.device.type == "cuda" and not args.enforce_eager:
            self._capture_graphs(sched.max_num_seqs)

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
        self.kv_cache.swap(out)
        sampled, rows, prompt, failures, began = None, [], [], {}, None
        if out.requests:
            batch = prepare(out, self.block_size, self.pending_tokens)
            rows = batch.sample_rows
            out.graph_batch = self._graph_batch(batch)
            if self.device.type == "cuda":
                began = torch.cuda.Event(enable_timing=True)
                began.record()
            logits = self._forward(batch, out.graph_batch)
            if rows:
                sampled = self.sampler(logits[:len(rows)], [out.requests[i] for i in rows])
                self.pending_tokens.remember(out.requests, rows, sampled.tokens)
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
            self.pending_tokens.fill(input_ids, batch.pending_rows, batch.pending_from)
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
        h.slot_mapping[start:end] = self.kv_cache.pad_block * self.block_size
        h.seq_lens[start:end] = 1
        h.block_tables[start:end, 0] = self.kv_cache.pad_block

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
            self.pending_tokens.fill(self.graph_inputs.input_ids, batch.pending_rows, batch.pending_from)
        self.graphs[size].replay()
        return self.graph_logits[:n]
