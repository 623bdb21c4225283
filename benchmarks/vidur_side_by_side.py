"""Vidur's prediction beside this simulator's on fidelity workloads (GitHub issue 5, section 4).

    python benchmarks/vidur_side_by_side.py [--cases sharegpt_saturated azure_code] [--venv /tmp/vidur-venv]
        [--workdir /tmp/vidur-work] [--out reports/fidelity_vidur.md]

Each case's request list (arrivals, prompt and output lengths) comes from reports/fidelity/<case>/engine/
requests.parquet and is written as a Vidur/splitwise CSV (arrived_at in seconds, num_prefill_tokens,
num_decode_tokens) into reports/fidelity_vidur/<case>.csv. Both simulators replay that CSV with the one
configuration whose Vidur profiles are complete here: CodeLlama-34B, A100, tensor parallel 2, pairwise
NVLink. Ours runs with vLLM V1's defaults, with V0's knobs (no prefix caching, no chunked prefill) and with
V0's knobs plus Vidur's batch cap of 128; Vidur runs through benchmarks/vidur_baseline.py (its own venv, CPU).
Every figure is computed from per-request records with the same definitions for both simulators.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from servebench.workbench.workloads import load_workload  # noqa: E402
from sim_speed import CASES as SPEED_CASES  # noqa: E402
from vidur_baseline import (  # noqa: E402
    DEFAULT_VENV,
    DEFAULT_WORKDIR,
    MODEL,
    TP,
    VIDUR_VERSION,
    column,
    run_vidur,
)

FIDELITY = REPO / "reports" / "fidelity"
DEFAULT_CASES = ("sharegpt_saturated", "azure_code")
DEFAULT_OUT = REPO / "reports" / "fidelity_vidur.md"
V0 = SPEED_CASES["codellama_34b/a100/tp2/v0"]
OURS = {
    "ours, V1 defaults": SPEED_CASES["codellama_34b/a100/tp2"],
    "ours, V0 knobs": V0,
    "ours, V0 knobs, max_num_seqs=128": [*V0, "scheduler.max_num_seqs=128"],
}
VIDUR = f"Vidur {VIDUR_VERSION} (vllm scheduler, warm)"
COLUMNS = ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "e2e_p50_ms", "e2e_p99_ms",
           "req_per_s", "out_tok_per_s", "wall_s")
NOTES = "<!-- hand-written notes: kept by reruns -->"
HEADERS = ("TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms", "E2E p50 ms", "E2E p99 ms",
           "req/s", "output tok/s", "wall s")


def write_trace(case: str, out_dir: Path) -> Path:
    """The case's requests as a splitwise-format CSV. Requests the engine rejected (prompt longer than
    Llama-2-7B's context) carry no output count in requests.parquet; theirs come from the case's workload."""
    engine = FIDELITY / case / "engine"
    req = pd.read_parquet(engine / "requests.parquet")
    rejected = req["finish_reason"] != "length"
    if rejected.any():
        spec = json.loads((engine / "summary.json").read_text())["config"]["workload"]
        asked = load_workload(spec).set_index("request_id")
        ids = req.loc[rejected, "request_id"]
        if not (asked.loc[ids, "prompt_tokens"].to_numpy() == req.loc[rejected, "prompt_tokens"]).all():
            raise ValueError(f"{case}: workload {spec['name']} does not reproduce the engine's prompts")
        req.loc[rejected, "output_tokens"] = asked.loc[ids, "output_tokens"].to_numpy()
    req = req.sort_values("arrival_s", kind="stable")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{case}.csv"
    pd.DataFrame({"arrived_at": req["arrival_s"].round(6), "num_prefill_tokens": req["prompt_tokens"],
                  "num_decode_tokens": req["output_tokens"]}).to_csv(path, index=False)
    return path


def latency_stats(arrival: np.ndarray, ttft: np.ndarray, e2e: np.ndarray,
                  out: np.ndarray) -> dict[str, float]:
    """Seconds in; ms, requests/s and output tokens/s out. TPOT = (E2E - TTFT) / (output - 1), output > 1;
    throughput over first arrival -> last finish."""
    many = out > 1
    tpot = (e2e[many] - ttft[many]) / (out[many] - 1)
    span = float((arrival + e2e).max() - arrival.min())
    stats = {"requests": len(arrival), "req_per_s": len(arrival) / span,
             "out_tok_per_s": float(out.sum()) / span}
    for name, values in (("ttft", ttft), ("tpot", tpot), ("e2e", e2e)):
        for q in (50, 99):
            stats[f"{name}_p{q}_ms"] = float(np.percentile(values, q)) * 1e3
    return stats


def run_ours(trace: Path, overrides: Sequence[str]) -> dict[str, float]:
    """One fresh simulator process on the splitwise CSV; wall time measured from outside, start-up in."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "workbench", "workload=splitwise_conv", f"workload.path={trace}",
               "report=false", "progress=false", f"hydra.run.dir={tmp}", *overrides]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL)
        _, status, _ = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        if status:
            raise SystemExit(f"simulator run failed: {' '.join(cmd)}")
        req = pd.read_parquet(Path(tmp) / "requests.parquet")
    done = req[req["finish_reason"] == "length"]
    if len(done) != len(req):
        raise RuntimeError(f"{trace.name}: {len(req) - len(done)} requests did not finish: "
                           f"{req['finish_reason'].value_counts().to_dict()}")
    arrival = done["arrival_s"].to_numpy(float)
    stats = latency_stats(arrival, done["first_token_s"].to_numpy(float) - arrival,
                          done["finish_s"].to_numpy(float) - arrival, done["output_tokens"].to_numpy(float))
    return {**stats, "wall_s": wall}


def run_vidur_case(trace: Path, venv: Path, workdir: Path) -> dict[str, float]:
    result = run_vidur(trace, venv, workdir)
    with open(result["metrics_csv"], newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: int(r["Request Id"]))
    arrival = pd.read_csv(trace)["arrived_at"].to_numpy(float)  # Vidur numbers requests in trace order
    if len(rows) != len(arrival):
        raise RuntimeError(f"Vidur simulated {len(rows)} of {len(arrival)} requests ({result['log']})")
    stats = latency_stats(arrival, np.array(column(rows, "prefill_e2e_time")),
                          np.array(column(rows, "request_e2e_time")),
                          np.array(column(rows, "request_num_decode_tokens")))
    return {**stats, "wall_s": result["wall_s"], "warm": result["warm"], "log": result["log"]}


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.2f}" if abs(x) >= 1 else f"{x:.3f}"


def table(results: dict[str, dict[str, dict]]) -> list[str]:
    lines = ["| workload | simulator | " + " | ".join(HEADERS) + " |", "|---|---|" + "---|" * len(HEADERS)]
    for case, runs in results.items():
        for name, r in runs.items():
            lines.append(f"| {case} | {name} | " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |")
    return lines


def write_report(results: dict[str, dict[str, dict]], traces: dict[str, Path], out: Path, argv: str) -> None:
    requests = ", ".join(f"{c}: {next(iter(r.values()))['requests']}" for c, r in results.items())
    lines = [
        "# Against Vidur: CodeLlama-34B on A100, TP 2",
        "",
        f"Regenerate: `{argv}` (Vidur {VIDUR_VERSION} in its own venv on the CPU, set up by "
        "`benchmarks/vidur_baseline.py --setup`; its first run fits its random forests, ~25 min on 2 cores).",
        "",
        f"Model and card: {MODEL}, A100-80GB, tensor parallel {TP}, pairwise NVLink, the one configuration "
        "whose Vidur profiles are complete here (the H100 Llama-2-7B profile the engine cases above use has "
        "`mlp.csv` but no `attention.csv`). **There is no A100 engine here, so neither simulator has ground "
        "truth on this card**: this compares two predictions, not a prediction with a measurement.",
        "",
        "Requests: the fidelity cases' own request lists (arrivals, prompt and output lengths, from "
        "`reports/fidelity/<case>/engine/requests.parquet`), written as splitwise CSVs "
        f"({', '.join(f'`{p.relative_to(REPO)}`' for p in traces.values())}; requests {requests}). "
        "azure_code's 32 prompts longer than Llama-2-7B's 4,096-token context, rejected by the engine, are "
        "kept with the trace's output lengths: CodeLlama-34B's 16,384-token context admits them. Ours: "
        "`model=codellama_34b hardware=a100_80g parallel=tp2 backend.step_time=vidur workload=splitwise_conv "
        "workload.path=<csv>`, V0 knobs = `cache.enable_prefix_caching=false "
        "scheduler.enable_chunked_prefill=false`. Vidur: `benchmarks/vidur_baseline.py`'s command line "
        "(vllm replica scheduler, batch cap 128, 16,384 tokens per batch, random-forest predictor).",
        "",
        "Same definitions for both: TTFT = first token - arrival (Vidur: `prefill_e2e_time`), TPOT = (E2E - "
        "TTFT) / (output tokens - 1) over requests with more than one output token, throughput = requests "
        "(or output tokens) / (last finish - first arrival). Wall s: one fresh process each, measured from "
        "outside on this 2-core CPU machine, start-up included (Vidur's is warm: its fitted models were "
        "cached; its cold first fit took 1,465 s, `benchmarks/RESULTS.md`).",
        "",
        *table(results),
        "",
    ]
    old = out.read_text() if out.is_file() else ""
    if NOTES in old:  # the hand-written reading of the numbers below the marker survives a rerun
        lines.append(old[old.index(NOTES):].strip())
    out.write_text("\n".join(lines) + "\n")
    (out.parent / "fidelity_vidur" / "results.json").write_text(json.dumps(results, indent=1, default=str))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), help="reports/fidelity/<case> names")
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    traces = {case: write_trace(case, args.out.parent / "fidelity_vidur") for case in args.cases}
    results: dict[str, dict[str, dict]] = {}
    for case, trace in traces.items():
        runs = {name: run_ours(trace.resolve(), overrides) for name, overrides in OURS.items()}
        runs[VIDUR] = run_vidur_case(trace, args.venv, args.workdir)
        results[case] = runs
        print("\n".join(table({case: runs})), flush=True)
    cmd = "python benchmarks/vidur_side_by_side.py"
    if list(args.cases) != list(DEFAULT_CASES):
        cmd += " --cases " + " ".join(args.cases)
    write_report(results, traces, args.out, cmd)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
