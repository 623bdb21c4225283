"""Workloads: traces and prompt sets as one DataFrame (workload_loaders.py reads each source,
workload_requests.py turns the rows into engine Requests).

A workload is a DataFrame sorted by arrival with columns `request_id` (str), `arrival_s` (float, first = 0),
`prompt_tokens` (int), `output_tokens` (int), and where the source has them `prompt_token_ids` (list[int],
text sets) or `hash_ids` (list[int], Mooncake prefix blocks of 512 tokens).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pandas as pd
from servebench.workbench.token_ids import approx_tokenize
from servebench.workbench.workload_loaders import LOADERS, Tokenizer

# Azure conv 2023 GeneratedTokens (median 129, mean 211) as a lognormal: the default for sets without outputs.
CHAT_OUTPUT_LEN = {"dist": "lognormal", "median": 129, "sigma": 0.99, "max": 1000}

# Loader-specific keys and their defaults (conf/workload/*.yaml spells out the same presets).
DEFAULTS: dict[str, dict[str, Any]] = {
    "azure_conv": {"path": "data/traces/AzureLLMInferenceTrace_conv.csv"},
    "azure_code": {"path": "data/traces/AzureLLMInferenceTrace_code.csv"},
    "splitwise": {"path": "data/traces/splitwise_conv.csv"},
    "mooncake": {"path": "data/traces/mooncake_conversation_trace.jsonl"},
    "sharegpt": {
        "path": "data/prompts/sharegpt_500/ShareGPT_V3_filtered_500.json",
        "output_len": CHAT_OUTPUT_LEN,
        "cv": 1.0,
    },
    "mt_bench": {
        "path": "data/prompts/mt_bench/question.jsonl",
        "answers_path": "data/prompts/mt_bench/reference_answer_gpt-4.jsonl",
        "answer_len": 256,
        "cv": 1.0,
    },
    "synthetic": {"path": None, "input_len": 1024, "output_len": 128, "cv": 1.0},
}
_TIMED = {"azure_conv", "azure_code", "splitwise", "mooncake"}  # sources with recorded arrival times


def load_workload(spec: Mapping[str, Any], tokenizer: Tokenizer | None = None) -> pd.DataFrame:
    """Load the workload that `spec` (a conf/workload preset plus overrides) describes.

    Common keys, applied after loading in this order: `duration_s` (keep arrivals before it), `num_requests`
    (keep the first N), `time_scale` (multiply arrival gaps: 0.5 = twice as fast), `request_rate` (traces:
    rescale arrivals to this mean rate; sets without timestamps: draw arrivals at this rate with Gamma gaps of
    coefficient of variation `cv`, 1 = Poisson; null = everything at t = 0). Text prompts are tokenized with
    `tokenizer` (e.g. `partial(hf.encode, add_special_tokens=False)`), else with `approx_tokenize`.
    """
    name = spec.get("name")
    if name not in DEFAULTS:
        raise ValueError(f"workload.name={name!r}: choose one of {', '.join(DEFAULTS)}")
    s = {"name": name, "num_requests": None, "duration_s": None, "time_scale": 1.0, "request_rate": None,
         "seed": 0} | DEFAULTS[name]
    unknown = [key for key in spec if key not in s]
    if unknown:
        raise ValueError(f"workload.{unknown[0]}: unknown key for workload {name!r} "
                         f"(allowed: {', '.join(sorted(s))})")
    s |= spec
    _check_numbers(s)
    if name in _TIMED and s["request_rate"] is not None and s["time_scale"] != 1:
        raise ValueError("workload.time_scale and workload.request_rate both set a trace's speed: set one")
    df = LOADERS[name](s, tokenizer or approx_tokenize)
    return _apply_common(df, s, rescale=name in _TIMED)


def _apply_common(df: pd.DataFrame, s: dict, rescale: bool) -> pd.DataFrame:
    df = df.sort_values("arrival_s", kind="stable")
    if s["duration_s"] is not None:
        df = df[df["arrival_s"] < s["duration_s"]]
    if s["num_requests"] is not None:
        df = df.head(int(s["num_requests"]))
    if df.empty:
        raise ValueError(f"workload {s['name']}: no requests left after "
                         f"duration_s={s['duration_s']}, num_requests={s['num_requests']}")
    df = df.reset_index(drop=True)
    t = df["arrival_s"].to_numpy(dtype=float)
    scale = float(s["time_scale"])
    if rescale and s["request_rate"] is not None:
        span = t[-1] - t[0]
        if span <= 0:
            raise ValueError("workload.request_rate: needs at least 2 requests with distinct arrival times")
        scale = (len(t) - 1) / (span * s["request_rate"])  # mean gap becomes 1 / request_rate
    df["arrival_s"] = t[0] + (t - t[0]) * scale
    return df


def _check_numbers(s: dict) -> None:
    for key in ("num_requests", "duration_s", "time_scale", "request_rate", "cv"):
        value = s.get(key)
        if key not in s or (value is None and key in ("num_requests", "duration_s", "request_rate")):
            continue
        integer = key == "num_requests"
        if (isinstance(value, bool) or not isinstance(value, int if integer else int | float) or value <= 0
                or not math.isfinite(value)):
            kind = "integer" if integer else "finite number"
            raise ValueError(f"workload.{key}={value!r}: must be a positive {kind}")
    if isinstance(s["seed"], bool) or not isinstance(s["seed"], int):
        raise ValueError(f"workload.seed={s['seed']!r}: must be an integer")
