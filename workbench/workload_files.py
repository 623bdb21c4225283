"""Workload files read and checked: a bad file fails on one line that names the file, the line and the
value (not a traceback from deep inside pandas)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO_ROOT = Path(__file__).resolve().parents[1]
# Longest prompt or output a workload may ask for: 1M tokens is past any model's context; a corrupt count
# (2e9 tokens) would otherwise allocate its prompt's token ids (GiBs) before the scheduler rejects it.
MAX_TOKENS = 1 << 20


def resolve_path(path: str | Path) -> Path:
    """`path` as given when it exists (absolute, or relative to the cwd), else relative to the repo root."""
    p = Path(path).expanduser()
    return p if p.exists() or p.is_absolute() else REPO_ROOT / p


def existing_file(path: str | Path | None, key: str) -> Path:
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


def read_jsonl(path: Path, fields: tuple[str, ...]) -> tuple[list[int], list[dict]]:
    """The records of a JSON-lines file (blank lines skipped) and the line number of each."""
    lines, records = [], []
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
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


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: byte {e.start}: not UTF-8 text (expected JSON)") from None


def csv_lines(raw: pd.DataFrame) -> np.ndarray:
    return np.arange(len(raw)) + 2  # line 1 is the header


def trace_columns(raw: pd.DataFrame, path: Path, lines: Any, cols: tuple[str, str, str]) -> pd.DataFrame:
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
    fail_at(bad, raw[col], path, lines, col, why)
    return values


def fail_at(bad: np.ndarray, values: pd.Series, path: Path, lines: np.ndarray, col: str, why: str) -> None:
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        value = values.iloc[i]
        value = value.item() if isinstance(value, np.generic) else value
        shown = "(empty)" if pd.isna(value) else repr(value)
        raise ValueError(f"{path}: line {lines[i]}: {col}={shown} {why}")


def check_length(ids: list[int], path: Path, where: str) -> list[int]:
    if len(ids) > MAX_TOKENS:
        raise ValueError(f"{path}: {where}: a prompt of {len(ids):,} tokens; the limit is {MAX_TOKENS:,}")
    return ids


def strings(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError
    return value


def json_kind(value: Any) -> str:
    """A value's JSON kind, for messages: 'a number', 'a string', 'an empty list'."""
    if isinstance(value, list | dict) and not value:
        return f"an empty {'list' if isinstance(value, list) else 'object'}"
    kinds = ((bool, "a boolean"), (int | float, "a number"), (str, "a string"), (list, "a list"),
             (dict, "an object"))
    return next((k for t, k in kinds if isinstance(value, t)), "nothing (null)")
