"""Run metrics as `vllm bench serve` reports them, computed from the requests and steps tables."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from servebench.engine.core.recorder import REQUEST_COLUMNS, STEP_COLUMNS

SLO_KEYS = ("ttft_ms", "tpot_ms", "e2el_ms")
FINISHED = ("stop", "length")  # finish reasons of completed requests (not abort / rejected)
DROPPED = ("rejected", "shed", "abort")  # never served: over max_model_len, admission control, cancelled
STATS = (("mean", np.mean), ("median", np.median), ("p90", lambda v: np.percentile(v, 90)),
         ("p99", lambda v: np.percentile(v, 99)))


def summarize(requests: pd.DataFrame, steps: pd.DataFrame | None = None, itl_s: Any = None,
              slo: Mapping[str, float | None] | None = None,
              duration_s: float | None = None) -> dict[str, Any]:
    """Throughput, goodput and latency statistics (ms) of a run, NaN where there is nothing to measure.

    Finished requests (finish_reason stop or length) give the latencies and throughputs. TPOT of a request is
    (finish - first token) / (output tokens - 1), over requests with more than one output token. `slo` maps
    ttft_ms / tpot_ms / e2el_ms to limits (null: not checked); goodput counts finished requests within all
    of them per second. `duration_s` defaults to first arrival -> last finish.
    """
    requests = _table(requests, REQUEST_COLUMNS, "requests")
    steps = _table(steps, STEP_COLUMNS, "steps")
    reason = requests["finish_reason"].astype(str)
    done = requests[reason.isin(FINISHED)]
    latency = latencies(done)
    if duration_s is None:
        duration_s = float(_f(requests["finish_s"]).max() - _f(requests["arrival_s"]).min())
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: math.nan)
    n_in, n_out = int(_f(done["prompt_tokens"]).sum()), int(_f(done["output_tokens"]).sum())
    scheduled = requests[_f(requests["first_scheduled_s"]).notna()]  # rejected requests never look up
    kv, weights = _f(steps["kv_usage"]).to_numpy(), _f(steps["duration_s"]).to_numpy()
    num_rejected = int((reason == "rejected").sum())
    num_good = _num_good(latency, slo) if _active(slo) else None
    out: dict[str, Any] = {
        "num_requests": len(requests),
        "num_finished": len(done),
        "num_rejected": num_rejected,
        "num_aborted": int((reason == "abort").sum()),
        "num_shed": int((reason == "shed").sum()),  # dropped by admission control (max_waiting, shed_ttft_ms)
        "duration_s": duration_s,
        "total_input_tokens": n_in,
        "total_output_tokens": n_out,
        "request_throughput": per_s(len(done)),
        "input_throughput": per_s(n_in),
        "output_throughput": per_s(n_out),
        "total_token_throughput": per_s(n_in + n_out),
        "goodput": per_s(num_good) if num_good is not None else math.nan,
        # share of the servable requests (all but prompts over max_model_len: no deployment of this model
        # serves those) finished within every SLO; shed and aborted requests count as misses
        "slo_attainment": math.nan if num_good is None else _ratio(num_good, len(requests) - num_rejected),
    }
    for name, values in (*latency.items(), ("itl_ms", 1e3 * np.asarray(itl_s if itl_s is not None else []))):
        out |= _stats(name, values)
    out |= {
        "num_preemptions": int(_f(requests["num_preemptions"]).sum()),
        "prefix_cache_hit_rate": _ratio(_f(scheduled["cached_tokens"]).sum(),
                                        _f(scheduled["prompt_tokens"]).sum()),
        # time-weighted: a long prefill step counts for its duration, not as one sample
        "mean_kv_usage": float(np.average(kv, weights=weights)) if weights.sum() > 0 else _stat(np.mean, kv),
        "max_kv_usage": _stat(np.max, kv),
        # what nvidia-smi calls utilisation: the share of the run's time with a step executing
        "busy_fraction": _ratio(weights.sum(), duration_s) if len(weights) else math.nan,
    }
    return out | load(requests)


def load(requests: pd.DataFrame) -> dict[str, Any]:
    """Was the offered load sustainable? `arrival_rate` (requests/s over the arrival window) and the waiting
    queue (arrived, never scheduled, not dropped) at the last arrival and halfway through the arrivals.
    `overloaded`: that queue holds at least 2 % of the requests (and 10) and was still growing: the
    deployment serves more slowly than requests arrive, and latencies grow with the run's length."""
    arrival = _f(requests["arrival_s"]).to_numpy()
    if len(arrival) < 2 or arrival.max() <= arrival.min():
        return {"arrival_rate": math.nan, "queue_at_last_arrival": 0, "overloaded": False}
    t0, t1 = arrival.min(), arrival.max()
    queued = ~requests["finish_reason"].astype(str).isin(DROPPED).to_numpy()
    # a server's client sees no scheduling: there the first token marks the end of the wait
    started = _f(requests["first_scheduled_s"]).fillna(_f(requests["first_token_s"]))
    started = started.fillna(math.inf).to_numpy()

    def waiting_at(t: float) -> int:
        return int((queued & (arrival <= t) & (started > t)).sum())

    end, mid = waiting_at(t1), waiting_at((t0 + t1) / 2)
    return {
        "arrival_rate": (len(arrival) - 1) / (t1 - t0),
        "queue_at_last_arrival": end,
        "overloaded": end >= max(10, 0.02 * len(arrival)) and end > mid,
    }


def num_truncated(requests: pd.DataFrame, workload: pd.DataFrame) -> int:
    """Finished requests that got fewer output tokens than the workload asked for: the scheduler caps prompt
    + output at max_model_len (the engine backend cuts max_tokens to match)."""
    asked = requests["request_id"].map(workload.set_index("request_id")["output_tokens"])
    done = requests["finish_reason"].astype(str) == "length"
    return int((done & (requests["output_tokens"] < asked)).sum())


def lora_loads(steps: pd.DataFrame) -> dict[str, Any]:
    """Adapter loads of a run with LoRA, from its steps table: how many, of which from disk, the mean time."""
    loads = int(steps["lora_loads"].sum())
    return {"lora_loads": loads, "lora_loads_from_disk": int(steps["lora_loads_from_disk"].sum()),
            "mean_lora_load_ms": 1e3 * float(steps["lora_load_s"].sum()) / loads if loads else 0.0}


def latencies(requests: pd.DataFrame) -> pd.DataFrame:
    """ttft_ms, tpot_ms (NaN with a single output token) and e2el_ms of each finished request."""
    done = requests[requests["finish_reason"].astype(str).isin(FINISHED)]
    out = _f(done["output_tokens"])
    return pd.DataFrame({
        "ttft_ms": _ms(done["first_token_s"] - done["arrival_s"]),
        "tpot_ms": _ms((done["finish_s"] - done["first_token_s"]) / (out - 1)).where(out > 1),
        "e2el_ms": _ms(done["finish_s"] - done["arrival_s"]),
    })


def _table(df: pd.DataFrame | None, columns: tuple[str, ...], what: str) -> pd.DataFrame:
    if df is None or len(df) == 0:
        return pd.DataFrame({c: pd.Series(dtype=float) for c in columns})
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what} table: missing column(s) {missing}")
    return df


def _f(col: pd.Series) -> pd.Series:
    return col.astype(float)


def _ms(seconds: pd.Series) -> pd.Series:
    return _f(seconds) * 1e3


def _active(slo: Mapping[str, float | None] | None) -> bool:
    if not slo:
        return False
    unknown = [k for k in slo if k not in SLO_KEYS]
    if unknown:
        raise ValueError(f"slo.{unknown[0]}: unknown SLO (known: {', '.join(SLO_KEYS)})")
    return any(v is not None for v in slo.values())


def _num_good(latency: pd.DataFrame, slo: Mapping[str, float | None]) -> int:
    good = np.ones(len(latency), dtype=bool)
    for key, limit in slo.items():
        if limit is not None:
            good &= (latency[key].fillna(0.0) <= limit).to_numpy()  # no TPOT (1 output token) is no violation
    return int(good.sum())


def _stats(name: str, values: Any) -> dict[str, float]:
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    return {f"{stat}_{name}": _stat(fn, v) for stat, fn in STATS}


def _stat(fn: Any, v: np.ndarray) -> float:
    return float(fn(v)) if v.size else math.nan


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b > 0 else math.nan
