"""Synthetic token ids: an approximate tokenizer for text, and ids drawn as a fixed function of a stream
and a counter (splitmix64), so equal inputs give equal ids and a shared prefix shares KV blocks."""

from __future__ import annotations

import re
import zlib
from typing import Any

import numpy as np

MOONCAKE_BLOCK = 512  # tokens per Mooncake hash id
MIN_TOKEN_ID = 100  # synthetic ids stay clear of the low ids tokenizers reserve for special tokens
APPROX_VOCAB = 32_000  # id range of the approximate tokenizer; ids are folded into smaller vocabularies
_PIECE = re.compile(r" ?\w{1,6}|\s+|[^\w\s]")  # 3.6-3.8 characters a piece on ShareGPT and MT-Bench, like BPE
# Streams of synthetic ids: Mooncake blocks, MT-Bench answers (one per turn), requests (one per row), images.
_STREAM_HASH, STREAM_ANSWER, _STREAM_REQUEST, STREAM_IMAGE = 0, 1 << 40, 1 << 41, 1 << 42


def approx_tokenize(text: str) -> list[int]:
    """Deterministic stand-in for a tokenizer (the simulator has none): pieces of up to 6 characters, each
    hashed to an id, so equal text gives equal ids and a shared text prefix gives a shared token prefix."""
    span = APPROX_VOCAB - 2 * MIN_TOKEN_ID
    return [MIN_TOKEN_ID + zlib.crc32(p.encode()) % span for p in _PIECE.findall(text)]


def prompt_token_ids(row: Any, index: int, vocab_size: int) -> list[int]:
    """The prompt of one workload row (a namedtuple or Series) as token ids below `vocab_size`.

    Recorded ids are used as they are; Mooncake hash ids expand to 512 ids each, derived from the hash id, and
    the last block is cut to `prompt_tokens`, so the KV manager sees exactly the trace's prefix sharing; any
    other row gets ids drawn for its `index`, which share no cache block with other requests in practice.
    """
    _check_vocab(vocab_size)
    ids = getattr(row, "prompt_token_ids", None)
    if ids is not None:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and ids.max() >= vocab_size:  # approximate-tokenizer ids on a small test vocabulary
            ids = MIN_TOKEN_ID + (ids - MIN_TOKEN_ID) % (vocab_size - 2 * MIN_TOKEN_ID)
        return ids.tolist()
    n = int(row.prompt_tokens)
    hashes = getattr(row, "hash_ids", None)
    if hashes is not None:
        counters = np.asarray(hashes, dtype=np.uint64)[:, None] * np.uint64(MOONCAKE_BLOCK) + np.arange(
            MOONCAKE_BLOCK, dtype=np.uint64)
        return synthetic_ids(_STREAM_HASH, counters.ravel()[:n], vocab_size).tolist()
    return unique_prompts(np.array([n]), index, vocab_size)[0]


def _check_vocab(vocab_size: int) -> None:
    if vocab_size <= 2 * MIN_TOKEN_ID:
        raise ValueError(f"vocab_size={vocab_size}: must be > {2 * MIN_TOKEN_ID} to draw synthetic token ids")


def synthetic_ids(stream: int, counters: np.ndarray, vocab_size: int) -> np.ndarray:
    """Token ids that are a fixed function of (stream, counter): splitmix64 of the pair, vectorised, so a
    Mooncake trace's 180k distinct blocks cost milliseconds and no cache."""
    return _splitmix_ids(counters.astype(np.uint64) + _stream_offset(stream), vocab_size)


def _stream_offset(stream: int) -> np.uint64:
    return np.uint64(stream * 0x9E3779B97F4A7C15 % 2**64)


def _splitmix_ids(x: np.ndarray, vocab_size: int) -> np.ndarray:
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return (MIN_TOKEN_ID + x % np.uint64(vocab_size - 2 * MIN_TOKEN_ID)).astype(np.int64)


def unique_ids(n: int, key: int, vocab_size: int) -> np.ndarray:
    return synthetic_ids(key, np.arange(n), vocab_size)


def unique_prompts(lengths: np.ndarray, first_index: int, vocab_size: int) -> list[list[int]]:
    """The prompts of rows first_index, first_index + 1, ... with these lengths, as prompt_token_ids draws
    them one by one, in one vectorised draw."""
    _check_vocab(vocab_size)
    starts = np.cumsum(lengths) - lengths
    counters = (np.arange(int(lengths.sum())) - np.repeat(starts, lengths)).astype(np.uint64)
    offsets = np.array([_stream_offset(_STREAM_REQUEST + first_index + i) for i in range(len(lengths))],
                       dtype=np.uint64)
    flat = _splitmix_ids(counters + np.repeat(offsets, lengths), vocab_size).tolist()
    return [flat[a:a + n] for a, n in zip(starts.tolist(), lengths.tolist())]
