"""Decode steps replayed from CUDA graphs, captured once per batch size, whose inputs reach the device in one
copy a step."""

from __future__ import annotations

import numpy as np
import torch
from servebench.engine.core.graphs import graph_batch_sizes, padded_graph_batch
from servebench.engine.input_batch import HostBatch
from servebench.engine.lora_layers import LoRATables, group_rows
from servebench.engine.models import AttentionMetadata, LlamaForCausalLM
from servebench.engine.pending_tokens import PendingTokens
from servebench.kernels import ops


class GraphInputs:
    """The static tensors every captured decode graph reads, as typed views into one byte buffer, so that a
    step's inputs reach the device in one copy from a pinned host twin with the same layout. With
    `max_loras`, also each row's adapter slot as kernels.lora reads it (rows grouped by slot)."""

    def __init__(self, buffer: torch.Tensor, max_seqs: int, max_blocks: int, max_loras: int = 0) -> None:
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
        self.lora_rows = take(torch.int32, max_seqs if max_loras else 0)
        self.lora_starts = take(torch.int32, max_loras + 2 if max_loras else 0)
        self.block_tables = take(torch.int32, max_seqs, max_blocks)
        # The block tables come last, so a batch of n copies bytes [0, end_of_row[n]).
        tables_at = offset - max_seqs * max_blocks * 4
        self.end_of_row = [tables_at + i * max_blocks * 4 for i in range(max_seqs + 1)]

    @staticmethod
    def nbytes(max_seqs: int, max_blocks: int, max_loras: int = 0) -> int:
        lora = 4 * (max_seqs + max_loras + 2) if max_loras else 0
        return max_seqs * (3 * 8 + 4 + 4 * max_blocks) + lora


class CudaGraphs:
    """Graphs of the forward and the LM head for decode batches of graph_batch_sizes(max_num_seqs), captured
    on construction (the KV cache bound to the model first: the graphs read its tensors). A decode step
    replays the smallest that holds it, its extra rows a one-token context in the KV cache's pad block."""

    def __init__(self, model: LlamaForCausalLM, device: torch.device, max_num_seqs: int, max_model_len: int,
                 block_size: int, pad_block: int, lora: LoRATables | None = None) -> None:
        self.block_size, self.pad_block, self.lora = block_size, pad_block, lora
        self.sizes = sizes = graph_batch_sizes(max_num_seqs)  # ascending: the keys of `graphs`
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._turn = 0  # which pinned host twin of the graph inputs the next replay fills
        m, b, loras = sizes[-1], -(-max_model_len // block_size), lora.max_loras if lora else 0
        nbytes = GraphInputs.nbytes(m, b, loras)
        # Two pinned host twins, used in turn: with async scheduling the host fills one for the next step
        # while the copy from the other may still be queued behind the running step.
        self.hosts = [GraphInputs(torch.zeros(nbytes, dtype=torch.uint8, pin_memory=True), m, b, loras)
                      for _ in range(2)]
        self._host_uploaded = [torch.cuda.Event(), torch.cuda.Event()]  # recorded after each twin's copy
        self.inputs = g = GraphInputs(torch.zeros(nbytes, dtype=torch.uint8, device=device), m, b, loras)
        self._pad_rows(self.hosts[0], 0, m)
        self._upload(0, m)
        # Held here: a graph keeps no reference to the tensors it reads.
        self.qsl = qsl = torch.arange(m + 1, dtype=torch.int32, device=device)
        self.logits = logits = torch.zeros(m, model.config.vocab_size, dtype=torch.float32, device=device)
        pool = None
        with torch.inference_mode():
            for size in reversed(sizes):  # largest first, so the smaller graphs fit in its memory pool
                meta = AttentionMetadata(g.slot_mapping[:size], g.block_tables[:size], g.seq_lens[:size],
                                         qsl[:size + 1], 1, max_model_len)

                def forward(size: int = size, meta: AttentionMetadata = meta) -> None:
                    if lora is not None:  # the LoRA kernels' grid covers all `size` rows of every slot
                        lora.indices = ops.LoRAIndices(g.lora_rows[:size], g.lora_starts, size)
                    hidden = model(g.input_ids[:size], g.positions[:size], meta)
                    logits[:size] = model.compute_logits(hidden)

                forward()  # compile and autotune outside the capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool):
                    forward()
                pool = graph.pool()
                self.graphs[size] = graph
        if lora is not None:
            lora.indices = lora.idle
        torch.cuda.synchronize()

    def padded_batch(self, batch: HostBatch) -> int:
        """The captured batch a decode-only step replays in; 0: eager (prompt logprobs run eagerly too)."""
        if batch.max_query_len != 1 or batch.prompt_rows:
            return 0
        return padded_graph_batch(self.sizes, len(batch.seq_lens))

    def replay(self, batch: HostBatch, size: int, pending_tokens: PendingTokens) -> torch.Tensor:
        """Logits (float32) of the batch's rows, from the graph of `size` rows (`padded_batch`)."""
        n = len(batch.seq_lens)
        turn = self._turn = self._turn ^ 1
        self._host_uploaded[turn].synchronize()  # its last copy has left: long done unless the GPU lags
        h = self.hosts[turn]
        h.input_ids.numpy()[:n] = batch.input_ids
        h.positions.numpy()[:n] = batch.positions
        h.slot_mapping.numpy()[:n] = batch.slot_mapping
        h.seq_lens.numpy()[:n] = batch.seq_lens
        h.block_tables.numpy()[:n, :batch.block_tables.shape[1]] = batch.block_tables
        if self.lora is not None:
            self._lora_rows(h, batch.lora_slots, size)
        self._pad_rows(h, n, size)
        self._upload(turn, size)
        if batch.pending_rows is not None:
            pending_tokens.fill(self.inputs.input_ids, batch.pending_rows, batch.pending_from)
        self.graphs[size].replay()
        return self.logits[:n]

    def _lora_rows(self, h: GraphInputs, token_slots: np.ndarray | None, size: int) -> None:
        """Each row's adapter slot, grouped by slot (the padded rows: none); no slot has rows when no row
        has an adapter."""
        if token_slots is None:
            h.lora_starts.zero_()
            return
        padded = np.zeros(size, dtype=np.int64)
        padded[:len(token_slots)] = token_slots
        rows, starts, _ = group_rows(padded, self.lora.max_loras)
        h.lora_rows.numpy()[:size] = rows
        h.lora_starts.numpy()[:] = starts

    def _pad_rows(self, h: GraphInputs, start: int, end: int) -> None:
        """Rows [start, end) of a graph batch: a one-token context in the pad block, written there."""
        h.input_ids[start:end] = 0
        h.positions[start:end] = 0
        h.slot_mapping[start:end] = self.pad_block * self.block_size
        h.seq_lens[start:end] = 1
        h.block_tables[start:end, 0] = self.pad_block

    def _upload(self, turn: int, size: int) -> None:
        h = self.hosts[turn]
        end = h.end_of_row[size]
        self.inputs.buffer[:end].copy_(h.buffer[:end], non_blocking=True)
        self._host_uploaded[turn].record()
