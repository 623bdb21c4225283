"""Reports of a run folder or a sweep folder: Markdown plus self-contained HTML, with PNG plots.

Figures are drawn on matplotlib's Agg canvas without pyplot, so importing this module leaves an interactive
session's backend alone. Time series are averaged into at most `MAX_POINTS` bins, so 100k-step runs plot fast.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import math
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from matplotlib.figure import Figure
from servebench.workbench.metrics import latencies
from servebench.workbench.runs import SUMMARY, Run, atomic_path, load_run, load_sweep

MAX_POINTS = 1000
SWEEP_METRICS = ("request_throughput", "output_throughput", "goodput", "mean_ttft_ms", "p99_ttft_ms",
                 "mean_tpot_ms", "p99_tpot_ms", "num_preemptions", "prefix_cache_hit_rate", "mean_kv_usage")
# A section is (title, kind, content): kind "table" -> (header, rows), "image" -> (file name, PNG bytes),
# "code" -> YAML text, "text" -> Markdown prose. One list renders to both Markdown and HTML.
Section = tuple[str, str, Any]


def write_report(run: str | Path | Run) -> Path:
    """Write report.md, report.html, latency_cdf.png and timeline.png into the run's folder; return report.md.
    `run`: a complete run folder, or a Run in memory (a run writes its report before its summary.json)."""
    run = run if isinstance(run, Run) else load_run(run)
    title = run_title(run.config, run.summary)
    sections: list[Section] = [
        ("Metrics", "table", (["metric", "value"], [[k, fmt(v)] for k, v in run.summary.items()])),
        ("Latency CDFs", "image", ("latency_cdf.png", png(_latency_cdf(latencies(run.requests), title)))),
        ("Over time", "image", ("timeline.png", png(_timeline(run.steps, title)))),
        config_section(run.config),
    ]
    return write_document(run.path, "report", f"Run report: {run.path.name}", sections)


def run_title(config: dict[str, Any], summary: dict[str, Any] | None = None,
              varied: tuple[str, ...] = ()) -> str:
    """What was run, for a figure shown alone: model, GPUs and card, workload and its speed, backend.
    Keys in `varied` (a sweep's axes) read "varied" instead of the first run's value."""
    def get(key: str, default: Any = None) -> Any:
        group, _, name = key.partition(".")
        return "varied" if key in varied else (config.get(group) or {}).get(name, default)

    tp, pp = get("parallel.tensor_parallel_size", 1), get("parallel.pipeline_parallel_size", 1)
    replicas = get("deployment.num_replicas", 1)
    layout = [f"TP {tp}", f"PP {pp}", f"{replicas} replicas"]
    layout = [part for part, n in zip(layout, (tp, pp, replicas), strict=True) if n != 1]
    gpus = tp * pp * replicas if all(isinstance(n, int) for n in (tp, pp, replicas)) else "varied"
    rate, scale = get("workload.request_rate"), get("workload.time_scale", 1)
    speed = f"{rate} req/s" if rate else (f"time x{scale}" if scale != 1 else "as recorded")
    n = (summary or {}).get("num_requests")
    count = f"{n:,} requests, " if isinstance(n, int) else ""
    step_time = (summary or {}).get("step_time_model")
    backend = get("backend.name", "?") + (f" ({step_time})" if isinstance(step_time, str) else "")
    return (f"{get('model.name', '?')} on {gpus} x {get('hardware.name', '?')}"
            + (f" ({', '.join(layout)})" if layout else "")
            + f"; {get('workload.name', '?')} ({count}{speed}); {backend}")


def write_sweep_report(sweep_dir: str | Path) -> Path:
    """sweep_report.md / .html and sweep.png comparing every run folder under sweep_dir."""
    df = load_sweep(sweep_dir)
    swept = df.attrs["swept"]
    labels = [", ".join(f"{p.rsplit('.', 1)[-1]}={fmt(r[p])}" for p in swept) or r["run"]
              for _, r in df.iterrows()]
    title = f"{run_title(df.attrs['config'], varied=tuple(swept))}; varied: {', '.join(swept) or 'nothing'}"
    sections: list[Section] = [
        runs_section(df),
        ("Comparison", "image", ("sweep.png", png(_sweep_bars(df, labels, title)))),
    ]
    return write_document(Path(sweep_dir), "sweep_report", f"Sweep report: {Path(sweep_dir).name}", sections)


def runs_section(df: pd.DataFrame, metrics: tuple[str, ...] = SWEEP_METRICS,
                 params: str = "params") -> Section:
    """The table of a sweep's runs: folder, parameters (df.attrs[params]), headline metrics."""
    columns = ["run", *df.attrs[params], *(m for m in metrics if m in df.columns)]
    rows = [[fmt(v) for v in row] for row in df[columns].itertuples(index=False)]
    return ("Runs", "table", (columns, rows))


def config_section(config: dict[str, Any], title: str = "Resolved config") -> Section:
    return (title, "code", yaml.safe_dump(config, sort_keys=False) if config else "(none)")


def main(argv: list[str] | None = None) -> None:
    """`workbench-report FOLDER...`: a run report for a run folder, a sweep report for a folder of runs (and
    the study report, into the study's report_dir, when the runs come from an experiment with a `study`)."""
    parser = argparse.ArgumentParser(prog="workbench-report", description=main.__doc__)
    parser.add_argument("folders", nargs="+", type=Path, help="run folders or sweep (multirun) folders")
    for folder in parser.parse_args(argv).folders:
        try:
            print(write_report(folder) if (folder / SUMMARY).is_file() else write_sweep_report(folder))
            if not (folder / SUMMARY).is_file() and load_sweep(folder).attrs["config"].get("study"):
                from servebench.workbench.study import write_study_report  # study builds on this module

                print(write_study_report(folder))
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"workbench-report: error: {e}")


# ---- figures ----

def time_unit(ms: float) -> tuple[float, str]:
    """(divisor, unit) that shows `ms` (the largest value) as a number a reader takes in at a glance."""
    for divisor, unit in ((60_000.0, "min"), (1000.0, "s")):
        if ms >= 10 * divisor:
            return divisor, unit
    return 1.0, "ms"


def _latency_cdf(latency: pd.DataFrame, title: str) -> Figure:
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


def _timeline(steps: pd.DataFrame, title: str) -> Figure:
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


def _sweep_bars(df: pd.DataFrame, labels: list[str], title: str) -> Figure:
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
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


# ---- documents ----

def write_document(folder: Path, stem: str, title: str, sections: list[Section]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for _, kind, content in sections:
        if kind == "image":
            _atomic_write(folder / content[0], content[1])
    _atomic_write(folder / f"{stem}.html", _html(title, sections).encode())
    _atomic_write(folder / f"{stem}.md", _markdown(title, sections).encode())
    return folder / f"{stem}.md"


def _atomic_write(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _markdown(title: str, sections: list[Section]) -> str:
    out = [f"# {title}"]
    for name, kind, content in sections:
        out.append(f"## {name}")
        if kind == "table":
            header, rows = content
            out.append("\n".join("| " + " | ".join(map(str, r)) + " |"
                                  for r in [header, ["---"] * len(header), *rows]))
        elif kind == "image":
            out.append(f"![{name}]({content[0]})")
        elif kind == "text":
            out.append(content.rstrip())
        else:
            out.append(f"```yaml\n{content.rstrip()}\n```")
    return "\n\n".join(out) + "\n"


def _html(title: str, sections: list[Section]) -> str:
    e = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>"
           "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
           "td,th{border:1px solid #ccc;padding:2px 8px}img{max-width:100%}"
           "pre{background:#f6f6f6;padding:1em}.text{white-space:pre-wrap}"
           f"</style></head><body><h1>{e(title)}</h1>"]
    for name, kind, content in sections:
        out.append(f"<h2>{e(name)}</h2>")
        if kind == "table":
            header, rows = content
            out.append(f"<table><tr>{_cells(header, 'th')}</tr>"
                       + "".join(f"<tr>{_cells(r, 'td')}</tr>" for r in rows) + "</table>")
        elif kind == "image":
            data = base64.b64encode(content[1]).decode()
            out.append(f"<img alt='{e(name)}' src='data:image/png;base64,{data}'>")
        elif kind == "text":
            out.append(f"<div class='text'>{e(content)}</div>")
        else:
            out.append(f"<pre>{e(content)}</pre>")
    return "\n".join(out) + "\n</body></html>\n"


def _cells(row: list[Any], tag: str) -> str:
    return "".join(f"<{tag}>{html.escape(str(c))}</{tag}>" for c in row)


def fmt(value: Any) -> str:
    if isinstance(value, float | np.floating):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return str(value)
