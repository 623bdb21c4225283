"""What the CUDA graphs compute, run eagerly on the CPU: a step's inputs written into the graphs' static
buffers, padded to a captured size (a decode graph's one-token pad rows; a mixed graph's tokens that write
no KV and empty sequences), give the eager forward's logits and leave the KV cache as it does. The capture
itself needs a GPU (tests/test_engine_gpu.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from servebench.engine.core.graphs import mixed_graph_tokens, padded_graph_batch
from servebench.engine.cuda_graphs import GraphInputs, fill_inputs, graph_forward, pad_decode, pad_mixed
from servebench.engine.input_batch import host_batch

from servebench import LLM

MAX_TOKENS, MAX_SEQS = 64, 8


@pytest.fixture(scope="module")
def runner(tiny_llama_dir):
    return LLM(model=str(tiny_llama_dir), dtype="float32", device="cpu", max_model_len=256).engine.runner


def graph_logits(runner, batch, tokens: int, seqs: int, mixed: bool) -> torch.Tensor:
    blocks = -(-256 // runner.block_size)
    g = GraphInputs(torch.zeros(GraphInputs.nbytes(MAX_TOKENS, MAX_SEQS, blocks), dtype=torch.uint8),
                    MAX_TOKENS, MAX_SEQS, blocks)
    g.input_ids.fill_(12345 % runner.model.config.vocab_size)  # a previous step's leftovers
    g.slot_mapping.fill_(3)
    fill_inputs(g, batch)
    if mixed:
        pad_mixed(g, batch, tokens, seqs)
    else:
        pad_decode(g, len(batch.seq_lens), seqs, runner.kv_cache.pad_block, runner.block_size)
    logits = torch.zeros(MAX_SEQS, runner.model.config.vocab_size)
    with torch.inference_mode():
        graph_forward(runner.model, g, tokens, seqs, tokens if mixed else 1, 256, None, mixed, logits)
    return logits[:len(batch.sample_rows) if mixed else len(batch.seq_lens)]


def test_mixed_graph_inputs_give_the_eager_logits_and_write_no_extra_kv(runner):
    rng = np.random.default_rng(0)
    ids = [rng.integers(5, 200, size=n).tolist() for n in (7, 19, 3)]
    bs = runner.block_size
    with torch.inference_mode():  # a context for the decode rows: sequences 0 and 2 prefilled first
        runner._run_eager(host_batch([ids[0], ids[2]], [0, 0], [[0], [4]], [0, 1], bs))
    # one decode row, one whole prompt, one chunk after a cached prefix (not sampled: more prompt follows)
    batch = host_batch([[9], ids[1], [11, 12]], [7, 0, 3], [[0], [1, 2], [4]], [0, 1], bs)
    with torch.inference_mode():
        want = runner._run_eager(batch)
    kv_before = runner.kv_cache.gpu.clone()
    tokens = padded_graph_batch(mixed_graph_tokens(MAX_TOKENS), len(batch.input_ids))
    assert tokens == 32 and want.shape[0] == 2
    got = graph_logits(runner, batch, tokens, MAX_SEQS, mixed=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(runner.kv_cache.gpu, kv_before)  # the padding wrote nothing (the real rows: the same)


def test_decode_graph_inputs_give_the_eager_logits(runner):
    bs = runner.block_size
    with torch.inference_mode():
        runner._run_eager(host_batch([[5, 6, 7], [8, 9]], [0, 0], [[6], [7]], [0, 1], bs))
        batch = host_batch([[10], [11]], [3, 2], [[6], [7]], [0, 1], bs)
        want = runner._run_eager(batch)
    got = graph_logits(runner, batch, 4, 4, mixed=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("max_seqs,max_loras", [(8, 0), (7, 3), (24, 0), (255, 16)])
def test_graph_inputs_are_aligned_as_an_eager_steps_tensors(max_seqs, max_loras):
    # Triton compiles a kernel per alignment of its pointer arguments: a view at another alignment than the
    # fresh tensor an eager step passes made that step compile the attention kernel at serving time.
    n = GraphInputs.nbytes(MAX_TOKENS, max_seqs, 33, max_loras)
    g = GraphInputs(torch.zeros(n, dtype=torch.uint8), MAX_TOKENS, max_seqs, 33, max_loras)
    views = [g.input_ids, g.positions, g.slot_mapping, g.seq_lens, g.query_start_loc, g.logits_index,
             g.block_tables] + ([g.lora_rows, g.lora_starts] if max_loras else [])
    assert all((v.data_ptr() - g.buffer.data_ptr()) % 16 == 0 for v in views)
    assert g.end_of_row[max_seqs] == n and g.block_tables.shape == (max_seqs, 33)
