"""Simulator speed: wall seconds, peak memory and simulated requests per wall second.

    python benchmarks/sim_speed.py            # both cases, and Vidur beside the second
    python benchmarks/sim_speed.py --no-vidur
    python benchmarks/sim_speed.py --policies # case 1 with each non-default policy, against the default

Case 1: the whole Azure LLM 2023 conv trace (19,366 requests), Llama-2-7B on one A100-80GB, default knobs.
Case 2: the same trace, CodeLlama-34B on A100 with TP 2 (pairwise NVLink), Vidur's profiles, with vLLM V1's
default knobs and with V0's (what Vidur models), beside Vidur itself (its own venv, see
benchmarks/vidur_baseline.py) on the same trace in the same run.
Each simulator run is a fresh process (cold: nothing cached between runs), measured from outside.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRACE = "data/traces/AzureLLMInferenceTrace_conv.csv"
CODELLAMA_TP2 = ["model=codellama_34b", "hardware=a100_80g", "parallel=tp2", "backend.step_time=vidur"]
CASES = {
    "llama2_7b/a100/tp1": ["model=llama2_7b", "hardware=a100_80g", "parallel=tp1"],
    "codellama_34b/a100/tp2": CODELLAMA_TP2,
    # the knobs of vLLM V0, which Vidur's scheduler models: no prefix caching, no chunked prefill
    "codellama_34b/a100/tp2/v0": [
        *CODELLAMA_TP2,
        "cache.enable_prefix_caching=false",
        "scheduler.enable_chunked_prefill=false",
    ],
}

# Each non-default policy of engine/core (README "Scheduler and cache knobs"), run on case 1.
POLICIES = [
    ["scheduler.queue_policy=priority"], ["scheduler.queue_policy=shortest_prompt"],
    ["scheduler.queue_policy=edf"], ["scheduler.victim_policy=lowest_priority"],
    ["scheduler.victim_policy=least_computed"], ["scheduler.victim_policy=most_blocks"],
    ["scheduler.preemption_mode=swap"], ["scheduler.preemption_mode=cost"],
    ["scheduler.max_waiting=500"], ["scheduler.shed_ttft_ms=20000"],
    ["cache.eviction_policy=lfu"], ["cache.eviction_policy=cost"],
    ["scheduler.max_num_partial_prefills=2", "scheduler.max_long_partial_prefills=1"],
]


def run_sim(overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "workbench",
            "workload=azure_conv",
            f"workload.path={TRACE}",
            "report=false",
            "progress=false",
            f"hydra.run.dir={tmp}",
            *overrides,
        ]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak, not the max over all children
        wall = time.perf_counter() - t0
        if status:
            raise SystemExit(f"simulator run failed: {' '.join(cmd)}")
        summary = json.loads((Path(tmp) / "summary.json").read_text())
    return {
        "wall_s": wall,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "requests": summary["num_requests"],
        "sim_req_per_wall_s": summary["num_requests"] / wall,
        "median_ttft_ms": summary["median_ttft_ms"],
        "median_tpot_ms": summary["median_tpot_ms"],
        "median_e2el_ms": summary["median_e2el_ms"],
        "step_time_model": summary.get("step_time_model"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-vidur", action="store_true", help="skip the Vidur baseline")
    ap.add_argument("--vidur-venv", default="/tmp/vidur-venv")
    ap.add_argument("--repeat", type=int, default=3, help="fresh runs per case; the median run is shown")
    ap.add_argument("--policies", action="store_true", help="the cost of each non-default policy on case 1")
    args = ap.parse_args()
    if args.policies:
        policy_costs(args.repeat)
        return
    results = {}
    for name, overrides in CASES.items():
        runs = sorted((run_sim(overrides) for _ in range(args.repeat)), key=lambda r: r["wall_s"])
        results[name] = {**runs[len(runs) // 2], "all_wall_s": [round(r["wall_s"], 2) for r in runs]}
    if not args.no_vidur:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from vidur_baseline import run_vidur

        results["vidur codellama_34b/a100/tp2"] = run_vidur(
            REPO / "data/traces/splitwise_conv.csv", Path(args.vidur_venv), None
        )
    cols = [
        "wall_s",
        "peak_rss_mb",
        "sim_req_per_wall_s",
        "median_ttft_ms",
        "median_tpot_ms",
        "median_e2el_ms",
    ]
    print(f"{'case':34s}" + "".join(f"{c:>20s}" for c in cols))
    for name, r in results.items():
        print(f"{name:34s}" + "".join(f"{r.get(c, float('nan')):20.2f}" for c in cols))
    print(json.dumps(results, indent=1, default=str))


def policy_costs(repeat: int) -> None:
    base_case = CASES["llama2_7b/a100/tp1"]

    def median_wall(extra: list[str]) -> float:
        return sorted(run_sim(base_case + extra)["wall_s"] for _ in range(repeat))[repeat // 2]

    base = median_wall([])
    print(f"{'policy (case 1)':72s}{'wall_s':>10s}{'vs default':>12s}")
    print(f"{'default':72s}{base:10.2f}{1.0:12.2f}")
    for extra in POLICIES:
        wall = median_wall(extra)
        print(f"{' '.join(extra):72s}{wall:10.2f}{wall / base:12.2f}")


if __name__ == "__main__":
    main()
