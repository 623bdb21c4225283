"""Run folders: write them atomically, load one run or a whole sweep for analysis."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

SUMMARY = "summary.json"  # written last (after the report): its presence marks a complete run


@dataclass(slots=True)
class Run:
    path: Path
    summary: dict[str, Any]  # the metrics (and backend info), without the config
    config: dict[str, Any]  # the resolved config the run used
    requests: pd.DataFrame
    steps: pd.DataFrame
    itl_s: np.ndarray | None = field(default=None, repr=False)  # inter-token latencies, when recorded


@dataclass(slots=True)
class RunResult:
    """What every backend's `run(cfg)` returns: the two tables, the inter-token gaps and what the backend
    alone knows (its name, KV blocks, step count, duration...), merged into summary.json."""

    requests: pd.DataFrame
    steps: pd.DataFrame
    itl_s: Any
    info: dict[str, Any]


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary name next to `path` to write to; renamed onto `path` only if the block succeeds."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# What a run writes (Hydra's .hydra/ and the log aside): cleared before a run into an existing folder, so
# nothing of an earlier run sits beside this run's config; summary.json goes first and comes back last.
RUN_FILES = (SUMMARY, "requests.parquet", "steps.parquet", "itl.npy", "vllm_result.json", "report.md",
             "report.html", "latency_cdf.png", "timeline.png", "error.txt")


def clear_run(run_dir: str | Path) -> None:
    for name in RUN_FILES:
        (Path(run_dir) / name).unlink(missing_ok=True)


def write_run(run_dir: str | Path, requests_df: pd.DataFrame, steps_df: pd.DataFrame, summary: dict[str, Any],
              itl_s: Any = None) -> Path:
    """Write requests.parquet, steps.parquet, itl.npy (when given) and, last, summary.json into run_dir."""
    write_tables(run_dir, requests_df, steps_df, itl_s)
    return write_summary(run_dir, summary)


def write_tables(run_dir: str | Path, requests_df: pd.DataFrame, steps_df: pd.DataFrame,
                 itl_s: Any = None) -> None:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / SUMMARY).unlink(missing_ok=True)  # a crash below must not leave an old summary vouching for it
    for name, df in (("requests.parquet", requests_df), ("steps.parquet", steps_df)):
        with atomic_path(run_dir / name) as tmp:
            df.to_parquet(tmp, index=False)
    if itl_s is None:
        (run_dir / "itl.npy").unlink(missing_ok=True)
    else:
        with atomic_path(run_dir / "itl.npy") as tmp, tmp.open("wb") as f:
            np.save(f, np.asarray(itl_s, dtype=np.float64))


def write_summary(run_dir: str | Path, summary: dict[str, Any]) -> Path:
    """summary.json, the completeness marker: write it after everything else of the run."""
    run_dir = Path(run_dir)
    with atomic_path(run_dir / SUMMARY) as tmp:
        tmp.write_text(json.dumps(jsonable(summary), indent=2, allow_nan=False) + "\n")
    return run_dir


def load_run(path: str | Path) -> Run:
    """A run folder's tables, metrics and config."""
    path = Path(path)
    summary, config = _summary_and_config(path)
    tables = {}
    for name in ("requests", "steps"):
        file = path / f"{name}.parquet"
        if not file.is_file():
            raise FileNotFoundError(f"{path}: not a complete run folder (no {file.name})")
        tables[name] = pd.read_parquet(file)
    itl = path / "itl.npy"
    return Run(path, summary, config, tables["requests"], tables["steps"],
               np.load(itl) if itl.is_file() else None)


def load_sweep(path: str | Path) -> pd.DataFrame:
    """One row per run folder under `path` (a Hydra multirun folder, or any folder holding run folders).

    Columns: `run` (the folder, relative to `path`), the parameters (Hydra overrides and config keys whose
    values differ between runs; with one run, its overrides), then the summary metrics.
    `df.attrs["params"]` lists the parameter columns; `df.attrs["swept"]` those of them that are Hydra
    overrides varying between runs (the sweep's axes; without Hydra, the differing config keys);
    `df.attrs["config"]` is the first run's resolved config.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    dirs = sorted({p.parent for p in root.rglob(SUMMARY)}, key=lambda d: _natural(d.relative_to(root)))
    if not dirs:
        raise FileNotFoundError(f"{root}: no complete run folders (with {SUMMARY}) inside")
    summaries, configs_raw = zip(*(_summary_and_config(d) for d in dirs), strict=True)
    configs = [_flatten(c) for c in configs_raw]
    overrides = [_overrides(d) for d in dirs]
    values = [c | o for c, o in zip(configs, overrides, strict=True)]
    params = list(dict.fromkeys(k for o in overrides for k in o))
    if len(dirs) > 1:
        params = [k for k in dict.fromkeys(params + [k for v in values for k in v])
                  if len({repr(v.get(k)) for v in values}) > 1]
    rows = [{"run": d.relative_to(root).as_posix() or ".", **{k: v.get(k) for k in params}, **s}
            for d, s, v in zip(dirs, summaries, values, strict=True)]
    df = pd.DataFrame(rows)
    df.attrs["params"] = params
    swept = [k for k in params if any(k in o for o in overrides)]
    df.attrs["swept"] = swept if len(dirs) > 1 and swept else params
    df.attrs["config"] = configs_raw[0]
    return df


def _summary_and_config(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's metrics (NaN where stored as null: strict JSON has no NaN) and its resolved config."""
    file = path / SUMMARY
    if not file.is_file():
        raise FileNotFoundError(f"{path}: not a complete run folder (no {SUMMARY})")
    try:
        summary = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: invalid JSON ({e})") from None
    if not isinstance(summary, dict):
        raise ValueError(f"{file}: not a JSON object")
    config = summary.pop("config", None) or _hydra_config(path)
    return {k: (math.nan if v is None else v) for k, v in summary.items()}, config


def _hydra_config(path: Path) -> dict[str, Any]:
    file = path / ".hydra" / "config.yaml"
    return yaml.safe_load(file.read_text()) if file.is_file() else {}


def _overrides(path: Path) -> dict[str, Any]:
    """Hydra's command-line overrides for this job (`key=value`, `+key=value`), values parsed as YAML."""
    file = path / ".hydra" / "overrides.yaml"
    if not file.is_file():
        return {}
    result = {}
    for item in yaml.safe_load(file.read_text()) or []:
        key, _, text = str(item).lstrip("+~").partition("=")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        result[key] = text if isinstance(value, list | dict) else value  # sweeps compare scalars
    return result


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = repr(v) if isinstance(v, list) else v
    return out


def _natural(rel: Path) -> tuple:
    # Hydra job folders are numbers: 2 sorts before 10
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in rel.parts)


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value
