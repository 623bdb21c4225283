"""Reports of a run folder or a sweep folder: Markdown plus self-contained HTML, with PNG plots
(figures.py draws them, documents.py renders the sections)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from servebench.workbench.documents import Section, fmt, write_document
from servebench.workbench.figures import latency_cdf, png, sweep_bars, timeline
from servebench.workbench.metrics import latencies
from servebench.workbench.runs import Run, load_run, load_sweep

SWEEP_METRICS = ("request_throughput", "output_throughput", "goodput", "mean_ttft_ms", "p99_ttft_ms",
                 "mean_tpot_ms", "p99_tpot_ms", "num_preemptions", "prefix_cache_hit_rate", "mean_kv_usage")


def write_report(run: str | Path | Run) -> Path:
    """Write report.md, report.html, latency_cdf.png and timeline.png into the run's folder; return report.md.
    `run`: a complete run folder, or a Run in memory (a run writes its report before its summary.json)."""
    run = run if isinstance(run, Run) else load_run(run)
    title = run_title(run.config, run.summary)
    sections: list[Section] = [
        ("Metrics", "table", (["metric", "value"], [[k, fmt(v)] for k, v in run.summary.items()])),
        ("Latency CDFs", "image", ("latency_cdf.png", png(latency_cdf(latencies(run.requests), title)))),
        ("Over time", "image", ("timeline.png", png(timeline(run.steps, title)))),
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
        ("Comparison", "image", ("sweep.png", png(sweep_bars(df, labels, title)))),
    ]
    return write_document(Path(sweep_dir), "sweep_report", f"Sweep report: {Path(sweep_dir).name}", sections)


def runs_section(df: pd.DataFrame, metrics: tuple[str, ...] = SWEEP_METRICS,
                 params: str = "params") -> Section:
    """The table of a sweep's runs: folder, parameters (df.attrs[params]), headline metrics."""
    columns = ["run", *df.attrs[params], *(m for m in metrics if m in df.columns)]
    rows = [[fmt(v) for v in row] for row in df[columns].itertuples(index=False)]
    return ("Runs", "table", (columns, rows))


def config_section(config: dict[str, Any], title: str = "Resolved config") -> Section:
    """The resolved config as a YAML block."""
    return (title, "code", yaml.safe_dump(config, sort_keys=False) if config else "(none)")
