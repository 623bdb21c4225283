"""Case studies: a sweep's runs set against a guide's claims, in a report with verdicts and plots.

An experiment (`conf/experiment/*.yaml`) carries a `study` block: `name`, `title`, `command` (what
regenerates the report), `report_dir` (unset: the sweep folder; the committed reports pass
`study.report_dir=reports/NAME`), `notes` (Markdown), `x` (the parameter plots run along) and `claims`,
each a dict with `claim` (the guide's words), `kind`, `metric` (a summary.json key) and, by kind:
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
`backend` (swept as `backend=sim,engine`) is not a condition: with runs of several backends the table puts
each backend's number and verdict side by side, rows joined on claim + condition; plots draw each backend's
line (it is a swept parameter like any other).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from servebench.workbench.metrics import summarize
from servebench.workbench.report import (
    Section,
    config_section,
    fmt,
    png,
    run_title,
    runs_section,
    write_document,
)
from servebench.workbench.runs import load_run, load_sweep

KINDS = ("value", "capacity", "change", "trend", "search")
HOLDS, FAILS = "holds", "does not hold"
BACKEND, SIM, NOT_RUN = "backend", "sim", "not run"
COLUMNS = ("claim", "condition", "guide", "simulated", "verdict")  # a sim-only table and its claims.json


@dataclass(slots=True)
class Verdict:
    claim: str
    condition: str
    guide: str
    simulated: str  # the number the runs gave: the simulator's, or that of `backend`
    verdict: str
    backend: str = SIM


def write_study_report(sweep_dir: str | Path, study: dict[str, Any] | None = None,
                       out_dir: str | Path | None = None) -> Path:
    """The study report of a sweep folder into `out_dir` (default: the study's report_dir, else the sweep
    folder): report.md / report.html, one PNG per claim and claims.json (the verdict rows)."""
    sweep_dir = Path(sweep_dir)
    df = load_sweep(sweep_dir)
    config = {k: v for k, v in df.attrs["config"].items() if k != "study"}
    study = study or df.attrs["config"].get("study")
    if not study:
        raise ValueError(f"{sweep_dir}: its runs' config has no `study` block")
    out = Path(out_dir or study.get("report_dir") or sweep_dir)
    verdicts, figures = evaluate(df, study, sweep_dir)
    header, records = _table(verdicts)
    sections: list[Section] = [
        ("How to regenerate", "text", _regenerate(study, sweep_dir)),
        ("Setup", "text", _setup(study, df)),
        (" vs ".join(["Guide vs simulated", *_others(verdicts)]), "table",
         (header, [list(r.values()) for r in records])),
        ("Verdicts", "text", _summary(verdicts)),
        *((f"Claim {i + 1}: {c['claim']}", "image", (f"claim_{i + 1}.png", png(fig)))
          for i, (c, fig) in enumerate(zip(study["claims"], figures, strict=True))),
        runs_section(df, tuple(dict.fromkeys(_metrics(study))), params="swept"),
        config_section(config, "Resolved config (first run)"),
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "claims.json").write_text(json.dumps(records, indent=2) + "\n")
    return write_document(out, "report", study.get("title", study["name"]), sections)


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


# ---- claim kinds ----

def _value(claim: dict, df: pd.DataFrame, x: str | None, sweep_dir: Path) -> tuple[list[Verdict], Figure]:
    where = claim.get("where") or {}
    guide, better, tol = claim["guide"], claim.get("better", "lower"), claim.get("tolerance", 0.2)
    rows = []
    for values, g in _groups(df[_match(df, where)], df, set(where)):
        sim = float(g[claim["metric"]].mean())
        rows.append(Verdict(claim["claim"], _join(_label(where), _condition(values)), fmt(guide), fmt(sim),
                            HOLDS if _as_good(sim, guide, better, tol) else FAILS, _backend(g)))
    return rows, _along(df, claim, x, guide_line=guide)


def _capacity(claim: dict, df: pd.DataFrame, x: str | None, sweep_dir: Path) -> tuple[list[Verdict], Figure]:
    param, limit, guide = claim["param"], claim["max"], claim["guide"]
    rows = []
    for values, g in _groups(df, df, {param}):
        g = g.sort_values(param)
        ok = (g[claim["metric"]] <= limit).to_numpy()
        passed = int(np.argmin(ok)) if not ok.all() else len(ok)  # runs up to the first failure
        if passed == 0:
            sim, verdict = f"< {fmt(g[param].iloc[0])}", FAILS
        else:
            cap = float(g[param].iloc[passed - 1])
            sim = (">= " if passed == len(ok) else "") + fmt(cap)
            verdict = HOLDS if _as_good(cap, guide, "higher", claim.get("tolerance", 0.2)) else FAILS
        condition = _join(f"{claim['metric']} <= {fmt(limit)}", _condition(values))
        rows.append(Verdict(claim["claim"], condition, fmt(guide), sim, verdict, _backend(g)))
    return rows, _along(df, claim, param, guide_line=limit, guide_x=guide)


def _change(claim: dict, df: pd.DataFrame, x: str | None, sweep_dir: Path) -> tuple[list[Verdict], Figure]:
    lo, hi = claim["guide"]
    keys = set(claim["from"]) | set(claim["to"])
    rows, bars = [], {}
    for values, g in _groups(df, df, keys):
        a, b = g[_match(g, claim["from"])], g[_match(g, claim["to"])]
        if a.empty or b.empty:
            continue
        va, vb = _change_values(claim, a, b, sweep_dir)
        rel = vb / va - 1 if va else math.nan
        bars[_label(values) or "all runs"] = (va, vb)
        rows.append(Verdict(claim["claim"], _condition(values) or "all runs", _range(lo, hi),
                            f"{_pct(rel)} ({fmt(va)} -> {fmt(vb)})", _in_range(rel, lo, hi), _backend(g)))
    return rows, _bars(claim, bars)


def _trend(claim: dict, df: pd.DataFrame, x: str | None, sweep_dir: Path) -> tuple[list[Verdict], Figure]:
    param, tol = claim["param"], claim.get("tolerance", 0.02)
    sign = 1.0 if claim.get("direction", "increasing") == "increasing" else -1.0
    rows = []
    for values, g in _groups(df, df, {param}):
        g = g.sort_values(param)
        xs, ys = g[param].tolist(), g[claim["metric"]].astype(float).to_numpy()
        verdict = _trend_verdict(param, xs, sign * ys, tol * (np.abs(ys).max() or 1.0))
        condition = _join(f"{param} {fmt(xs[0])} -> {fmt(xs[-1])}", _condition(values))
        rows.append(Verdict(claim["claim"], condition, claim.get("direction", "increasing"),
                            " -> ".join(fmt(y) for y in ys), verdict, _backend(g)))
    return rows, _along(df, claim, param)


def _search(claim: dict, df: pd.DataFrame, x: str | None, sweep_dir: Path) -> tuple[list[Verdict], Figure]:
    ok = _feasible(df, claim)
    params = [p for p in df.attrs["swept"] if p in df.columns and p != BACKEND]
    rows = [r for _, g in _groups(df, df, set(params)) for r in _search_rows(claim, g, ok[g.index], params)]
    return rows, _scatter(df, claim, ok)


def _search_rows(claim: dict, df: pd.DataFrame, ok: pd.Series, params: list[str]) -> list[Verdict]:
    """The verdict rows of one backend's runs."""
    backend = _backend(df)
    rows = [Verdict(claim["claim"], f"{int(ok.sum())} of {len(df)} configurations meet the SLO and budget",
                    fmt(claim["guide"]) + " GPUs", "", "", backend)]
    if ok.any():
        feasible = df[ok]
        best = feasible.loc[feasible[claim["metric"]].idxmax()]
        cheap = feasible.sort_values(["num_gpus", claim["metric"]], ascending=[True, False]).iloc[0]
        for what, r in (("highest goodput per GPU", best), ("cheapest", cheap)):
            desc = f"{int(r['num_gpus'])} GPUs, {claim['metric']} {fmt(r[claim['metric']])}: " + _label(
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


def _trend_verdict(param: str, xs: list, v: np.ndarray, tol: float) -> str:
    """v oriented so that the claimed direction is up."""
    v = np.asarray(v, dtype=float)
    if len(v) < 2 or v[-1] - v[0] <= tol:
        return FAILS
    peak = int(np.argmax(v))
    if np.any(np.diff(v) < -tol):
        return f"holds only up to {param}={fmt(xs[peak])}, then reverses"
    flat_from = int(np.argmax(v >= v[-1] - tol))  # first point already within tol of the end
    return HOLDS if flat_from == len(v) - 1 else f"holds up to {param}={fmt(xs[flat_from])}, flat beyond"


# ---- groups, matching, verdict words ----

def _groups(rows: pd.DataFrame, df: pd.DataFrame, exclude: set[str]
            ) -> Iterator[tuple[dict[str, Any], pd.DataFrame]]:
    """({parameter: value}, rows) per combination of the swept parameters not in `exclude` (backend
    included, when swept: plots label each line with it, `_condition` leaves it out of verdict rows)."""
    cols = [c for c in df.attrs["swept"] if c not in exclude and c in rows.columns]
    if not cols or rows.empty:
        if not rows.empty:
            yield {}, rows
        return
    for key, g in rows.groupby(cols, dropna=False, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        yield dict(zip(cols, key, strict=True)), g


def _condition(values: dict[str, Any]) -> str:
    """A verdict row's condition: the group's parameter values but the backend, which has its own column."""
    return _label({k: v for k, v in values.items() if k != BACKEND})


def _backend(rows: pd.DataFrame) -> str:
    """The backend that ran these runs (summary.json's `backend`; sim where older runs lack it)."""
    names = rows[BACKEND].dropna().unique() if BACKEND in rows.columns else []
    if len(names) > 1:
        raise ValueError(f"study: runs of backends {', '.join(map(str, names))} share a condition: sweep "
                         "them as a Hydra override (backend=sim,engine)")
    return str(names[0]) if len(names) else SIM


def _match(df: pd.DataFrame, where: dict[str, Any]) -> pd.Series:
    mask = pd.Series(True, index=df.index)
    for key, value in where.items():
        if key not in df.columns:
            have = ", ".join(df.attrs["params"])
            raise ValueError(f"study: {key!r} is not a parameter of this sweep (have: {have})")
        mask &= df[key].map(lambda v, want=value: _same(v, want))
    return mask


def _join(*parts: str) -> str:
    return ", ".join(p for p in parts if p)


def _same(a: Any, b: Any) -> bool:
    if _missing(a) or _missing(b):
        return _missing(a) and _missing(b)
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(a, b, rel_tol=1e-9)
    return str(a).lower() == str(b).lower()


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v == "null"


def _label(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={fmt(v)}" for k, v in values.items())


def _as_good(sim: float, guide: float, better: str, tol: float) -> bool:
    if better == "lower":
        return sim <= guide * (1 + tol)
    if better == "higher":
        return sim >= guide * (1 - tol)
    return abs(sim - guide) <= tol * abs(guide)


def _in_range(rel: float, lo: float | None, hi: float | None) -> str:
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


# ---- text ----

def _regenerate(study: dict, sweep_dir: Path) -> str:
    command = study.get("command", "workbench +experiment=" + study["name"])
    return (f"`{command}` runs the sweep (into a new folder under `outputs/`) and writes this report. "
            f"From saved runs: `workbench-report {sweep_dir}`.")


def _setup(study: dict, df: pd.DataFrame) -> str:
    return (study.get("notes") or "").rstrip() + "\n\n" + _engine_note(df)


def _engine_note(df: pd.DataFrame) -> str:
    runs = df[df[BACKEND] == "engine"] if BACKEND in df.columns else df.iloc[:0]
    if runs.empty:
        return ("Engine: not run for this report; every number is the simulator's (the same scheduler code; "
                "step times from the model named in each run's `step_time_model`).")
    where = "; ".join(dict.fromkeys(_engine_device(r) for _, r in runs.iterrows()))
    return (f"Engine: {len(runs)} of the {len(df)} runs replayed their workload in real time on the engine "
            f"(`backend=engine`) on {where}; the others are the simulator's (the same scheduler code; step "
            "times from the model named in each run's `step_time_model`).")


def _engine_device(run: pd.Series) -> str:
    """The card and torch of an engine run (summary.json `card`, `torch`; older runs record `device` only)."""
    card = run.get("card")
    return str(run.get("device")) if _missing(card) else f"{card} (torch {run.get('torch')})"


def _table(verdicts: list[Verdict]) -> tuple[list[str], list[dict[str, str]]]:
    """The verdict table's header and its rows as records (claims.json). With runs of several backends, one
    row per claim + condition: the simulator's number and verdict, then each other backend's ("not run"
    where that backend has no runs for the condition)."""
    others = _others(verdicts)
    if not others:
        return list(COLUMNS), [{k: getattr(v, k) for k in COLUMNS} for v in verdicts]
    header, empty = [*COLUMNS[:-1], f"verdict ({SIM})"], {"simulated": NOT_RUN, "verdict": ""}
    for b in others:
        header += [b, f"verdict ({b})"]
        empty |= {b: NOT_RUN, f"{b}_verdict": ""}
    rows: dict[tuple[str, str], dict[str, str]] = {}
    for v in verdicts:
        row = rows.setdefault((v.claim, v.condition),
                              {"claim": v.claim, "condition": v.condition, "guide": v.guide, **empty})
        keys = ("simulated", "verdict") if v.backend == SIM else (v.backend, f"{v.backend}_verdict")
        row[keys[0]], row[keys[1]] = v.simulated, v.verdict
    return header, list(rows.values())


def _others(verdicts: list[Verdict]) -> list[str]:
    """The backends beside the simulator, in order of appearance."""
    return list(dict.fromkeys(v.backend for v in verdicts if v.backend != SIM))


def _summary(verdicts: list[Verdict]) -> str:
    """One line per claim; with several backends, one sub-line per backend."""
    several = len({v.backend for v in verdicts}) > 1
    lines = []
    for claim in dict.fromkeys(v.claim for v in verdicts):
        rows = [v for v in verdicts if v.claim == claim]
        if not several:
            lines.append(f"- **{claim}**: " + _verdict_words(rows))
            continue
        lines.append(f"- **{claim}**:")
        lines += [f"  - {b}: " + _verdict_words([v for v in rows if v.backend == b])
                  for b in dict.fromkeys(v.backend for v in rows)]
    return "\n".join(lines)


def _verdict_words(rows: list[Verdict]) -> str:
    by: dict[str, list[str]] = {}
    for v in rows:
        if v.verdict:
            by.setdefault(v.verdict, []).append(v.condition or "all runs")
    return "; ".join(f"{verdict} when {' / '.join(conds)}" for verdict, conds in by.items())


def _metrics(study: dict) -> list[str]:
    extra = ["num_gpus", "goodput_per_gpu", "slo_attainment"] if any(
        c.get("kind") == "search" for c in study.get("claims") or []) else []
    return [*(c["metric"] for c in study.get("claims") or [] if "metric" in c), *extra, "request_throughput",
            "output_throughput", "p99_ttft_ms", "num_preemptions", "prefix_cache_hit_rate"]


# ---- figures ----

def _along(df: pd.DataFrame, claim: dict, x: str | None, guide_line: float | None = None,
           guide_x: float | None = None) -> Figure:
    """`metric` against parameter x, one line per combination of the other swept parameters."""
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    metric = claim["metric"]
    if x is None or x not in df.columns:
        ax.bar(range(len(df)), df[metric].astype(float))
        ax.set(xlabel="run", ylabel=metric)
    else:
        numeric = pd.api.types.is_numeric_dtype(df[x])
        for values, g in _groups(df, df, {x}):
            g = g.sort_values(x) if numeric else g
            ax.plot(g[x] if numeric else g[x].astype(str), g[metric].astype(float), marker="o",
                    label=_label(values) or metric)
        ax.set(xlabel=x, ylabel=metric)
        if numeric and df[x].max() > 20 * max(df[x].min(), 1e-9) > 0:
            ax.set_xscale("log")
        ax.legend(fontsize=7)
    if guide_line is not None:
        ax.axhline(guide_line, color="red", ls="--", lw=1, label="guide")
        ax.annotate("guide" if claim["kind"] == "value" else "limit", (0, guide_line), color="red",
                    xycoords=("axes fraction", "data"), fontsize=8, va="bottom")
    if guide_x is not None:
        ax.axvline(guide_x, color="red", ls=":", lw=1)
        ax.annotate("guide", (guide_x, 1), xycoords=("data", "axes fraction"), color="red", fontsize=8,
                    va="top", ha="right")
    values = df[metric].astype(float)
    if values.min() > 0 and values.max() > 100 * values.min():
        ax.set_yscale("log")
    ax.set_title(claim["claim"], fontsize=10)
    ax.grid(alpha=0.3)
    return fig


def _bars(claim: dict, bars: dict[str, tuple[float, float]]) -> Figure:
    fig = Figure(figsize=(8, 1.5 + 0.5 * max(len(bars), 1)), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(bars))
    for offset, (i, name) in ((-0.2, (0, _label(claim["from"]))), (0.2, (1, _label(claim["to"])))):
        ax.barh(y + offset, [v[i] for v in bars.values()], height=0.4, label=name)
    ax.set(yticks=y, yticklabels=list(bars), xlabel=claim["metric"], title=claim["claim"])
    ax.tick_params(axis="y", labelsize=7)
    ax.invert_yaxis()
    ax.legend(fontsize=7)
    ax.grid(axis="x", alpha=0.3)
    return fig


def _scatter(df: pd.DataFrame, claim: dict, ok: pd.Series) -> Figure:
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    metric = claim["metric"]
    ax.scatter(df.loc[~ok, "num_gpus"], df.loc[~ok, metric], color="grey", alpha=0.5,
               label="misses SLO/budget")
    ax.scatter(df.loc[ok, "num_gpus"], df.loc[ok, metric], color="tab:green", label="meets SLO, fits budget")
    ax.axvline(claim["guide"], color="red", ls="--", lw=1, label="guide's deployment")
    ax.set(xlabel="GPUs", ylabel=metric, title=claim["claim"])
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig
