"""Workloads: traces and prompt sets as one DataFrame, and the engine Requests built from it.

A workload is a DataFrame sorted by arrival with columns `request_id` (str), `arrival_s` (float, first = 0),
`prompt_tokens` (int), `output_tokens` (int), and where the source has them `prompt_token_ids` (list[int],
text sets) or `hash_ids` (list[int], Mooncake prefix blocks of 512 tokens).
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from servebench.engine.core.request import Request
from servebench.engine.core.sampling_params import SamplingParams

Tokenizer = Callable[[str], list[int]]

REPO_ROOT = Path(__file__).resolve().parents[1]
MOONCAKE_BLOCK = 512  # tokens per Mooncake hash id
MIN_TOKEN_ID = 100  # synthetic ids stay clear of the low ids tokenizers reserve for special tokens
APPROX_VOCAB = 32_000  # id range of the approximate tokenizer; ids are folded into smaller vocabularies
_PIECE = re.compile(r" ?\w{1,6}|\s+|[^\w\s]")  # 3.6-3.8 characters a piece on ShareGPT and MT-Bench, like BPE
# Streams of synthetic ids: Mooncake blocks, MT-Bench answers (one per turn), requests (one per row), images.
_STREAM_HASH, _STREAM_ANSWER, _STREAM_REQUEST, _STREAM_IMAGE = 0, 1 << 40, 1 << 41, 1 << 42
_DRAW_CHUNK = 256  # rows whose synthetic prompts are drawn together
# Longest prompt or output a workload may ask for: 1M tokens is past any model's context; a corrupt count
# (2e9 tokens) would otherwise allocate its prompt's token ids (GiBs) before the scheduler rejects it.
MAX_TOKENS = 1 << 20

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
    df = _LOADERS[name](s, tokenizer or approx_tokenize)
    return _apply_common(df, s, rescale=name in _TIMED)


def resolve_path(path: str | Path) -> Path:
    """`path` as given when it exists (absolute, or relative to the cwd), else relative to the repo root."""
    p = Path(path).expanduser()
    return p if p.exists() or p.is_absolute() else REPO_ROOT / p


def approx_tokenize(text: str) -> list[int]:
    """Deterministic stand-in for a tokenizer (the simulator has none): pieces of up to 6 characters, each
    hashed to an id, so equal text gives equal ids and a shared text prefix gives a shared token prefix."""
    span = APPROX_VOCAB - 2 * MIN_TOKEN_ID
    return [MIN_TOKEN_ID + zlib.crc32(p.encode()) % span for p in _PIECE.findall(text)]


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
                chunk = _unique_prompts(lengths[i:i + _DRAW_CHUNK], i, vocab_size)
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
    head = [_synthetic_ids(_STREAM_IMAGE, int(img) * image_tokens + np.arange(image_tokens), vocab_size)
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
        return _synthetic_ids(_STREAM_HASH, counters.ravel()[:n], vocab_size).tolist()
    return _unique_prompts(np.array([n]), index, vocab_size)[0]


def _check_vocab(vocab_size: int) -> None:
    if vocab_size <= 2 * MIN_TOKEN_ID:
        raise ValueError(f"vocab_size={vocab_size}: must be > {2 * MIN_TOKEN_ID} to draw synthetic token ids")


def _synthetic_ids(stream: int, counters: np.ndarray, vocab_size: int) -> np.ndarray:
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


def _unique_ids(n: int, key: int, vocab_size: int) -> np.ndarray:
    return _synthetic_ids(key, np.arange(n), vocab_size)


def _unique_prompts(lengths: np.ndarray, first_index: int, vocab_size: int) -> list[list[int]]:
    """The prompts of rows first_index, first_index + 1, ... with these lengths, as prompt_token_ids draws
    them one by one, in one vectorised draw."""
    _check_vocab(vocab_size)
    starts = np.cumsum(lengths) - lengths
    counters = (np.arange(int(lengths.sum())) - np.repeat(starts, lengths)).astype(np.uint64)
    offsets = np.array([_stream_offset(_STREAM_REQUEST + first_index + i) for i in range(len(lengths))],
                       dtype=np.uint64)
    flat = _splitmix_ids(counters + np.repeat(offsets, lengths), vocab_size).tolist()
    return [flat[a:a + n] for a, n in zip(starts.tolist(), lengths.tolist())]


# ---- loaders: (spec with defaults, tokenizer) -> DataFrame in file order, first arrival at 0 ----

def _load_azure(s: dict, tokenizer: Tokenizer) -> pd.DataFrame:
    path = _existing(s["path"], "path")
    raw = _read_csv(path, ("TIMESTAMP", "ContextTokens", "GeneratedTokens"))
    stamps = pd.to_datetime(raw["TIMESTAMP"], format="ISO8601", errors="coerce")
    lines = _csv_lines(raw)
    _fail_at(stamps.isna().to_numpy(), raw["TIMESTAMP"], path, lines, "TIMESTAMP", "is not a date-time")
    raw["TIMESTAMP"] = (stamps - stamps.min()).dt.total_seconds()
    return _trace(raw, path, lines, ("TIMESTAMP", "ContextTokens", "GeneratedTokens"))


def _load_splitwise(s: dict, tokenizer: Tokenizer) -> pd.DataFrame:
    path = _existing(s["path"], "path")
    cols = ("arrived_at", "num_prefill_tokens", "num_decode_tokens")
    raw = _read_csv(path, cols)
    return _trace(raw, path, _csv_lines(raw), cols)


def _load_mooncake(s: dict, tokenizer: Tokenizer) -> pd.DataFrame:
    path = _existing(s["path"], "path")
    lines, records = _read_jsonl(path, ("timestamp", "input_length", "output_length", "hash_ids"))
    cols = ("timestamp", "input_length", "output_length")
    df = _trace(pd.DataFrame.from_records(records), path, lines, cols)
    df["arrival_s"] /= 1000.0  # milliseconds in the file
    for line, hashes, n in zip(lines, df["hash_ids"], df["prompt_tokens"], strict=True):
        ok = isinstance(hashes, list) and all(isinstance(h, int) for h in hashes)
        if not ok or len(hashes) != math.ceil(n / MOONCAKE_BLOCK):
            raise ValueError(f"{path}: line {line}: hash_ids must list ceil(input_length / 512) = "
                             f"{math.ceil(n / MOONCAKE_BLOCK)} block ids, got {hashes!r:.80}")
    return df


def _load_sharegpt(s: dict, tokenizer: Tokenizer) -> pd.DataFrame:
    """ShareGPT first human turns. The file records no answers, so output lengths come from `output_len`."""
    path = _existing(s["path"], "path")
    try:
        entries = json.loads(_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty JSON list of conversations, got {_kind(entries)}")
    prompts, ids = [], []
    for i, entry in enumerate(entries):
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise ValueError(f"{path}: entry {i}: expected conversations: a list of {{from, value}} turns, "
                             f"got {_kind(turns)}")
        human = next((t.get("value") for t in turns if t.get("from") in ("human", "user")), None)
        if not isinstance(human, str) or not human.strip():
            raise ValueError(f"{path}: entry {i}: no non-empty conversations[].value from 'human'")
        prompts.append(_check_length(tokenizer(human), path, f"entry {i}"))
        ids.append(str(entry.get("id", i)))
    outputs = _lengths(s["output_len"], len(ids), _rng(s, 2), "output_len")
    return _text_set(ids, prompts, outputs, s)


def _load_mt_bench(s: dict, tokenizer: Tokenizer) -> pd.DataFrame:
    """MT-Bench: turn k's prompt is every earlier turn and its answer, then turn k, so turns share prefixes.

    Answers are the GPT-4 references where the answers file has them, else `answer_len` synthetic tokens.
    All first turns come first, then all second turns.
    """
    path = _existing(s["path"], "path")
    lines, questions = _read_jsonl(path, ("question_id", "turns"))
    answers = {}
    if s["answers_path"] is not None:
        apath = _existing(s["answers_path"], "answers_path")
        for line, rec in zip(*_read_jsonl(apath, ("question_id", "choices")), strict=True):
            try:
                answers[rec["question_id"]] = _strings(rec["choices"][0]["turns"])
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
                             f"got {_kind(q['turns'])}")
        for k, turn in enumerate(q["turns"]):
            answer = (tokenizer(ref[k]) if k < len(ref)
                      else _unique_ids(s["answer_len"], _STREAM_ANSWER + len(rows), APPROX_VOCAB).tolist())
            context = _check_length(context + tokenizer(turn), path, f"line {line}")
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


_LOADERS: dict[str, Callable[[dict, Tokenizer], pd.DataFrame]] = {
    "azure_conv": _load_azure, "azure_code": _load_azure, "splitwise": _load_splitwise,
    "mooncake": _load_mooncake, "sharegpt": _load_sharegpt, "mt_bench": _load_mt_bench,
    "synthetic": _load_synthetic,
}


# ---- helpers ----

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


def _existing(path: str | Path | None, key: str) -> Path:
    if path is None:
        raise ValueError(f"workload.{key}: no file given")
    p = resolve_path(path)
    if p.is_dir():
        raise ValueError(f"workload.{key}={path}: is a folder; expected a file")
    if not p.is_file():
        tried = dict.fromkeys([Path(path).expanduser().absolute(), REPO_ROOT / path])
        where = "" if Path(path).is_absolute() else f" (tried {', '.join(map(str, tried))})"
        raise FileNotFoundError(f"workload.{key}: file not found: {path}{where}")
    return p


def _read_csv(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable CSV ({' '.join(str(e).split())})") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {list(df.columns)}")
    return df


def _read_jsonl(path: Path, fields: tuple[str, ...]) -> tuple[list[int], list[dict]]:
    """The records of a JSON-lines file (blank lines skipped) and the line number of each."""
    lines, records = [], []
    for lineno, line in enumerate(_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {lineno}: invalid JSON ({e.msg})") from None
        missing = [k for k in fields if not isinstance(rec, dict) or k not in rec]
        if missing:
            raise ValueError(f"{path}: line {lineno}: missing field(s) {missing}")
        lines.append(lineno)
        records.append(rec)
    if not records:
        raise ValueError(f"{path}: no records: expected one JSON object a line with {', '.join(fields)}")
    return lines, records


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: byte {e.start}: not UTF-8 text (expected JSON)") from None


def _csv_lines(raw: pd.DataFrame) -> np.ndarray:
    return np.arange(len(raw)) + 2  # line 1 is the header


def _trace(raw: pd.DataFrame, path: Path, lines: Any, cols: tuple[str, str, str]) -> pd.DataFrame:
    """The trace's (arrival s, prompt tokens, output tokens) columns, checked; lines: each row's line."""
    if raw.empty:
        raise ValueError(f"{path}: no requests in the file (expected rows with {', '.join(cols)})")
    lines = np.asarray(lines)
    arrival, prompt, output = (_numbers(raw, c, path, lines, c != cols[0]) for c in cols)
    df = pd.DataFrame({
        "request_id": [str(i) for i in range(len(raw))],
        "arrival_s": arrival,
        "prompt_tokens": prompt.astype(np.int64),
        "output_tokens": output.astype(np.int64),
    })
    if "hash_ids" in raw:
        df["hash_ids"] = raw["hash_ids"]
    return df


def _numbers(raw: pd.DataFrame, col: str, path: Path, lines: np.ndarray, tokens: bool) -> np.ndarray:
    values = pd.to_numeric(raw[col], errors="coerce").to_numpy(dtype=float)
    if tokens:
        bad = ~((values >= 1) & (values <= MAX_TOKENS)) | (values != np.floor(values))
        why = f"is not a whole number of tokens from 1 to {MAX_TOKENS:,}"
    else:
        bad, why = ~((values >= 0) & np.isfinite(values)), "is not a finite time >= 0"
    _fail_at(bad, raw[col], path, lines, col, why)
    return values


def _fail_at(bad: np.ndarray, values: pd.Series, path: Path, lines: np.ndarray, col: str, why: str) -> None:
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        value = values.iloc[i]
        value = value.item() if isinstance(value, np.generic) else value
        shown = "(empty)" if pd.isna(value) else repr(value)
        raise ValueError(f"{path}: line {lines[i]}: {col}={shown} {why}")


def _check_length(ids: list[int], path: Path, where: str) -> list[int]:
    if len(ids) > MAX_TOKENS:
        raise ValueError(f"{path}: {where}: a prompt of {len(ids):,} tokens; the limit is {MAX_TOKENS:,}")
    return ids


def _strings(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError
    return value


def _kind(value: Any) -> str:
    """A value's JSON kind, for messages: 'a number', 'a string', 'an empty list'."""
    if isinstance(value, list | dict) and not value:
        return f"an empty {'list' if isinstance(value, list) else 'object'}"
    kinds = ((bool, "a boolean"), (int | float, "a number"), (str, "a string"), (list, "a list"),
             (dict, "an object"))
    return next((k for t, k in kinds if isinstance(value, t)), "nothing (null)")
