"""Which CUDA-graph batch a decode step runs in: the engine's runner captures these sizes, and the simulator
pads its steps the same way so both record the same `graph_batch`."""

from __future__ import annotations

import bisect


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, ... and max_num_seqs itself: a decode batch runs in the smallest graph that holds it."""
    sizes = [1 << i for i in range(max_num_seqs.bit_length()) if 1 << i < max_num_seqs]
    return [*sizes, max_num_seqs]


def padded_graph_batch(sizes: list[int], num_seqs: int) -> int:
    """The captured batch a decode step of `num_seqs` sequences replays (`sizes` sorted); 0: none holds it
    (or there are no graphs), so the step runs eagerly."""
    j = bisect.bisect_left(sizes, num_seqs)
    return sizes[j] if j < len(sizes) else 0


# Mixed graphs (cudagraph_mode FULL) stop here: a larger step's kernels outlast their launches anyway.
MIXED_GRAPH_MAX_TOKENS = 2048
MIXED_GRAPH_MIN_TOKENS = 16


def mixed_graph_tokens(max_num_batched_tokens: int) -> list[int]:
    """16, 32, 64, ... up to the step's token budget or MIXED_GRAPH_MAX_TOKENS: a step that prefills runs in
    the smallest that holds its tokens, with cudagraph_mode FULL."""
    top = min(max_num_batched_tokens, MIXED_GRAPH_MAX_TOKENS)
    sizes = [1 << i for i in range(MIXED_GRAPH_MIN_TOKENS.bit_length() - 1, top.bit_length()) if 1 << i < top]
    return [*sizes, top] if top >= MIXED_GRAPH_MIN_TOKENS else []
