"""Case studies: a sweep's runs set against a guide's claims (claims.py), in a report with verdicts and
plots (claim_plots.py).

An experiment (`conf/experiment/*.yaml`) carries a `study` block: `name`, `title`, `command` (what
regenerates the report), `report_dir` (unset: the sweep folder; the committed reports pass
`study.report_dir=reports/NAME`), `notes` (Markdown), `x` (the parameter plots run along) and `claims`
(claims.py says what each kind checks).
`backend` (swept as `backend=sim,engine`) is not a condition: with runs of several backends the table puts
each backend's number and verdict side by side, rows joined on claim + condition; plots draw each backend's
line (it is a swept parameter like any other).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from servebench.workbench.claims import Verdict, evaluate
from servebench.workbench.documents import Section, write_document
from servebench.workbench.figures import png
from servebench.workbench.report import config_section, runs_section
from servebench.workbench.runs import load_sweep
from servebench.workbench.sweep_groups import BACKEND, SIM, missing

NOT_RUN = "not run"
COLUMNS = ("claim", "condition", "guide", "simulated", "verdict")  # a sim-only table and its claims.json


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
    return str(run.get("device")) if missing(card) else f"{card} (torch {run.get('torch')})"


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
