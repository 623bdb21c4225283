"""A step's model inputs as host arrays, built from the scheduler's output before they move to the device."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from servebench.engine.core.request import PENDING
from servebench.engine.core.scheduler_output import SchedulerOutput
from servebench.engine.pending_tokens import PendingTokens


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
    # LoRA: each token row's adapter slot (0: the base model); None when no request of the step has one
    lora_slots: np.ndarray | None = None


def prepare(out: SchedulerOutput, block_size: int, pending_tokens: PendingTokens) -> HostBatch:
    """The inputs of the step `out`: each request's scheduled tokens after its computed ones; with async
    scheduling, where `pending_tokens` holds those still PENDING on the host."""
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
    batch = host_batch(token_ids, starts, tables, rows, block_size)
    qsl = batch.query_start_loc
    batch.prompt_rows = [(i, start, qsl[i] + np.arange(end - start)) for i, start, end in scored]
    if pending:
        batch.pending_rows = batch.query_start_loc[1:][pending] - 1
        batch.pending_from = pending_tokens.source_rows([out.requests[i] for i in pending])
    if out.lora_slots:
        slots = np.fromiter((out.lora_slots.get(req.lora_id, 0) for req in out.requests), dtype=np.int64,
                            count=len(out.requests))
        batch.lora_slots = np.repeat(slots, out.num_scheduled_tokens)
    return batch


def host_batch(token_ids: list[list[int]], starts: list[int], tables: list[list[int]], rows: list[int],
               block_size: int) -> HostBatch:
    """Inputs for sequences whose new tokens `token_ids[i]` follow `starts[i]` tokens already cached, in the
    blocks of `tables[i]`; `rows`: the sequences that sample."""
    # Vectorized over tokens: a numpy call per sequence would cost milliseconds a step at batch 256.
    bs = block_size
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


def _lengths(lists: list[list[int]]) -> np.ndarray:
    return np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))


def _flatten(lists: list[list[int]], total: int) -> np.ndarray:
    return np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int32, count=total)
