"""The engine Requests of a workload's rows, and the columns that give them LoRA adapters and images."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
from servebench.engine.core.request import Request
from servebench.engine.core.sampling_params import SamplingParams
from servebench.workbench.token_ids import STREAM_IMAGE, prompt_token_ids, synthetic_ids, unique_prompts

_DRAW_CHUNK = 256  # rows whose synthetic prompts are drawn together


def iter_requests(df: pd.DataFrame, vocab_size: int, image_tokens: int = 0) -> Iterator[Request]:
    """Requests for the workload's rows, built lazily: Mooncake's prompts hold ~145M tokens in all.

    Optional columns: `priority`, `lora_id` (0: the base model) and `images` (image ids, see
    `assign_images`): each image puts `image_tokens` placeholder ids in front of the text."""
    n = len(df)
    priorities = df["priority"] if "priority" in df else [0] * n
    loras = df["lora_id"] if "lora_id" in df else [0] * n
    images = df["images"] if "images" in df else [()] * n
    # Rows without recorded ids or hash ids draw theirs a chunk of rows at a time: one numpy call per row
    # would cost about a second on the whole Azure trace.
    drawn = "prompt_token_ids" not in df and "hash_ids" not in df
    lengths = df["prompt_tokens"].to_numpy(np.int64) if drawn else None
    chunk: list[list[int]] = []
    for i, (row, priority, lora, imgs) in enumerate(
        zip(df.itertuples(index=False), priorities, loras, images, strict=True)
    ):
        params = SamplingParams(max_tokens=int(row.output_tokens), ignore_eos=True, temperature=0.0)
        if drawn:
            if i % _DRAW_CHUNK == 0:
                chunk = unique_prompts(lengths[i:i + _DRAW_CHUNK], i, vocab_size)
            ids = chunk[i % _DRAW_CHUNK]
        else:
            ids = prompt_token_ids(row, i, vocab_size)
        mm = {}
        if len(imgs):
            ids, mm = _with_images(ids, imgs, image_tokens, vocab_size)
        yield Request(str(row.request_id), ids, params, arrival_time=float(row.arrival_s),
                      priority=int(priority), lora_id=int(lora) or None, **mm)


def _with_images(ids: list[int], images: Any, image_tokens: int, vocab_size: int) -> tuple[list[int], dict]:
    """`ids` after one run of `image_tokens` placeholder ids per image, a fixed function of the image id (so
    a repeated image repeats its tokens, as vLLM's hash-derived placeholders do); the Request's mm fields."""
    head = [synthetic_ids(STREAM_IMAGE, int(img) * image_tokens + np.arange(image_tokens), vocab_size)
            for img in images]
    positions = tuple((k * image_tokens, image_tokens) for k in range(len(head)))
    mm = {"mm_hashes": tuple(f"image-{int(img)}" for img in images), "mm_positions": positions}
    return np.concatenate([*head, np.asarray(ids, dtype=np.int64)]).tolist(), mm


def assign_adapters(df: pd.DataFrame, num_adapters: int, distribution: str, zipf_s: float,
                    seed: int) -> pd.DataFrame:
    """A `lora_id` column: adapter 1..num_adapters per request, uniform or Zipf(zipf_s) over the ids."""
    rng = np.random.default_rng([seed, 3])
    if distribution == "uniform":
        ids = rng.integers(1, num_adapters, len(df), endpoint=True)
    else:
        weights = np.arange(1, num_adapters + 1, dtype=float) ** -zipf_s
        ids = rng.choice(num_adapters, len(df), p=weights / weights.sum()) + 1
    return df.assign(lora_id=ids)


def with_lora_ids(requests: pd.DataFrame, workload: pd.DataFrame) -> pd.DataFrame:
    """The requests table with each request's adapter (`lora_id` of the workload row of its id)."""
    adapter_of = dict(zip(workload["request_id"].astype(str), workload["lora_id"], strict=True))
    return requests.assign(lora_id=requests["request_id"].astype(str).map(adapter_of))


def assign_images(df: pd.DataFrame, images_per_request: int, num_unique_images: int | None,
                  seed: int) -> pd.DataFrame:
    """An `images` column: `images_per_request` image ids per request, drawn uniformly from
    `num_unique_images` ids (repeats across requests), or all distinct when it is None."""
    n = len(df) * images_per_request
    if num_unique_images is None:
        ids = np.arange(n)
    else:
        ids = np.random.default_rng([seed, 4]).integers(0, num_unique_images, n)
    return df.assign(images=list(ids.reshape(len(df), images_per_request)))
