"""Steps replayed from CUDA graphs, whose inputs reach the device in one copy a step.

Decode steps always (a graph per batch size, vLLM's FULL_DECODE_ONLY); with cudagraph_mode FULL also the
steps that prefill (a graph per token count up to MIXED_GRAPH_MAX_TOKENS, vLLM's FULL): eagerly, such a step
is ~30 layers of kernels launched one by one from Python, and on a fast GPU the host's launches, not the
kernels, set its time. The attention kernel needs no host-side knowledge of which sequences prefill, so a
mixed graph holds any mix: its padding tokens write no KV (slot -1) and its padding sequences are empty.
"""

from __future__ import annotations

import numpy as np
import torch
from servebench.engine.core.graphs import GraphSizes, mixed_graph_seqs
from servebench.engine.input_batch import HostBatch
from servebench.engine.lora_layers import LoRATables, group_rows
from servebench.engine.models import AttentionMetadata, LlamaForCausalLM
from servebench.engine.pending_tokens import PendingTokens
from servebench.kernels import ops

# Every view starts at a multiple of this many bytes, as a tensor of its own would: Triton compiles a kernel
# per alignment of its pointer arguments, so a view that an eager step's fresh tensor replaces at another
# alignment made that step compile the kernel anew (~0.7 s on an H100: benchmarks/eager_first_steps.py).
VIEW_ALIGN = 16


class GraphInputs:
    """The static tensors every captured graph reads, as typed views into one byte buffer, so that a step's
    inputs reach the device in one copy from a pinned host twin with the same layout: per token (ids,
    positions, KV slots and, with `max_loras`, the adapter slot rows as kernels.lora reads them), per sequence
    (context lengths, query start offsets, the token whose logits it samples) and the block tables."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    logits_index: torch.Tensor
    lora_rows: torch.Tensor
    lora_starts: torch.Tensor
    block_tables: torch.Tensor

    def __init__(self, buffer: torch.Tensor, max_tokens: int, max_seqs: int, max_blocks: int,
                 max_loras: int = 0) -> None:
        self.buffer = buffer
        offsets, _ = _layout(max_tokens, max_seqs, max_blocks, max_loras)
        for name, (offset, dtype, shape) in offsets.items():
            nbytes = int(np.prod(shape)) * dtype.itemsize
            setattr(self, name, buffer[offset:offset + nbytes].view(dtype).view(shape))
        # The block tables come last, so a batch of n sequences copies bytes [0, end_of_row[n]).
        tables_at = offsets["block_tables"][0]
        self.end_of_row = [tables_at + i * max_blocks * 4 for i in range(max_seqs + 1)]

    @staticmethod
    def nbytes(max_tokens: int, max_seqs: int, max_blocks: int, max_loras: int = 0) -> int:
        return _layout(max_tokens, max_seqs, max_blocks, max_loras)[1]


def _layout(max_tokens: int, max_seqs: int, max_blocks: int, max_loras: int
            ) -> tuple[dict[str, tuple[int, torch.dtype, tuple[int, ...]]], int]:
    """GraphInputs' views: name -> (byte offset, dtype, shape), and the bytes they take in all."""
    views = [("input_ids", torch.long, (max_tokens,)), ("positions", torch.long, (max_tokens,)),
             ("slot_mapping", torch.long, (max_tokens,)), ("seq_lens", torch.int32, (max_seqs,)),
             ("query_start_loc", torch.int32, (max_seqs + 1,)), ("logits_index", torch.int32, (max_seqs,)),
             ("lora_rows", torch.int32, (max_tokens if max_loras else 0,)),
             ("lora_starts", torch.int32, (max_loras + 2 if max_loras else 0,)),
             ("block_tables", torch.int32, (max_seqs, max_blocks))]
    offsets, offset = {}, 0
    for name, dtype, shape in views:
        offset = -(-offset // VIEW_ALIGN) * VIEW_ALIGN
        offsets[name] = (offset, dtype, shape)
        offset += int(np.prod(shape)) * dtype.itemsize
    return offsets, offset


class CudaGraphs:
    """Graphs of the forward and the LM head, captured on construction (the KV cache bound to the model
    first: the graphs read its tensors): for decode batches of graph_batch_sizes(max_num_seqs) and, with
    `mixed`, for steps of mixed_graph_tokens(max_num_batched_tokens) tokens. A step replays the smallest that
    holds it; a decode graph's extra rows are one-token contexts in the KV cache's pad block, a mixed
    graph's extra tokens write nowhere and its extra sequences are empty."""

    def __init__(self, model: LlamaForCausalLM, device: torch.device, max_num_seqs: int, max_model_len: int,
                 block_size: int, pad_block: int, lora: LoRATables | None = None,
                 max_num_batched_tokens: int = 0, mixed: bool = False) -> None:
        self.block_size, self.pad_block, self.lora = block_size, pad_block, lora
        # ascending: the keys of `graphs` (batches) and of `mixed_graphs` (tokens)
        self.sizes = GraphSizes.of(max_num_seqs, max_num_batched_tokens, mixed)
        # A mixed graph of t tokens holds up to this many sequences (at least one token each).
        self.mixed_seqs = {t: mixed_graph_seqs(t, max_num_seqs) for t in self.sizes.tokens}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.mixed_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._turn = 0  # which pinned host twin of the graph inputs the next replay fills
        seqs = max([self.sizes.batches[-1], *self.mixed_seqs.values()])
        tokens = max([self.sizes.batches[-1], *self.sizes.tokens])
        blocks, loras = -(-max_model_len // block_size), lora.max_loras if lora else 0
        nbytes = GraphInputs.nbytes(tokens, seqs, blocks, loras)
        # Two pinned host twins, used in turn: with async scheduling the host fills one for the next step
        # while the copy from the other may still be queued behind the running step.
        self.hosts = [GraphInputs(torch.zeros(nbytes, dtype=torch.uint8, pin_memory=True), tokens, seqs,
                                  blocks, loras) for _ in range(2)]
        self._host_uploaded = [torch.cuda.Event(), torch.cuda.Event()]  # recorded after each twin's copy
        self.inputs = GraphInputs(torch.zeros(nbytes, dtype=torch.uint8, device=device), tokens, seqs, blocks,
                                  loras)
        self.hosts[0].slot_mapping[:] = -1  # what capture runs writes no KV but the decode rows' pad block
        pad_decode(self.hosts[0], 0, seqs, pad_block, block_size)
        self._upload(0, seqs)
        # Held here: a graph keeps no reference to the tensors it reads.
        self.logits = torch.zeros(seqs, model.config.vocab_size, dtype=torch.float32, device=device)
        self._capture(model, max_model_len)

    def _capture(self, model: LlamaForCausalLM, max_model_len: int) -> None:
        g, lora, logits = self.inputs, self.lora, self.logits
        # (graphs, key, tokens, sequences, max_query_len), largest first: the smaller graphs fit in the memory
        # pool the largest leaves; a mixed graph always launches the attention's prefill programs.
        plans = [(self.graphs, s, s, s, 1) for s in self.sizes.batches]
        plans += [(self.mixed_graphs, t, t, self.mixed_seqs[t], t) for t in self.sizes.tokens]
        pool = None
        with torch.inference_mode():
            for graphs, key, tokens, seqs, max_query_len in sorted(plans, key=lambda p: -p[2]):
                mixed = graphs is self.mixed_graphs
                args = (model, g, tokens, seqs, max_query_len, max_model_len, lora, mixed, logits)
                graph_forward(*args)  # compile and autotune outside the capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool):
                    graph_forward(*args)
                pool = graph.pool()
                graphs[key] = graph
        if lora is not None:
            lora.indices = lora.idle
        torch.cuda.synchronize()

    def padded(self, batch: HostBatch) -> tuple[int, int]:
        """(graph_batch, graph_tokens): the decode or mixed graph the step replays in (GraphSizes.padded);
        0 and 0: eager, as a step with prompt logprobs always is."""
        return (0, 0) if batch.prompt_rows else self.sizes.padded(len(batch.seq_lens), len(batch.input_ids))

    def replay(self, batch: HostBatch, size: int, pending_tokens: PendingTokens) -> torch.Tensor:
        """Logits (float32) of the batch's rows, from the decode graph of `size` rows (`padded`)."""
        h = self._next_host()
        fill_inputs(h, batch)
        pad_decode(h, len(batch.seq_lens), size, self.pad_block, self.block_size)
        return self._launch(h, self.graphs[size], batch, size, size, pending_tokens)[:len(batch.seq_lens)]

    def replay_mixed(self, batch: HostBatch, tokens: int, pending_tokens: PendingTokens) -> torch.Tensor:
        """Logits (float32) of the rows that sample (batch.sample_rows, in order), from the mixed graph of
        `tokens` tokens (`padded`)."""
        h, seqs = self._next_host(), self.mixed_seqs[tokens]
        fill_inputs(h, batch)
        pad_mixed(h, batch, tokens, seqs)
        logits = self._launch(h, self.mixed_graphs[tokens], batch, tokens, seqs, pending_tokens)
        return logits[:len(batch.logits_index)]

    def _next_host(self) -> GraphInputs:
        turn = self._turn = self._turn ^ 1
        self._host_uploaded[turn].synchronize()  # its last copy has left: long done unless the GPU lags
        return self.hosts[turn]

    def _launch(self, h: GraphInputs, graph: torch.cuda.CUDAGraph, batch: HostBatch, tokens: int, seqs: int,
                pending_tokens: PendingTokens) -> torch.Tensor:
        if self.lora is not None:
            self._lora_rows(h, batch.lora_slots, tokens)
        self._upload(self._turn, seqs)
        if batch.pending_rows is not None:
            pending_tokens.fill(self.inputs.input_ids, batch.pending_rows, batch.pending_from)
        graph.replay()
        return self.logits

    def _lora_rows(self, h: GraphInputs, token_slots: np.ndarray | None, tokens: int) -> None:
        """Each row's adapter slot, grouped by slot (the padded rows: none); no slot has rows when no row
        has an adapter."""
        if token_slots is None:
            h.lora_starts.zero_()
            return
        padded = np.zeros(tokens, dtype=np.int64)
        padded[:len(token_slots)] = token_slots
        rows, starts, _ = group_rows(padded, self.lora.max_loras)
        h.lora_rows.numpy()[:tokens] = rows
        h.lora_starts.numpy()[:] = starts

    def _upload(self, turn: int, seqs: int) -> None:
        h = self.hosts[turn]
        end = h.end_of_row[seqs]
        self.inputs.buffer[:end].copy_(h.buffer[:end], non_blocking=True)
        self._host_uploaded[turn].record()


def fill_inputs(h: GraphInputs, batch: HostBatch) -> None:
    """The rows of `batch`'s tokens and sequences, from the first."""
    n, m, rows = len(batch.input_ids), len(batch.seq_lens), len(batch.logits_index)
    h.input_ids.numpy()[:n] = batch.input_ids
    h.positions.numpy()[:n] = batch.positions
    h.slot_mapping.numpy()[:n] = batch.slot_mapping
    h.seq_lens.numpy()[:m] = batch.seq_lens
    h.query_start_loc.numpy()[:m + 1] = batch.query_start_loc
    h.logits_index.numpy()[:rows] = batch.logits_index
    h.block_tables.numpy()[:m, :batch.block_tables.shape[1]] = batch.block_tables


def pad_decode(h: GraphInputs, start: int, end: int, pad_block: int, block_size: int) -> None:
    """Rows [start, end) of a decode graph batch: a one-token context in the pad block, written there."""
    h.input_ids[start:end] = 0
    h.positions[start:end] = 0
    h.slot_mapping[start:end] = pad_block * block_size
    h.seq_lens[start:end] = 1
    h.query_start_loc[start + 1:end + 1] = torch.arange(start + 1, end + 1, dtype=torch.int32)
    h.block_tables[start:end, 0] = pad_block


def pad_mixed(h: GraphInputs, batch: HostBatch, tokens: int, seqs: int) -> None:
    """A mixed graph's rows past `batch`'s, up to `tokens` tokens and `seqs` sequences: tokens that write no
    KV (slot -1) and belong to no sequence, sequences with no query token (every kernel skips them)."""
    n, m, rows = len(batch.input_ids), len(batch.seq_lens), len(batch.logits_index)
    h.input_ids[n:tokens] = 0
    h.positions[n:tokens] = 0
    h.slot_mapping[n:tokens] = -1
    h.seq_lens[m:seqs] = 0
    h.query_start_loc[m + 1:seqs + 1] = n
    h.logits_index[rows:seqs] = 0


def graph_forward(model: LlamaForCausalLM, g: GraphInputs, tokens: int, seqs: int, max_query_len: int,
                  max_model_len: int, lora: LoRATables | None, mixed: bool, logits: torch.Tensor) -> None:
    """What a graph holds: the forward of `tokens` rows of `g` and the logits of `seqs` rows (a decode
    graph: every row; a mixed graph: each sequence's `logits_index` token) into `logits`."""
    meta = AttentionMetadata(g.slot_mapping[:tokens], g.block_tables[:seqs], g.seq_lens[:seqs],
                             g.query_start_loc[:seqs + 1], max_query_len, max_model_len)
    if lora is not None:  # the LoRA kernels' grid covers all `tokens` rows of every slot
        lora.indices = ops.LoRAIndices(g.lora_rows[:tokens], g.lora_starts, tokens)
    hidden = model(g.input_ids[:tokens], g.positions[:tokens], meta)
    if mixed:
        hidden = hidden[g.logits_index[:seqs].long()]
    logits[:seqs] = model.compute_logits(hidden)
