"""`vllm_result.json`: the run's metrics under the names `vllm bench serve --save-result` writes, so tools
built for vLLM's results read ours. summary.json keeps the workbench's own names (README: summary fields)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from servebench.workbench.metrics import FINISHED, latencies
from servebench.workbench.runs import atomic_path, jsonable

VLLM_RESULT = "vllm_result.json"
PERCENTILES = (50, 90, 99)


def vllm_result(summary: dict[str, Any], requests: pd.DataFrame, itl_s: Any = None) -> dict[str, Any]:
    cfg = summary.get("config", {})
    done = requests["finish_reason"].astype(str).isin(FINISHED).to_numpy()
    out = {
        "backend": f"servebench-{summary.get('backend', cfg.get('backend', {}).get('name'))}",
        "model_id": cfg.get("model", {}).get("name"),
        "num_prompts": len(requests),
        "request_rate": cfg.get("workload", {}).get("request_rate") or "trace",
        "duration": summary["duration_s"],
        "completed": int(done.sum()),
        "failed": int((~done).sum()),
        "total_input_tokens": summary["total_input_tokens"],
        "total_output_tokens": summary["total_output_tokens"],
        "request_throughput": summary["request_throughput"],
        "request_goodput": summary["goodput"],
        "output_throughput": summary["output_throughput"],
        "total_token_throughput": summary["total_token_throughput"],
        "max_concurrent_requests": max_concurrent(requests),
    }
    lat = latencies(requests)
    itl_ms = 1e3 * np.asarray(itl_s if itl_s is not None else [], dtype=float)
    for name, values in (("ttft", lat["ttft_ms"]), ("tpot", lat["tpot_ms"]), ("itl", itl_ms),
                         ("e2el", lat["e2el_ms"])):
        out |= _stats(name, np.asarray(values, dtype=float))
    ttft_s = (requests["first_token_s"] - requests["arrival_s"]).astype(float)
    out |= {
        "input_lens": requests["prompt_tokens"].astype(int).tolist(),
        "output_lens": requests["output_tokens"].astype(int).tolist(),
        "ttfts": ttft_s.where(done, 0.0).tolist(),
        "errors": ["" if ok else f"finish_reason={r}" for ok, r in zip(done, requests["finish_reason"],
                                                                        strict=True)],
    }
    return out


def max_concurrent(requests: pd.DataFrame) -> int:
    """The most requests in flight (arrived, not finished) at once."""
    start, end = requests["arrival_s"].astype(float), requests["finish_s"].astype(float)
    events = pd.concat([pd.Series(1, index=start), pd.Series(-1, index=end.fillna(np.inf))]).sort_index(
        kind="stable")
    return int(events.cumsum().max()) if len(events) else 0


def write_vllm_result(run_dir: Path, summary: dict[str, Any], requests: pd.DataFrame, itl_s: Any) -> Path:
    path = Path(run_dir) / VLLM_RESULT
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(jsonable(vllm_result(summary, requests, itl_s)), allow_nan=False) + "\n")
    return path


def _stats(name: str, v: np.ndarray) -> dict[str, float]:
    v = v[~np.isnan(v)]
    stats = {"mean": np.mean, "median": np.median, "std": np.std,
             **{f"p{p}": partial(np.percentile, q=p) for p in PERCENTILES}}
    return {f"{k}_{name}_ms": float(fn(v)) if v.size else float("nan") for k, fn in stats.items()}
