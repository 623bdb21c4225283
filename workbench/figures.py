"""The figures of run and sweep reports, drawn on matplotlib's Agg canvas without pyplot, so importing this
module leaves an interactive session's backend alone. Time series are averaged into at most `MAX_POINTS`
bins, so 100k-step runs plot fast."""

from __future__ import annotations

import io
import textwrap
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

MAX_POINTS = 1000


def time_unit(ms: float) -> tuple[float, str]:
    """(divisor, unit) that shows `ms` (the largest value) as a number a reader takes in at a glance."""
    for divisor, unit in ((60_000.0, "min"), (1000.0, "s")):
        if ms >= 10 * divisor:
            return divisor, unit
    return 1.0, "ms"


def latency_cdf(latency: pd.DataFrame, title: str) -> Figure:
    """TTFT and TPOT CDFs side by side, each in the unit that fits its largest value."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    fig.suptitle(title, fontsize=9)
    for ax, name in zip(fig.subplots(1, 2), ("TTFT", "TPOT"), strict=True):
        v = np.sort(latency[f"{name.lower()}_ms"].dropna().to_numpy())
        divisor, unit = time_unit(v[-1] if v.size else 0.0)
        if v.size:
            v = v / divisor
            q = np.linspace(0, 1, min(v.size, MAX_POINTS))
            label = f"p50 {np.median(v):.3g} {unit}, p99 {np.percentile(v, 99):.3g} {unit}"
            ax.plot(np.quantile(v, q), q, label=label)
            ax.legend(loc="lower right")
            ax.set_xlim(0, 1.05 * v[-1] or 1.0)
        else:
            _no_data(ax)
        ax.set(xlabel=f"{name} ({unit})", ylabel="fraction of requests", title=f"{name} CDF", ylim=(0, 1.02))
        ax.ticklabel_format(axis="x", style="plain", useOffset=False)
        ax.grid(alpha=0.3)
    return fig


def timeline(steps: pd.DataFrame, title: str) -> Figure:
    """Batch size, queue length, KV-cache usage and tokens per step over the run's time."""
    panels = (("batch size (running requests)", ["num_running"]),
              ("queue length (waiting requests)", ["num_waiting"]),
              ("KV-cache usage (fraction of blocks)", ["kv_usage"]),
              ("tokens per step", ["num_prefill_tokens", "num_decode_tokens"]))
    fig = Figure(figsize=(10, 8), layout="constrained")
    fig.suptitle(title, fontsize=9)
    axes = fig.subplots(len(panels), 1, sharex=True)
    binned = _binned(steps, [c for _, cols in panels for c in cols])
    for ax, (name, cols) in zip(axes, panels, strict=True):
        if binned.empty:
            _no_data(ax)
        for col in cols:
            ax.plot(binned.index, binned[col], label=col.removeprefix("num_").removesuffix("_tokens"), lw=1)
        if len(cols) > 1 and not binned.empty:
            ax.legend(loc="upper right")
        ax.set_title(name, fontsize=9, loc="left")  # a title, not a y label: long names fit the width
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("time (s)")
    return fig


def _binned(steps: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    """Step columns indexed by start time, averaged over at most MAX_POINTS equal time bins."""
    if steps.empty:
        return pd.DataFrame(columns=cols)
    t = steps["start_s"].to_numpy(dtype=float)
    values = steps[cols].astype(float).set_axis(t)
    if len(steps) <= MAX_POINTS:
        return values
    span = max(t.max() - t.min(), 1e-9)
    bins = np.minimum(((t - t.min()) / span * MAX_POINTS).astype(int), MAX_POINTS - 1)
    return values.groupby(t.min() + (bins + 0.5) * span / MAX_POINTS).mean()


def sweep_bars(df: pd.DataFrame, labels: list[str], title: str) -> Figure:
    """p99 TTFT and output throughput per run, one bar per run, in the order of the runs table."""
    metrics = [m for m in ("p99_ttft_ms", "output_throughput") if m in df.columns]
    labels = [textwrap.fill(label, 40) for label in labels]  # long labels wrap instead of being cut
    lines = max(label.count("\n") + 1 for label in labels)
    fig = Figure(figsize=(10, 1.8 + 0.3 * lines * len(df)), layout="constrained")
    fig.suptitle(textwrap.fill(title, 120), fontsize=9)
    if not metrics:
        _no_data(fig.subplots())
        return fig
    y = np.arange(len(df))
    axes = np.atleast_1d(fig.subplots(1, len(metrics), sharey=True))
    for ax, metric in zip(axes, metrics, strict=True):
        values = df[metric].astype(float).fillna(0.0).to_numpy()
        name = f"{metric} (tok/s)" if metric.endswith("_throughput") else metric
        if metric.endswith("_ms"):
            divisor, unit = time_unit(values.max(initial=0.0))
            values, name = values / divisor, f"{metric.removesuffix('_ms')} ({unit})"
        ax.barh(y, values)
        ax.set(title=name, yticks=y, yticklabels=labels)
        ax.grid(axis="x", alpha=0.3)
    axes[0].invert_yaxis()  # first run on top, as in the table; the axes share y
    return fig


def _no_data(ax: Any) -> None:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes (100 dpi), for a report to write or embed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()
