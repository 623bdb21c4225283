"""One loader per workload source: (spec with defaults, tokenizer) -> DataFrame in file order, first
arrival at 0; and the arrivals and lengths drawn for sets that record none."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping

import numpy as np
import pandas as pd
from servebench.sim.csv_file import read_csv
from servebench.workbench.token_ids import APPROX_VOCAB, MOONCAKE_BLOCK, STREAM_ANSWER, unique_ids
from servebench.workbench.workload_files import (
    MAX_TOKENS,
    check_length,
    csv_lines,
    existing_file,
    fail_at,
    json_kind,
    read_jsonl,
    read_text,
    strings,
    trace_columns,
)

Tokenizer = Callable[[str], list[int]]


def _load_azure(s: dict, tokenizer: Tokenizer) -> pd.DataFrame:
    path = existing_file(s["path"], "path")
    raw = read_csv(path, ("TIMESTAMP", "ContextTokens", "GeneratedTokens"))
    stamps = pd.to_datetime(raw["TIMESTAMP"], format="ISO8601", errors="coerce")
    lines = csv_lines(raw)
    fail_at(stamps.isna().to_numpy(), raw["TIMESTAMP"], path, lines, "TIMESTAMP", "is not a date-time")
    raw["TIMESTAMP"] = (stamps - stamps.min()).dt.total_seconds()
    return trace_columns(raw, path, lines, ("TIMESTAMP", "ContextTokens", "GeneratedTokens"))


def _load_splitwise(s: dict, tokenizer: Tokenizer) -> pd.DataFrame:
    path = existing_file(s["path"], "path")
    cols = ("arrived_at", "num_prefill_tokens", "num_decode_tokens")
    raw = read_csv(path, cols)
    return trace_columns(raw, path, csv_lines(raw), cols)


def _load_mooncake(s: dict, tokenizer: Tokenizer) -> pd.DataFrame:
    path = existing_file(s["path"], "path")
    lines, records = read_jsonl(path, ("timestamp", "input_length", "output_length", "hash_ids"))
    cols = ("timestamp", "input_length", "output_length")
    df = trace_columns(pd.DataFrame.from_records(records), path, lines, cols)
    df["arrival_s"] /= 1000.0  # milliseconds in the file
    for line, hashes, n in zip(lines, df["hash_ids"], df["prompt_tokens"], strict=True):
        ok = isinstance(hashes, list) and all(isinstance(h, int) for h in hashes)
        if not ok or len(hashes) != math.ceil(n / MOONCAKE_BLOCK):
            raise ValueError(f"{path}: line {line}: hash_ids must list ceil(input_length / 512) = "
                             f"{math.ceil(n / MOONCAKE_BLOCK)} block ids, got {hashes!r:.80}")
    return df


def _load_sharegpt(s: dict, tokenizer: Tokenizer) -> pd.DataFrame:
    """ShareGPT first human turns. The file records no answers, so output lengths come from `output_len`."""
    path = existing_file(s["path"], "path")
    try:
        entries = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty JSON list of conversations, got {json_kind(entries)}")
    prompts, ids = [], []
    for i, entry in enumerate(entries):
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise ValueError(f"{path}: entry {i}: expected conversations: a list of {{from, value}} turns, "
                             f"got {json_kind(turns)}")
        human = next((t.get("value") for t in turns if t.get("from") in ("human", "user")), None)
        if not isinstance(human, str) or not human.strip():
            raise ValueError(f"{path}: entry {i}: no non-empty conversations[].value from 'human'")
        prompts.append(check_length(tokenizer(human), path, f"entry {i}"))
        ids.append(str(entry.get("id", i)))
    outputs = _lengths(s["output_len"], len(ids), _rng(s, 2), "output_len")
    return _text_set(ids, prompts, outputs, s)


def _load_mt_bench(s: dict, tokenizer: Tokenizer) -> pd.DataFrame:
    """MT-Bench: turn k's prompt is every earlier turn and its answer, then turn k, so turns share prefixes.

    Answers are the GPT-4 references where the answers file has them, else `answer_len` synthetic tokens.
    All first turns come first, then all second turns.
    """
    path = existing_file(s["path"], "path")
    lines, questions = read_jsonl(path, ("question_id", "turns"))
    answers = {}
    if s["answers_path"] is not None:
        apath = existing_file(s["answers_path"], "answers_path")
        for line, rec in zip(*read_jsonl(apath, ("question_id", "choices")), strict=True):
            try:
                answers[rec["question_id"]] = strings(rec["choices"][0]["turns"])
            except (KeyError, IndexError, TypeError):
                why = "expected choices[0].turns: a list of strings"
                raise ValueError(f"{apath}: line {line}: {why}") from None
    rows: list[tuple[int, str, list[int], int]] = []  # (turn, request id, prompt ids, output tokens)
    for line, q in zip(lines, questions, strict=True):
        qid, context = q["question_id"], []
        ref = answers.get(qid, [])
        if not isinstance(q["turns"], list) or not q["turns"] or not all(
                isinstance(t, str) and t.strip() for t in q["turns"]):
            raise ValueError(f"{path}: line {line}: expected turns: a list of non-empty strings, "
                             f"got {json_kind(q['turns'])}")
        for k, turn in enumerate(q["turns"]):
            answer = (tokenizer(ref[k]) if k < len(ref)
                      else unique_ids(s["answer_len"], STREAM_ANSWER + len(rows), APPROX_VOCAB).tolist())
            context = check_length(context + tokenizer(turn), path, f"line {line}")
            rows.append((k, f"{qid}-{k + 1}", context, len(answer)))
            context = context + answer
    rows.sort(key=lambda r: r[0])
    return _text_set([r[1] for r in rows], [r[2] for r in rows], np.array([r[3] for r in rows]), s)


def _load_synthetic(s: dict, tokenizer: Tokenizer) -> pd.DataFrame:
    if s["num_requests"] is None and (s["duration_s"] is None or s["request_rate"] is None):
        raise ValueError("workload synthetic: set num_requests, or duration_s and request_rate")
    arrivals = _arrivals(s, s["num_requests"], s["duration_s"])
    n = len(arrivals)
    return pd.DataFrame({
        "request_id": [str(i) for i in range(n)],
        "arrival_s": arrivals,
        "prompt_tokens": _lengths(s["input_len"], n, _rng(s, 1), "input_len"),
        "output_tokens": _lengths(s["output_len"], n, _rng(s, 2), "output_len"),
    })


LOADERS: dict[str, Callable[[dict, Tokenizer], pd.DataFrame]] = {
    "azure_conv": _load_azure, "azure_code": _load_azure, "splitwise": _load_splitwise,
    "mooncake": _load_mooncake, "sharegpt": _load_sharegpt, "mt_bench": _load_mt_bench,
    "synthetic": _load_synthetic,
}


def _text_set(ids: list[str], prompts: list[list[int]], outputs: np.ndarray, s: dict) -> pd.DataFrame:
    return pd.DataFrame({
        "request_id": ids,
        "arrival_s": _arrivals(s, len(ids), None),
        "prompt_tokens": np.array([len(p) for p in prompts], dtype=np.int64),
        "output_tokens": np.asarray(outputs, dtype=np.int64),
        "prompt_token_ids": prompts,
    })


def _arrivals(s: dict, n: int | None, duration_s: float | None) -> np.ndarray:
    """Arrival times from t = 0 at `request_rate`, Gamma gaps with coefficient of variation `cv`: `n` of them,
    or (n = None) enough to pass `duration_s`. The first n times do not depend on how many are drawn."""
    rate = s["request_rate"]
    if rate is None:
        return np.zeros(n)
    shape = 1.0 / s["cv"] ** 2
    rng, chunks, last, count = _rng(s, 0), [np.zeros(1)], 0.0, 1
    while count < (n or 0) or (n is None and last < duration_s):
        chunk = last + np.cumsum(rng.gamma(shape, 1.0 / (rate * shape), 1024))
        chunks.append(chunk)
        last, count = chunk[-1], count + len(chunk)
    return np.concatenate(chunks)[:n]


def _lengths(spec: int | Mapping, n: int, rng: np.random.Generator, key: str) -> np.ndarray:
    """Token counts (>= 1) from a length spec: an int, or {dist: fixed|uniform|lognormal, ...}."""
    if isinstance(spec, int):
        spec = {"dist": "fixed", "value": spec}
    dist = spec.get("dist") if isinstance(spec, Mapping) else None
    params = {"fixed": ("value",), "uniform": ("min", "max"), "lognormal": ("median", "sigma")}
    if dist not in params:
        raise ValueError(f"workload.{key}={spec!r}: give an int or {{dist: fixed|uniform|lognormal, ...}}")
    missing = [p for p in params[dist] if spec.get(p) is None]
    if missing:
        raise ValueError(f"workload.{key}: dist {dist} needs {', '.join(params[dist])} (missing {missing})")
    if dist == "fixed":
        values = np.full(n, float(spec["value"]))
    elif dist == "uniform":
        values = rng.integers(int(spec["min"]), int(spec["max"]), n, endpoint=True).astype(float)
    else:
        values = rng.lognormal(math.log(spec["median"]), spec["sigma"], n)
    lo, hi = spec.get("min", 1), spec.get("max")
    values = np.clip(np.rint(values), max(lo, 1), hi)
    if values.max(initial=0) > MAX_TOKENS:
        raise ValueError(f"workload.{key}={spec!r}: lengths must stay within {MAX_TOKENS:,} tokens")
    return values.astype(np.int64)


def _rng(s: dict, stream: int) -> np.random.Generator:
    # One stream per quantity: changing num_requests keeps the first requests' arrivals and lengths.
    return np.random.default_rng([int(s["seed"]), stream])
