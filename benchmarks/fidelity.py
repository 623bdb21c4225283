"""Simulator fidelity: the same workloads on the engine (H200) and on the simulator calibrated on it.

    python benchmarks/fidelity.py gpu        # on the GPU: engine run folders under reports/fidelity_h200/
    python benchmarks/fidelity.py compare    # CPU: simulate the same, write reports/fidelity.{json,md}
    python benchmarks/fidelity.py gpu --tiny --device cpu --runs /tmp/f   # CPU smoke test, tiny model

`gpu` needs no Hydra or SimPy: configs are composed from conf/*.yaml here. Cases have a role: `calibration`
(the step-time model may be fitted on them), `heldout` (judged; each runs twice, `engine` and `engine_rerun`,
for the engine's own spread) and `sweep` (the policy ranking). Consecutive runs that share the engine's knobs
reuse one loaded model (`LLMEngine.reset` between runs). `compare` reruns the simulator on each engine
run's own resolved config (`--step-time`, default auto: the calibration where there is one; the engine's KV
block count, sync or async scheduling, CUDA graphs), and compares p50/p99 TTFT, TPOT and E2E, output
throughput, preemptions and prefix-cache hit rate, beside the engine's own spread; per-step terms (decode,
prefill, mixed steps and the host gap) tell which part of the step-time model is off; the sweep's orders by
p50 E2E etc. are compared by Kendall's tau.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import yaml
from servebench.engine.config import CUDAGRAPH_MODES

REPO = Path(__file__).resolve().parents[1]

if TYPE_CHECKING:
    from servebench.workbench.runs import Run
CONF = REPO / "conf"
RUNS = REPO / "reports" / "fidelity_h200"  # engine run folders: <case>/{engine,engine_rerun,sim}
SWEEP = "sweep"  # case-name prefix of the policy sweep
# metric -> (summary key, target |relative error|; None: reported only)
METRICS = {
    "p50_ttft_ms": ("median_ttft_ms", 0.03), "p99_ttft_ms": ("p99_ttft_ms", 0.08),
    "p50_tpot_ms": ("median_tpot_ms", 0.03), "p99_tpot_ms": ("p99_tpot_ms", 0.08),
    "p50_e2el_ms": ("median_e2el_ms", 0.03), "p99_e2el_ms": ("p99_e2el_ms", 0.08),
    "output_throughput": ("output_throughput", 0.02),
    "num_preemptions": ("num_preemptions", None), "prefix_cache_hit_rate": ("prefix_cache_hit_rate", None),
}
SWEEP_RANK_BY = ("median_e2el_ms", "median_ttft_ms", "median_tpot_ms")
# compare also simulates each case with every step's device time this much shorter and longer
# (backend.device_time_scale): how far the simulator's own metrics move for a change far below any step-time
# model's error says where a case is chaotic (which request a preemption takes turns on a few microseconds)
SENSITIVITY = 0.002


@dataclass(slots=True)
class Case:
    name: str
    workload: str
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted keys: workload.request_rate, ...
    what: str = ""
    role: str = "heldout"  # calibration (fitted on) | heldout (judged; run twice) | sweep (ranked)


ROLES = ("calibration", "heldout", "sweep")
CHUNKING = {True: "on (256-token budget)", False: "off"}
SHAREGPT = {"workload.output_len": {"dist": "lognormal", "median": 129, "sigma": 0.99, "max": 1000}}
ASYNC = {"backend.async_scheduling": True}
CASES = [
    Case("cal_sharegpt_poisson", "sharegpt", {"workload.num_requests": 250, "workload.request_rate": 25},
         "ShareGPT prompts, Poisson 25 req/s", "calibration"),
    Case("cal_conv_window", "azure_conv", {"workload.duration_s": 45, "workload.time_scale": 0.25},
         "Azure 2023 conv trace, its first 45 s at 4x speed (the issue's conversation window)",
         "calibration"),
    Case("cal_sharegpt_async", "sharegpt",
         {"workload.num_requests": 250, "workload.request_rate": 60, **ASYNC},
         "ShareGPT prompts, Poisson 60 req/s, async scheduling", "calibration"),
    Case("cal_synthetic_swap", "synthetic",
         {"workload.num_requests": 120, "workload.request_rate": 20,
          "workload.input_len": {"dist": "uniform", "min": 128, "max": 1024},
          "workload.output_len": {"dist": "uniform", "min": 64, "max": 512},
          "cache.num_gpu_blocks_override": 360, "scheduler.preemption_mode": "swap"},
         "synthetic prompts (128-1k tokens, 64-512 out), 20 req/s on 360 KV blocks, swap preemption: the "
         "swap cost where no profile gives it", "calibration"),
    Case("ho_code_burst_async", "azure_code",
         {"workload.duration_s": 90, "workload.time_scale": 0.2, **ASYNC},
         "Azure 2023 code trace, its first 90 s at 5x speed (bursty, long prompts), async scheduling"),
    Case("ho_sharegpt_bursty_nochunk", "sharegpt",
         {"workload.num_requests": 250, "workload.request_rate": 40, "workload.cv": 3.0,
          "scheduler.enable_chunked_prefill": False},
         "ShareGPT prompts, 40 req/s in bursts (Gamma gaps, CV 3), chunked prefill off"),
    Case("ho_kv_pressure", "sharegpt",
         {"workload.num_requests": 150, "workload.request_rate": 40, "cache.num_gpu_blocks_override": 400},
         "ShareGPT 40 req/s on a 6,400-token KV cache (400 blocks), recompute preemption"),
    Case("ho_mt_bench_prefix_async", "mt_bench",
         {"workload.num_requests": 120, "workload.request_rate": 16, "workload.cv": 2.0,
          "cache.enable_prefix_caching": True, **ASYNC},
         "MT-Bench 2 turns (turn 2 shares turn 1 + answer), 16 req/s (CV 2), prefix caching, async"),
    Case("ho_long_prompts", "synthetic",
         {"workload.num_requests": 80, "workload.request_rate": 10,
          "workload.input_len": {"dist": "uniform", "min": 1024, "max": 3072},
          "workload.output_len": {"dist": "uniform", "min": 32, "max": 256}},
         "synthetic long prompts (1-3k tokens), 10 req/s Poisson: prefill-heavy mixed steps"),
    Case("ho_sharegpt_overload_async", "sharegpt",
         {"workload.num_requests": 400, "workload.request_rate": 120, **ASYNC},
         "ShareGPT prompts, Poisson 120 req/s (overloaded: batches of up to 256), async scheduling"),
] + [
    # KV pressure in every configuration, so the preemption mode always matters; chunked prefill with a
    # 256-token budget against whole prompts (budget max_model_len), so the chunking does too
    Case(f"sweep_chunked_{'on' if c else 'off'}_seqs{n}_{mode}", "sharegpt",
         {"workload.num_requests": 120, "workload.request_rate": 40, "cache.num_gpu_blocks_override": 330,
          "scheduler.enable_chunked_prefill": c, "scheduler.max_num_batched_tokens": 256 if c else None,
          "scheduler.max_num_seqs": n, "scheduler.preemption_mode": mode},
         f"policy sweep, ShareGPT 40 req/s on 330 KV blocks: chunked prefill {CHUNKING[c]}, "
         f"max_num_seqs {n}, {mode} preemption", "sweep")
    for c in (True, False) for n in (24, 128) for mode in ("recompute", "swap")
]
TINY = {"model": "tiny_llama", "backend.dtype": "float32", "workload.num_requests": 12,
        "workload.request_rate": 40}
TINY_CASES = ("cal_sharegpt_poisson", "cal_sharegpt_async", "ho_kv_pressure", "ho_mt_bench_prefix_async",
              "sweep_chunked_on_seqs24_swap", "sweep_chunked_off_seqs128_recompute")
TINY_KV = {"cache.num_gpu_blocks_override": 40}  # 640 tokens: preemption at once on the tiny model
RERUN = "engine_rerun"  # the second engine run of a held-out case, beside `engine`: the engine's own spread


# ---- configs without Hydra ----

def _group(group: str, option: str) -> dict:
    path = CONF / group / f"{option}.yaml"
    node = yaml.safe_load(path.read_text()) or {}
    merged: dict = {}
    for parent in node.pop("defaults", []):
        merged |= _group(group, parent) if parent != "_self_" else {}
    return merged | node


def compose(groups: dict[str, str], overrides: dict[str, Any]) -> dict[str, Any]:
    """conf/config.yaml's defaults with `groups` swapped in, then dotted `overrides` (as Hydra would)."""
    top = yaml.safe_load((CONF / "config.yaml").read_text())
    cfg: dict[str, Any] = {}
    for entry in top.pop("defaults"):
        if entry == "_self_":
            continue
        (group, option), = entry.items()
        cfg[group] = _group(group, groups.get(group, option))
    cfg |= {k: v for k, v in top.items() if k != "hydra"}
    for key, value in overrides.items():
        node, *path, leaf = [cfg, *key.split(".")]
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return cfg


def case_config(case: Case, model: str, hardware: str, device: str, tiny: bool,
                cudagraph_mode: str | None = None) -> dict[str, Any]:
    groups = {"backend": "engine", "model": "tiny_llama" if tiny else model, "hardware": hardware,
              "workload": case.workload}
    over = {**(SHAREGPT if case.workload == "sharegpt" else {}), **case.overrides, "backend.device": device,
            "report": False, "progress": False}
    if cudagraph_mode:
        over["backend.cudagraph_mode"] = cudagraph_mode
    if tiny:
        over |= {k: v for k, v in TINY.items() if k != "model"}
        over |= TINY_KV if "cache.num_gpu_blocks_override" in case.overrides else {}
    return compose(groups, over) | {"fidelity_case": case.what, "fidelity_role": case.role}


def engine_key(cfg: dict[str, Any]) -> str:
    """Runs with equal keys can share one loaded engine."""
    knobs = {k: cfg[k] for k in ("backend", "model", "scheduler", "cache", "parallel")}
    return json.dumps(knobs, sort_keys=True)


# ---- gpu: the engine runs ----

def engine_runs(cases: list[Case]) -> list[tuple[Case, str]]:
    """(case, run folder name) in the order they run: by role, a held-out case twice in a row (its rerun
    measures the engine's own spread); within a role, cases sharing an engine's knobs are not reordered."""
    return [(c, folder) for role in ROLES for c in cases if c.role == role
            for folder in (("engine", RERUN) if role == "heldout" else ("engine",))]


def run_gpu(runs: Path, model: str, hardware: str, device: str, tiny: bool, budget_s: float,
            only: list[str] | None, roles: list[str], cudagraph_mode: str | None = None) -> None:
    from servebench.workbench.engine_backend import build_engine
    from servebench.workbench.experiment import run_experiment

    t0 = time.perf_counter()
    cases = [c for c in CASES if c.role in roles and (not tiny or c.name in TINY_CASES)
             and (not only or c.name in only)]
    engine, key = None, None
    for case, folder in engine_runs(cases):
        if time.perf_counter() - t0 > budget_s:
            _log(f"{case.name}/{folder}: skipped, budget of {budget_s:.0f} s spent")
            continue
        cfg = case_config(case, model, hardware, device, tiny, cudagraph_mode)
        try:
            if engine_key(cfg) != key:
                engine = key = None
                _free_gpu()
                engine, key = build_engine(cfg), engine_key(cfg)
                _log(f"engine ready ({case.name}'s knobs), {time.perf_counter() - t0:.0f} s")
            cpu0 = time.process_time()
            s = run_experiment(cfg, runs / case.name / folder, engine=engine)
            # Host-bound steps slow down when the host is busy: how many cores this process kept busy
            # (a lingering thread shows here) and how many threads it has, beside each run's figures.
            cores = (time.process_time() - cpu0) / max(s["duration_s"], 1e-9)
            _log(f"{case.name}/{folder}: {s['num_finished']} requests, {s['duration_s']:.1f} s, "
                 f"p50 TTFT {s['median_ttft_ms']:.1f} ms, p50 TPOT {s['median_tpot_ms']:.2f} ms, "
                 f"{s['num_preemptions']} preemptions; {cores:.2f} cores busy, "
                 f"{threading.active_count()} threads; total {time.perf_counter() - t0:.0f} s")
        except Exception:  # one failed case must not cost the others
            _log(f"{case.name}/{folder}: FAILED\n{traceback.format_exc()}")
            engine = key = None


def _free_gpu() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- compare: the simulator on the same workloads ----

def sim_config(engine_summary: dict[str, Any], profile_root: Path | None, step_time: str) -> dict[str, Any]:
    """The engine run's own config on the simulator: the engine's KV block count, scheduling mode (sync or
    async) and CUDA graphs (none on a CPU engine)."""
    cfg = copy.deepcopy(engine_summary["config"])
    engine = cfg["backend"]
    eager = engine.get("enforce_eager", False) or engine_summary.get("device") == "cpu"
    cfg["backend"] = {"name": "sim", "step_time": step_time, "enforce_eager": eager,
                      "async_scheduling": engine.get("async_scheduling", False),
                      "cudagraph_mode": engine.get("cudagraph_mode", "FULL_DECODE_ONLY"),  # older: theirs
                      "profile_root": str(profile_root) if profile_root else None}
    cfg["cache"]["num_gpu_blocks_override"] = engine_summary["num_gpu_blocks"]
    cfg |= {"report": False, "progress": False}
    return cfg


def compare(runs: Path, out: Path, profile_root: Path | None = None, step_time: str = "auto",
            sensitivity: float = SENSITIVITY) -> dict[str, Any]:
    from servebench.workbench.experiment import run_experiment
    from servebench.workbench.runs import load_run

    cases = {}
    found = calibration_metas(runs, profile_root)
    # case/engine of each run fitted on: the same runs when the folders are copied elsewhere
    fitted = {Path(r).parts[-2:] for meta in found.values() for r in meta.get("runs") or []}
    for folder in sorted(p.parent for p in runs.glob("*/engine/summary.json")):
        engine, sim_dir, rerun = load_run(folder), folder.parent / "sim", folder.parent / RERUN
        summary = engine.summary | {"config": engine.config}
        cfg = sim_config(summary, profile_root, step_time)
        run_experiment(cfg, sim_dir)
        other = load_run(rerun) if (rerun / "summary.json").is_file() else None
        case = case_result(engine, load_run(sim_dir), other, _nudged(cfg, sensitivity))
        if folder.parts[-2:] in fitted and case["role"] != "calibration":
            case["role"] += ", fitted on"  # a case the calibration saw is no test of it
        cases[folder.parent.name] = case
    if not cases:
        raise SystemExit(f"fidelity: error: no engine runs under {runs} (*/engine/summary.json)")
    calibrations = {name: {k: meta.get(k) for k in ("runs", "fit_error", "heldout_error")}
                    for name, meta in found.items()}
    result = {"cases": cases, "sweep": sweep_ranking(cases), "calibrations": calibrations}
    out.mkdir(parents=True, exist_ok=True)
    (out / "fidelity.json").write_text(json.dumps(_rounded(result), indent=2, allow_nan=False) + "\n")
    write_markdown(result, runs, out)
    return result


def _nudged(cfg: dict[str, Any], sensitivity: float) -> list[dict[str, Any]]:
    """The simulator's summaries of `cfg` with every device time `sensitivity` shorter and longer."""
    from servebench.workbench.experiment import run_experiment
    from servebench.workbench.runs import load_run

    summaries = []
    for scale in (1 - sensitivity, 1 + sensitivity) if sensitivity else ():
        nudged = copy.deepcopy(cfg)
        nudged["backend"]["device_time_scale"] = scale
        with tempfile.TemporaryDirectory() as tmp:
            run_experiment(nudged, Path(tmp) / "sim")
            summaries.append(load_run(Path(tmp) / "sim").summary)
    return summaries


def calibration_metas(runs: Path, profile_root: Path | None) -> dict[str, dict[str, Any]]:
    """The meta (runs fitted on, per-step errors) of each calibration the simulated runs could use."""
    from servebench.sim.calibrated import CALIBRATION_FILE
    from servebench.sim.profile_step_time import DEFAULT_PROFILE_ROOT

    found = {}
    for summary in runs.glob("*/engine/summary.json"):
        cfg = json.loads(summary.read_text())["config"]
        path = Path(profile_root or DEFAULT_PROFILE_ROOT) / cfg["hardware"]["name"] / cfg["model"]["name"]
        if (path / CALIBRATION_FILE).is_file():
            meta = json.loads((path / CALIBRATION_FILE).read_text()).get("meta", {})
            file = (path / CALIBRATION_FILE).resolve()
            # Relative to the checkout, so that the committed report reproduces from any clone.
            name = str(file.relative_to(REPO)) if file.is_relative_to(REPO) else str(file)
            found[name] = meta
    return found


def case_result(engine: Run, sim: Run, rerun: Run | None,
                nudged: list[dict[str, Any]] | tuple = ()) -> dict[str, Any]:
    """Each metric's simulator error, the engine's own spread (its rerun against it) and whether the error is
    within the target, or within the spread where that is larger; and how far the simulator's own metric
    moves with its device times SENSITIVITY shorter or longer (`nudged`: those runs' summaries)."""
    metrics = {}
    for name, (key, target) in METRICS.items():
        e, s = engine.summary.get(key), sim.summary.get(key)
        spread = _rel(rerun.summary.get(key), e) if rerun else None
        spread = None if spread is None else abs(spread)
        moves = [abs(r) for r in (_rel(n.get(key), s) for n in nudged) if r is not None]
        err = _rel(s, e)
        allowed = None if target is None else max(target, spread or 0.0)
        metrics[name] = {"engine": e, "sim": s, "rel_error": err, "engine_spread": spread,
                         "sim_sensitivity": max(moves) if moves else None, "target": target,
                         "met": None if allowed is None or err is None else abs(err) <= allowed}
    return {"what": engine.config.get("fidelity_case", ""), "role": engine.config.get("fidelity_role", ""),
            "metrics": metrics,
            "step_terms": step_terms(engine.steps, sim.steps, rerun.steps if rerun else None),
            "step_time_model": sim.summary.get("step_time_model"),
            "step_time_stale": _text(sim.summary.get("step_time_stale")),
            "num_steps_outside_profile": sim.summary.get("num_steps_outside_profile"),
            "summaries": {b: {key: r.summary.get(key) for key, _ in METRICS.values()}
                          for b, r in (("engine", engine), ("sim", sim))}}


def _text(x: Any) -> str | None:
    """A summary's optional text (None or NaN when absent, as a run's summary may hold it)."""
    return x if isinstance(x, str) else None


def _rel(x: Any, ref: Any) -> float | None:
    return (x - ref) / ref if _finite(x) and _finite(ref) and ref else None


BATCH_BINS = (0, 8, 32, 128, 100_000)


def step_groups(steps: pd.DataFrame) -> dict[str, pd.Series]:
    """Masks of decode-only steps by batch size, prefill-only steps and mixed steps."""
    d, p = steps["num_decode_tokens"], steps["num_prefill_tokens"]
    bins = zip(BATCH_BINS, BATCH_BINS[1:])
    groups = {f"decode_b{lo + 1}-{hi}": (p == 0) & d.between(lo + 1, hi) for lo, hi in bins}
    return groups | {"prefill": (p > 0) & (d == 0), "mixed": (p > 0) & (d > 0)}


def step_periods(steps: pd.DataFrame) -> pd.Series:
    """Start-to-start time of each step followed at once by another (the loop was busy): the step and the
    host work after it, on the engine and in the simulator's loop alike."""
    period = np.append(np.diff(steps["start_s"].to_numpy()), np.nan)
    busy = (steps["num_running"] + steps["num_waiting"]).to_numpy() > 0
    return pd.Series(np.where(busy, period, np.nan), index=steps.index)


def step_terms(engine_steps: pd.DataFrame, sim_steps: pd.DataFrame,
               rerun_steps: pd.DataFrame | None = None) -> dict[str, Any]:
    """Median step period by kind of step, engine against simulator: the step-time model's term that is off
    shows as the kind whose periods differ (the workload and scheduler are the same on both sides); beside
    them the engine's rerun, where there is one (how much the engine's own steps of a kind vary)."""
    medians = {}
    for side, steps in (("engine", engine_steps), ("sim", sim_steps), ("rerun", rerun_steps)):
        if steps is not None:
            period = step_periods(steps)
            medians[side] = {name: (int(sel.sum()), period[sel].median())
                             for name, sel in step_groups(steps).items()}
    terms = {}
    for name, (e_n, e_med) in medians["engine"].items():
        s_n, s_med = medians["sim"][name]
        terms[name] = {"engine_steps": e_n, "sim_steps": s_n, "engine_ms": _ms(e_med), "sim_ms": _ms(s_med),
                       "rel_error": (s_med - e_med) / e_med if _finite(e_med) and _finite(s_med) else None}
        if "rerun" in medians:
            terms[name]["rerun_ms"] = _ms(medians["rerun"][name][1])
    e_period = step_periods(engine_steps)
    gap = (e_period - engine_steps["duration_s"]).median()
    terms["engine_host_gap"] = {"engine_ms": _ms(gap), "what": "median time from a step's end to the next "
                                "step's start (update, detokenize, loop): part of the profile's cpu term"}
    return terms


def sweep_ranking(cases: dict[str, Any]) -> dict[str, Any]:
    """The sweep's configurations best first by each of SWEEP_RANK_BY, engine and simulator, and Kendall's
    tau between the two orders (1: the same order)."""
    sweep = {k: v for k, v in cases.items() if k.startswith(SWEEP)}
    if len(sweep) < 2:
        return {}
    out = {}
    for key in SWEEP_RANK_BY:
        values = {b: [sweep[c]["summaries"][b][key] for c in sweep] for b in ("engine", "sim")}
        order = {b: sorted(sweep, key=lambda c, b=b: sweep[c]["summaries"][b][key]) for b in values}
        out[key] = {**order, "same_order": order["engine"] == order["sim"],
                    "kendall_tau": kendall_tau(values["engine"], values["sim"])}
    return out


def kendall_tau(a: list[float], b: list[float]) -> float:
    """(concordant - discordant pairs) / all pairs; ties count as neither."""
    pairs = [(i, j) for i in range(len(a)) for j in range(i + 1, len(a))]
    score = sum(np.sign(a[i] - a[j]) * np.sign(b[i] - b[j]) for i, j in pairs)
    return float(score / len(pairs))


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _ms(x: float) -> float | None:
    return x * 1e3 if _finite(x) else None


def _rounded(x: Any) -> Any:
    """6 significant digits: the JSON a rerun reproduces, free of float noise."""
    if isinstance(x, float):
        return float(f"{x:.6g}") if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return x


# ---- the report ----

INTRO = ("Each workload ran on the engine (`backend=engine`) and on the simulator with the engine's "
         "own step times (`backend.step_time=auto`: the calibration of this model and card where there "
         "is one, else its profile; same config, KV block count, sync or async scheduling). Relative "
         "error = (sim - engine) / engine. Targets: p50 within 3 %, p99 within 8 %, throughput within "
         "2 %, or within the engine's own spread (a held-out case's second engine run against its "
         "first) where that is larger. Sim sensitivity: how far the simulator's own metric moves with "
         "every device time 0.2 % shorter or longer (`backend.device_time_scale`), far less than any "
         "step-time model's error; where that is as large as the miss, the case is chaotic (which request "
         "a preemption or a batch takes turns on microseconds), and no step-time model can do better than "
         "its engine's own run-to-run spread. Calibration cases, and any case marked 'fitted on', are those "
         "the calibration was fitted on; the others were not. Each case's step table shows where the "
         "time goes, and for a held-out case how its "
         "rerun's steps compare: steps replayed from CUDA graphs (decode steps; with cudagraph_mode "
         "FULL, the default, the steps that prefill too) repeat within a few per cent, eager prefill and "
         "mixed steps (the host launching every kernel: FULL_DECODE_ONLY) can differ by 2x between two "
         "runs of the same workload on the same card, which no step-time model predicts. The "
         "calibration used, what it was fitted on and its per-step errors follow the cases.")


def write_markdown(result: dict[str, Any], runs: Path, out: Path) -> None:
    from servebench.sim.calibrate import error_table

    lines = ["# Simulator fidelity against the engine", "",
             INTRO, "", *_summary_lines(result)]
    for name, case in result["cases"].items():
        lines += [f"## {name} ({case['role']})", "", case["what"], "",
                  f"Step-time model: {case['step_time_model']}; steps outside the profile: "
                  f"{case['num_steps_outside_profile']}." + (f" **{case['step_time_stale']}**"
                                                              if case["step_time_stale"] else ""), "",
                  "| metric | engine | sim | rel. error | engine spread | sim sensitivity | target | met |",
                  "|---|---|---|---|---|---|---|---|"]
        for metric, m in case["metrics"].items():
            target = f"{m['target']:.0%}" if m["target"] is not None else ""
            met = {True: "yes", False: "**no**", None: ""}[m["met"]]
            spread, moves = ("" if m.get(k) is None else f"{m[k]:.1%}" for k in ("engine_spread",
                                                                                 "sim_sensitivity"))
            lines.append(f"| {metric} | {_fmt(m['engine'])} | {_fmt(m['sim'])} | {_pct(m['rel_error'])} | "
                         f"{spread} | {moves} | {target} | {met} |")
        lines += ["", "Step periods (median ms) by kind of step:", "",
                  "| steps | engine n | sim n | engine ms | sim ms | rel. error | engine rerun ms |",
                  "|---|---|---|---|---|---|---|"]
        for term, t in case["step_terms"].items():
            if "engine_steps" in t:
                lines.append(f"| {term} | {t['engine_steps']} | {t['sim_steps']} | {_fmt(t['engine_ms'])} | "
                             f"{_fmt(t['sim_ms'])} | {_pct(t['rel_error'])} | {_fmt(t.get('rerun_ms'))} |")
        gap = case["step_terms"]["engine_host_gap"]["engine_ms"]
        lines += ["", f"Engine host gap between steps (median): {_fmt(gap)} ms.", "", *_misses(case), "",
                  f"![latency CDFs]({_plot(runs / name, out, name)})", ""]
    vidur = out / "fidelity_vidur.md"  # Vidur beside us (issue 5 section 4): benchmarks/vidur_side_by_side.py
    if vidur.is_file():
        table = [line for line in vidur.read_text().splitlines() if line.startswith("|")]
        lines += ["## Against Vidur", "",
                  f"Vidur's prediction beside ours is in [{vidur.name}]({vidur.name}) (regenerate: `python "
                  "benchmarks/vidur_side_by_side.py`): CodeLlama-34B on A100 with TP 2, the one configuration"
                  " whose Vidur profiles are complete (the H100 Llama-2-7B profile of the cases above has no "
                  "`attention.csv`), on two of these workloads' request lists. There is no A100 engine here, "
                  "so neither simulator has ground truth on that card. Its table (reasons for the differences"
                  " are given there):", "", *table, ""]
    for path, meta in result["calibrations"].items():
        lines += [f"## Per-step error of the calibration ({path})", "",
                  "Each step's relative error (sync runs: its duration; async runs: its device time), by "
                  "kind, on the calibration runs and on held-out runs (workbench-calibrate --heldout).", "",
                  "Fitted on: " + ", ".join(f"`{r}`" for r in meta.get("runs") or []) + ".", "",
                  *error_table(meta), ""]
    if result["sweep"]:
        lines += ["## Policy sweep ranking", "",
                  "| ranked by | engine (best first) | sim | Kendall tau |", "|---|---|---|---|"]
        for key, r in result["sweep"].items():
            lines.append(f"| {key} | {', '.join(r['engine'])} | {', '.join(r['sim'])} | "
                         f"{r['kendall_tau']:.2f} |")
    (out / "fidelity.md").write_text("\n".join(lines) + "\n")


def _summary_lines(result: dict[str, Any]) -> list[str]:
    rows, met, total = [], {}, {}
    for name, case in result["cases"].items():
        judged = [m["met"] for m in case["metrics"].values() if m["met"] is not None]
        role = case["role"]
        met[role], total[role] = met.get(role, 0) + sum(judged), total.get(role, 0) + len(judged)
        rows.append(f"| {name} | {role} | {sum(judged)} / {len(judged)} |")
    counts = "; ".join(f"{role or 'unlabelled'} cases {met[role]} of {total[role]}" for role in total)
    return [f"Targets met: {counts}.", "", "| case | role | targets met |", "|---|---|---|", *rows, ""]


def _misses(case: dict[str, Any]) -> list[str]:
    """Why a target is missed: the step kind whose period the simulator gets most wrong."""
    missed = [f"{k} by {abs(m['rel_error']) - m['target']:.1%}"
              for k, m in case["metrics"].items() if m["met"] is False]
    if not missed:
        return ["All targets met."]
    terms = [(abs(t["rel_error"]), k, t["rel_error"]) for k, t in case["step_terms"].items()
             if t.get("rel_error") is not None and t["engine_steps"] >= 10]
    worst = max(terms, default=None)
    why = (f"the largest step-period error is in {worst[1]} steps ({worst[2]:+.1%})" if worst
           else "no step kind with enough steps to attribute it")
    chaotic = [k for k, m in case["metrics"].items()
               if m["met"] is False and (m.get("sim_sensitivity") or 0) >= abs(m["rel_error"])]
    verb = "move" if len(chaotic) > 1 else "moves"
    note = (f" The simulator's own {' and '.join(chaotic)} {verb} as far when its device times are "
            f"{SENSITIVITY:.1%} shorter or longer: the case is chaotic there." if chaotic else "")
    return [f"Missed: {', '.join(missed)} (beyond the target); {why}.{note}"]


def _plot(case_dir: Path, out: Path, name: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from servebench.workbench.metrics import FINISHED, latencies
    from servebench.workbench.runs import load_run

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for backend, style in (("engine", "-"), ("sim", "--")):
        requests = load_run(case_dir / backend).requests
        lat = latencies(requests[requests["finish_reason"].isin(FINISHED)])
        for ax, key in zip(axes, ("ttft_ms", "tpot_ms", "e2el_ms")):
            v = np.sort(lat[key].dropna().to_numpy())
            ax.plot(v, np.arange(1, len(v) + 1) / max(len(v), 1), style, label=backend)
            ax.set_xlabel(key)
            ax.set_xscale("log")
    axes[0].set_ylabel("fraction of requests")
    axes[0].legend()
    fig.suptitle(name)
    fig.tight_layout()
    rel = Path("fidelity") / f"{name}_cdf.png"
    (out / rel).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / rel, dpi=80)
    plt.close(fig)
    return str(rel)


def _fmt(x: Any) -> str:
    return "" if x is None else f"{x:,.4g}" if isinstance(x, float) else str(x)


def _pct(x: float | None) -> str:
    return "" if x is None else f"{x:+.1%}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gpu", help="engine runs (on the GPU)")
    g.add_argument("--runs", type=Path, default=RUNS)
    g.add_argument("--model", default="llama2_7b", help="conf/model name")
    g.add_argument("--hardware", default="h200", help="conf/hardware name the runs record")
    g.add_argument("--device", default="auto")
    g.add_argument("--tiny", action="store_true", help="tiny model, few requests: a CPU smoke test")
    g.add_argument("--budget-s", type=float, default=480, help="skip the runs left after this many seconds")
    g.add_argument("--roles", nargs="*", choices=ROLES, default=list(ROLES), help="which cases to run")
    g.add_argument("--only", nargs="*", help="case names")
    g.add_argument("--cudagraph-mode", choices=CUDAGRAPH_MODES, help="backend.cudagraph_mode of every case "
                   "(default: conf/backend/engine.yaml's)")
    c = sub.add_parser("compare", help="simulate the same workloads and write the report (CPU)")
    c.add_argument("--runs", type=Path, default=RUNS)
    c.add_argument("--out", type=Path, default=REPO / "reports")
    c.add_argument("--profile-root", type=Path, default=None, help="default: data/profiles")
    c.add_argument("--step-time", default="auto", help="backend.step_time of the simulator runs")
    c.add_argument("--sensitivity", type=float, default=SENSITIVITY,
                   help="also simulate each case with its device times this much shorter and longer (0: not)")
    a = p.parse_args(argv)
    if a.cmd == "gpu":
        run_gpu(a.runs, a.model, a.hardware, a.device, a.tiny, a.budget_s, a.only, a.roles, a.cudagraph_mode)
    else:
        compare(a.runs, a.out, a.profile_root, a.step_time, a.sensitivity)


if __name__ == "__main__":
    main()
