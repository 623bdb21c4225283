"""A study's claims (`study.claims` of an experiment), each set against a sweep's runs: verdict rows and
one figure per claim. A claim is a dict with `claim` (the guide's words), `kind`, `metric` (a summary.json
key) and, by kind:
- value: the runs matching `where` against the guide's number `guide`; `better` lower | higher | close,
  within `tolerance` (a fraction of the guide's number, default 0.2);
- capacity: the largest `param` value up to which every run keeps `metric` <= `max`, against `guide`;
- change: the relative change of `metric` from the run matching `from` to the one matching `to` (dicts of
  parameter values), against the range `guide: [lo, hi]` (null: open); `subset: prefix_hits` measures both
  runs on the requests that hit the prefix cache in the `to` run;
- trend: `metric` along `param` in `direction` increasing | decreasing (changes below `tolerance` of the
  largest value count as flat);
- search: among runs within `max_gpus` that finish `min_attainment` of all requests within the SLO, the
  best goodput per GPU and the cheapest deployment (fewest GPUs), against the guide's GPU count `guide`.
Every other swept parameter is a condition: a claim gets one verdict per combination of their values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from servebench.workbench.claim_plots import change_bars, metric_along, search_scatter
from servebench.workbench.documents import fmt
from servebench.workbench.metrics import summarize
from servebench.workbench.report import run_title
from servebench.workbench.runs import load_run
from servebench.workbench.sweep_groups import BACKEND, SIM, backend_of, condition_label, groups, label, match

KINDS = ("value", "capacity", "change", "trend", "search")
HOLDS, FAILS = "holds", "does not hold"


@dataclass(slots=True)
class Verdict:
    claim: str
    condition: str
    guide: str
    simulated: str  # the number the runs gave: the simulator's, or that of `backend`
    verdict: str
    backend: str = SIM


def evaluate(df: pd.DataFrame, study: dict[str, Any], sweep_dir: Path) -> tuple[list[Verdict], list[Figure]]:
    """One list of verdict rows for all claims, and one figure per claim."""
    verdicts, figures = [], []
    # what the runs share, so that each claim's figure says what was run when shown alone
    title = run_title(df.attrs.get("config", {}), varied=tuple(df.attrs.get("swept", ())))
    for i, claim in enumerate(study.get("claims") or []):
        kind = claim.get("kind")
        if kind not in KINDS:
            raise ValueError(f"study.claims[{i}].kind={kind!r}: choose one of {', '.join(KINDS)}")
        for key in ("claim", "metric", *_REQUIRED[kind]):
            if key not in claim:
                raise ValueError(f"study.claims[{i}].{key} is required for a {kind} claim")
        rows, fig = _EVALUATORS[kind](claim, df, study.get("x"), sweep_dir)
        fig.suptitle(title, fontsize=8)
        verdicts += rows
        figures.append(fig)
    return verdicts, figures


def _value(claim: dict, df: pd.DataFrame, x: str | None, sweep_dir: Path) -> tuple[list[Verdict], Figure]:
    where = claim.get("where") or {}
    guide, better, tol = claim["guide"], claim.get("better", "lower"), claim.get("tolerance", 0.2)
    rows = []
    for values, g in groups(df[match(df, where)], df, set(where)):
        sim = float(g[claim["metric"]].mean())
        verdict = HOLDS if _as_good(sim, guide, better, tol) else FAILS
        condition = _join(label(where), condition_label(values))
        rows.append(Verdict(claim["claim"], condition, fmt(guide), fmt(sim), verdict, backend_of(g)))
    return rows, metric_along(df, claim, x, guide_line=guide)


def _capacity(claim: dict, df: pd.DataFrame, x: str | None, sweep_dir: Path) -> tuple[list[Verdict], Figure]:
    param, limit, guide = claim["param"], claim["max"], claim["guide"]
    rows = []
    for values, g in groups(df, df, {param}):
        g = g.sort_values(param)
        ok = (g[claim["metric"]] <= limit).to_numpy()
        passed = int(np.argmin(ok)) if not ok.all() else len(ok)  # runs up to the first failure
        if passed == 0:
            sim, verdict = f"< {fmt(g[param].iloc[0])}", FAILS
        else:
            cap = float(g[param].iloc[passed - 1])
            sim = (">= " if passed == len(ok) else "") + fmt(cap)
            verdict = HOLDS if _as_good(cap, guide, "higher", claim.get("tolerance", 0.2)) else FAILS
        condition = _join(f"{claim['metric']} <= {fmt(limit)}", condition_label(values))
        rows.append(Verdict(claim["claim"], condition, fmt(guide), sim, verdict, backend_of(g)))
    return rows, metric_along(df, claim, param, guide_line=limit, guide_x=guide)


def _change(claim: dict, df: pd.DataFrame, x: str | None, sweep_dir: Path) -> tuple[list[Verdict], Figure]:
    lo, hi = claim["guide"]
    keys = set(claim["from"]) | set(claim["to"])
    rows, bars = [], {}
    for values, g in groups(df, df, keys):
        a, b = g[match(g, claim["from"])], g[match(g, claim["to"])]
        if a.empty or b.empty:
            continue
        va, vb = _change_values(claim, a, b, sweep_dir)
        rel = vb / va - 1 if va else math.nan
        bars[label(values) or "all runs"] = (va, vb)
        rows.append(Verdict(claim["claim"], condition_label(values) or "all runs", _range(lo, hi),
                            f"{_pct(rel)} ({fmt(va)} -> {fmt(vb)})", in_range(rel, lo, hi), backend_of(g)))
    return rows, change_bars(claim, bars)


def _trend(claim: dict, df: pd.DataFrame, x: str | None, sweep_dir: Path) -> tuple[list[Verdict], Figure]:
    param, tol = claim["param"], claim.get("tolerance", 0.02)
    sign = 1.0 if claim.get("direction", "increasing") == "increasing" else -1.0
    rows = []
    for values, g in groups(df, df, {param}):
        g = g.sort_values(param)
        xs, ys = g[param].tolist(), g[claim["metric"]].astype(float).to_numpy()
        verdict = trend_verdict(param, xs, sign * ys, tol * (np.abs(ys).max() or 1.0))
        condition = _join(f"{param} {fmt(xs[0])} -> {fmt(xs[-1])}", condition_label(values))
        rows.append(Verdict(claim["claim"], condition, claim.get("direction", "increasing"),
                            " -> ".join(fmt(y) for y in ys), verdict, backend_of(g)))
    return rows, metric_along(df, claim, param)


def _search(claim: dict, df: pd.DataFrame, x: str | None, sweep_dir: Path) -> tuple[list[Verdict], Figure]:
    ok = _feasible(df, claim)
    params = [p for p in df.attrs["swept"] if p in df.columns and p != BACKEND]
    rows = [r for _, g in groups(df, df, set(params)) for r in _search_rows(claim, g, ok[g.index], params)]
    return rows, search_scatter(df, claim, ok)


def _search_rows(claim: dict, df: pd.DataFrame, ok: pd.Series, params: list[str]) -> list[Verdict]:
    """The verdict rows of one backend's runs."""
    backend = backend_of(df)
    rows = [Verdict(claim["claim"], f"{int(ok.sum())} of {len(df)} configurations meet the SLO and budget",
                    fmt(claim["guide"]) + " GPUs", "", "", backend)]
    if ok.any():
        feasible = df[ok]
        best = feasible.loc[feasible[claim["metric"]].idxmax()]
        cheap = feasible.sort_values(["num_gpus", claim["metric"]], ascending=[True, False]).iloc[0]
        for what, r in (("highest goodput per GPU", best), ("cheapest", cheap)):
            desc = f"{int(r['num_gpus'])} GPUs, {claim['metric']} {fmt(r[claim['metric']])}: " + label(
                {p: r[p] for p in params})
            verdict = HOLDS if r["num_gpus"] <= claim["guide"] else FAILS
            rows.append(Verdict(claim["claim"], what, fmt(claim["guide"]) + " GPUs", desc, verdict, backend))
    else:
        rows[0].verdict = FAILS
    return rows


_EVALUATORS: dict[str, Callable[..., tuple[list[Verdict], Figure]]] = {
    "value": _value, "capacity": _capacity, "change": _change, "trend": _trend, "search": _search}
_REQUIRED = {"value": ("guide",), "capacity": ("param", "max", "guide"), "change": ("from", "to", "guide"),
             "trend": ("param",), "search": ("guide",)}


def feasible(slo_attainment: Any, num_gpus: Any, min_attainment: float = 0.99,
             max_gpus: int | None = None) -> Any:
    """Whether deployments (scalars or arrays) fit the GPU budget and meet the SLO often enough."""
    ok = np.nan_to_num(np.asarray(slo_attainment, dtype=float)) >= min_attainment
    return ok & (np.asarray(num_gpus) <= max_gpus) if max_gpus is not None else ok


def _feasible(df: pd.DataFrame, claim: dict) -> pd.Series:
    ok = feasible(df["slo_attainment"], df["num_gpus"], claim.get("min_attainment", 0.99),
                  claim.get("max_gpus"))
    return pd.Series(ok, index=df.index)


def _change_values(claim: dict, a: pd.DataFrame, b: pd.DataFrame, sweep_dir: Path) -> tuple[float, float]:
    metric = claim["metric"]
    if claim.get("subset") is None:
        return float(a[metric].mean()), float(b[metric].mean())
    if claim["subset"] != "prefix_hits":
        raise ValueError(f"study claim {claim['claim']!r}: subset={claim['subset']!r}: choose prefix_hits")
    ra, rb = (load_run(sweep_dir / t["run"].iloc[0]).requests for t in (a, b))
    hits = set(rb.loc[rb["cached_tokens"] > 0, "request_id"])
    return tuple(float(summarize(r[r["request_id"].isin(hits)])[metric]) for r in (ra, rb))


def trend_verdict(param: str, xs: list, v: np.ndarray, tol: float) -> str:
    """v oriented so that the claimed direction is up."""
    v = np.asarray(v, dtype=float)
    if len(v) < 2 or v[-1] - v[0] <= tol:
        return FAILS
    peak = int(np.argmax(v))
    if np.any(np.diff(v) < -tol):
        return f"holds only up to {param}={fmt(xs[peak])}, then reverses"
    flat_from = int(np.argmax(v >= v[-1] - tol))  # first point already within tol of the end
    return HOLDS if flat_from == len(v) - 1 else f"holds up to {param}={fmt(xs[flat_from])}, flat beyond"


def _join(*parts: str) -> str:
    return ", ".join(p for p in parts if p)


def _as_good(sim: float, guide: float, better: str, tol: float) -> bool:
    if better == "lower":
        return sim <= guide * (1 + tol)
    if better == "higher":
        return sim >= guide * (1 - tol)
    return abs(sim - guide) <= tol * abs(guide)


def in_range(rel: float, lo: float | None, hi: float | None) -> str:
    if math.isnan(rel):
        return FAILS
    if (lo is None or rel >= lo) and (hi is None or rel <= hi):
        return HOLDS
    bounds = [b for b in (lo, hi) if b is not None]
    direction = np.sign(sum(bounds))
    if direction and np.sign(rel) == direction:
        size = "smaller" if abs(rel) < min(map(abs, bounds)) else "larger"
        return f"same direction, {size} than claimed"
    return FAILS


def _range(lo: float | None, hi: float | None) -> str:
    if lo is None:
        return f"<= {_pct(hi)}"
    return f">= {_pct(lo)}" if hi is None else f"{_pct(lo)} to {_pct(hi)}"


def _pct(v: float) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{100 * v:+.1f} %"
