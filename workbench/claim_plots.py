"""The figure of each claim kind: a metric along a parameter (value, capacity, trend), paired bars
(change), GPUs against goodput per GPU (search)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from servebench.workbench.sweep_groups import groups, label


def metric_along(df: pd.DataFrame, claim: dict, x: str | None, guide_line: float | None = None,
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
        for values, g in groups(df, df, {x}):
            g = g.sort_values(x) if numeric else g
            ax.plot(g[x] if numeric else g[x].astype(str), g[metric].astype(float), marker="o",
                    label=label(values) or metric)
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


def change_bars(claim: dict, bars: dict[str, tuple[float, float]]) -> Figure:
    fig = Figure(figsize=(8, 1.5 + 0.5 * max(len(bars), 1)), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(bars))
    for offset, (i, name) in ((-0.2, (0, label(claim["from"]))), (0.2, (1, label(claim["to"])))):
        ax.barh(y + offset, [v[i] for v in bars.values()], height=0.4, label=name)
    ax.set(yticks=y, yticklabels=list(bars), xlabel=claim["metric"], title=claim["claim"])
    ax.tick_params(axis="y", labelsize=7)
    ax.invert_yaxis()
    ax.legend(fontsize=7)
    ax.grid(axis="x", alpha=0.3)
    return fig


def search_scatter(df: pd.DataFrame, claim: dict, ok: pd.Series) -> Figure:
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
