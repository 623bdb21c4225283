"""Which CUDA graph a step runs in: the engine's runner captures these sizes, and the simulator pads its steps
the same way (GraphSizes.padded) so both record the same `graph_batch` and `graph_tokens`."""

from __future__ import annotations

import bisect
from dataclasses import dataclass


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
# Up to here a step's matmuls read weights more than they compute, so padding to a power of two costs little;
# beyond, a padded token costs its FLOPs: the sizes go up by 128 tokens to 1024, then by 256.
MIXED_GRAPH_DOUBLING_TOKENS = 256


def mixed_graph_tokens(max_num_batched_tokens: int) -> list[int]:
    """16, 32, ..., 256, 384, 512, ..., 1024, 1280, ... up to the step's token budget or
    MIXED_GRAPH_MAX_TOKENS: a step that prefills runs in the smallest that holds its tokens, with
    cudagraph_mode FULL."""
    top = min(max_num_batched_tokens, MIXED_GRAPH_MAX_TOKENS)
    sizes, size = [], MIXED_GRAPH_MIN_TOKENS
    while size < top:
        sizes.append(size)
        size += size if size < MIXED_GRAPH_DOUBLING_TOKENS else 128 if size < 1024 else 256
    return [*sizes, top] if top >= MIXED_GRAPH_MIN_TOKENS else []


def mixed_graph_seqs(graph_tokens: int, max_num_seqs: int) -> int:
    """The sequences a mixed graph of `graph_tokens` tokens holds (at least one token each), used or not:
    each gets its attention programs and its row of logits."""
    return min(graph_tokens, max_num_seqs)


@dataclass(frozen=True, slots=True)
class GraphSizes:
    """The CUDA graphs an engine captures: one per decode batch and, with cudagraph_mode FULL, one per token
    count of a step that prefills."""

    batches: list[int]
    tokens: list[int]

    @classmethod
    def of(cls, max_num_seqs: int, max_num_batched_tokens: int, mixed: bool) -> GraphSizes:
        tokens = mixed_graph_tokens(max_num_batched_tokens) if mixed else []
        return cls(graph_batch_sizes(max_num_seqs), tokens)

    def padded(self, num_seqs: int, num_tokens: int) -> tuple[int, int]:
        """(graph_batch, graph_tokens) of a step: a decode-only step (a token a sequence) replays the smallest
        decode graph that holds it, any other step (or a decode batch beyond every decode graph) the smallest
        mixed graph that holds its tokens; 0 and 0: none does, the step runs eagerly."""
        if num_tokens == num_seqs and (batch := padded_graph_batch(self.batches, num_seqs)):
            return batch, 0
        return 0, padded_graph_batch(self.tokens, num_tokens)
