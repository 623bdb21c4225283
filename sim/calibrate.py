"""workbench-calibrate: fit the calibrated step-time model (sim.calibrated) on the engine's own run folders.

    workbench-calibrate RUN_DIR... --out data/profiles/h200/llama2_7b [--heldout RUN_DIR...] [--no-profile]

RUN_DIRs are `backend=engine` run folders (or folders holding them). Their steps tables carry what a step's
time depends on (engine.core.recorder.STEP_SHAPE_COLUMNS); the engine's CUDA events split each step into
device time (`device_s`) and the host's work before it (`duration_s - device_s`) and after it (the next
step's `host_gap_s`, sync scheduling). The profile grid in --out (engine.profile's steps.csv), when there,
adds points the runs lack (long contexts, big batches). Each term is a least-squares coefficient of relative
error, no cost negative; later passes drop steps the fit misses by far (GC pauses, stalls).
Writes <out>/calibration.json and prints the per-step error, by kind of step, on the fit and on --heldout.
Without a CUDA device (the CPU engine) a step's whole duration is its device time and `pre` stays 0.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from servebench.engine.core.graphs import graph_batch_sizes, padded_graph_batch
from servebench.engine.core.recorder import STEP_SHAPE_COLUMNS, prefill_attention
from servebench.sim.calibrated import CALIBRATION_FILE, Calibration, DeviceTerms, HostTerms, padded_seqs

FIRST_STEPS = 4  # steps after start priced by their own term, left out of the other fits
KNOTS = (1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)  # candidate knots of linear(T)
OUTLIER = 5.0  # a step a pass misses by this many times the median miss is left out of the next pass
GOAL = {"p50": 0.03, "p90": 0.08}  # per-step |relative error| a calibration should stay within, each kind
KINDS = ("decode", "prefill", "mixed")
HOST_DRIFT = 1.3  # a run whose host time before a step is beyond this factor of the fit's gets a warning


# ---- steps: run folders and the profile grid, in one table ----

def run_folders(paths: list[Path]) -> list[Path]:
    """Each path that is a run folder, and the engine run folders under each one that is not."""
    found = []
    for p in paths:
        if (p / "summary.json").is_file():
            found.append(p)
            continue
        inner = sorted(s.parent for s in p.rglob("summary.json") if _backend(s.parent) == "engine")
        if not inner:
            raise ValueError(f"{p}: no engine run folder (summary.json) in it")
        found += inner
    return found


def _backend(folder: Path) -> str | None:
    return json.loads((folder / "summary.json").read_text()).get("backend")


def run_steps(folder: Path) -> pd.DataFrame:
    """A run's steps with `run`, `async_` and the derived columns the fits read."""
    summary = json.loads((folder / "summary.json").read_text())
    if summary.get("backend") != "engine":
        raise ValueError(f"{folder}/summary.json: backend={summary.get('backend')!r}; calibrate on engine "
                         "runs")
    steps = pd.read_parquet(folder / "steps.parquet")
    missing = [c for c in STEP_SHAPE_COLUMNS if c not in steps.columns]
    if missing:
        raise ValueError(f"{folder / 'steps.parquet'}: no column {missing[0]!r} (an older engine's run: "
                         "rerun it)")
    config = summary.get("config", {})
    async_ = bool(config.get("backend", {}).get("async_scheduling", False))
    max_seqs = int(config.get("scheduler", {}).get("max_num_seqs", 256))
    return with_shape_columns(steps.assign(run=str(folder), async_=async_, profile=0.0, max_seqs=max_seqs))


def with_shape_columns(steps: pd.DataFrame) -> pd.DataFrame:
    """`steps` (engine runs' or profile points' rows, with their engine's `max_seqs`) with the columns the fit
    reads: seqs, tokens, the tokens and sequences the step's kernels run on (a mixed CUDA graph's padded
    counts), swapped blocks and kind (decode, prefill or mixed)."""
    steps = steps.copy()
    steps["seqs"] = steps["num_prefill_chunks"] + steps["num_decode_tokens"]
    steps["tokens"] = steps["num_prefill_tokens"] + steps["num_decode_tokens"]
    steps["linear_tokens"] = steps["graph_tokens"].where(steps["graph_tokens"] > 0, steps["tokens"])
    steps["graph_seqs"] = [padded_seqs(t, s, m) for t, s, m in zip(steps["graph_tokens"], steps["seqs"],
                                                                      steps["max_seqs"])]
    steps["swapped"] = steps["swap_in_blocks"] + steps["swap_out_blocks"]
    # The device was idle when the step's window opened (sim.calibrated: it waits for the launch): every sync
    # step; an async one scheduled after the step before had ended. Not a profile point (its own offset).
    idle = ~steps["async_"].astype(bool) | (steps["host_gap_s"] > 0)
    steps["idle"] = (idle & (steps["profile"] == 0)).astype(float)
    p, d = steps["num_prefill_tokens"], steps["num_decode_tokens"]
    steps["kind"] = np.where(p == 0, "decode", np.where(d == 0, "prefill", "mixed"))
    return steps


def profile_steps(folder: Path) -> tuple[pd.DataFrame, float]:
    """engine.profile's points as steps-table rows (device_s: their median execute time), and its swap
    time per block (0 where it timed none)."""
    grid = pd.read_csv(folder / "steps.csv")
    meta = json.loads((folder / "meta.json").read_text())
    engine = meta.get("engine", {})
    sizes = graph_batch_sizes(engine.get("max_num_seqs", 512)) if engine.get("cuda_graphs") else []
    points = [_profile_row(r, sizes) for r in grid.itertuples(index=False) if not r.kind.startswith("swap")]
    swaps = grid[grid["kind"].str.startswith("swap")]
    swap_s = float((swaps["median_s"] / swaps["blocks"]).median()) if len(swaps) else 0.0
    rows = pd.DataFrame(points).assign(run=str(folder), async_=False, profile=1.0, step=FIRST_STEPS,
                                       max_seqs=engine.get("max_num_seqs", 512))
    return with_shape_columns(rows), swap_s


def _profile_row(r: object, graph_sizes: list[int]) -> dict:
    """One profile point in the steps table's columns (engine.profile's docstring describes the kinds)."""
    kind, b = r.kind, int(r.batch)
    if kind == "linear":
        full, rest = divmod(int(r.tokens), 128)
        chunks = [(128, 0)] * full + ([(rest, 0)] if rest else [])
    else:
        chunks = [(int(r.chunk), int(r.chunk_context))] if int(r.chunk) else []
    decode_only = not chunks
    return {"num_prefill_tokens": sum(n for n, _ in chunks), "num_decode_tokens": b,
            "num_prefill_chunks": len(chunks), "prefill_attention": prefill_attention(chunks),
            "prefill_context_sum": sum(c for _, c in chunks),
            "decode_context_sum": b * int(r.context), "decode_context_max": int(r.max_context),
            "graph_batch": padded_graph_batch(graph_sizes, b) if decode_only else 0,
            "graph_tokens": int(getattr(r, "graph_tokens", 0)),
            "swap_in_blocks": 0, "swap_out_blocks": 0, "device_s": r.median_s, "duration_s": r.median_s,
            "host_gap_s": math.nan}


# ---- the fits ----

def fit_relative(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Coefficients of x minimising the relative error against t, none negative (a negative one is held at
    0 and the rest refitted). The errors are relative to the model's prediction, refined over a few passes
    (relative to the noisy observations they would pull the fit low), and each pass leaves out the rows
    missed by more than OUTLIER x the median miss."""
    keep, scale = np.ones(len(t), dtype=bool), t.astype(float)
    floor = 1e-3 * float(np.median(t))
    for _ in range(4):
        coef = _nonnegative(x[keep] / scale[keep, None], t[keep] / scale[keep])
        scale = np.maximum(x @ coef, floor)
        miss = np.abs(t / scale - 1)
        keep = miss <= OUTLIER * max(float(np.median(miss)), 1e-3)
    return coef


def _nonnegative(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    free = np.ones(a.shape[1], dtype=bool)
    coef = np.zeros(a.shape[1])
    while free.any():
        coef[:] = 0
        coef[free] = np.linalg.lstsq(a[:, free], b, rcond=None)[0]
        if (coef >= 0).all():
            break
        free &= coef > 0
    return coef


def _knots(tokens: np.ndarray) -> list[int]:
    """KNOTS within the tokens seen, and their ends; a knot with no step on either side of it is dropped."""
    lo, hi = int(tokens.min()), int(tokens.max())
    knots = sorted({lo, hi, *(k for k in KNOTS if lo < k < hi)})
    seen = np.unique(tokens)
    kept = [knots[0]]
    for k, nxt in zip(knots[1:-1], knots[2:]):
        if ((seen > kept[-1]) & (seen < nxt)).any():
            kept.append(k)
    return [*kept, knots[-1]] if len(knots) > 1 else kept


def _rising(x: np.ndarray, points: list[int]) -> np.ndarray:
    """Columns whose non-negative coefficients are the rises of a non-decreasing curve at `points` (from 0):
    column i is 1 at and after points[i], linear in between, so the curve is piecewise linear in x."""
    hats = np.column_stack([np.interp(x, points, np.eye(len(points))[j]) for j in range(len(points))])
    return np.cumsum(hats[:, ::-1], axis=1)[:, ::-1]


def fit_graph(rows: pd.DataFrame) -> tuple[list[int], list[float], float, float, float, float]:
    """graph_s per captured batch (non-decreasing in the batch), graph_kv_s, graph_tail_s, the profile
    offset and the launch an idle device waits for, on decode-only steps replayed in CUDA graphs."""
    sizes = sorted(int(g) for g in rows["graph_batch"].unique())
    g = rows["graph_batch"].to_numpy(float)
    x = np.column_stack([_rising(g, sizes), rows[["decode_context_sum", "decode_context_max", "profile",
                                                  "idle"]].to_numpy(float)])
    coef = fit_relative(x, rows["device_s"].to_numpy(float))
    n = len(sizes)
    return sizes, np.cumsum(coef[:n]).tolist(), *(float(c) for c in coef[n:])


# The columns of attention_s, prefill_kv_s, chunk_s, eager_kv_s, seq_s, the profile's offset and the launch
EAGER_TERMS = ("prefill_attention", "prefill_context_sum", "num_prefill_chunks", "decode_context_sum",
               "graph_seqs", "profile", "idle")


def fit_eager(rows: pd.DataFrame) -> tuple[list[int], list[float], list[float]]:
    """linear(T) at its knots (non-decreasing), and the coefficients of EAGER_TERMS, on eager steps."""
    tokens = rows["linear_tokens"].to_numpy(float)
    knots = _knots(tokens)
    terms = rows[list(EAGER_TERMS)].to_numpy(float)
    x = np.column_stack([_rising(tokens, knots), terms])
    coef = fit_relative(x, rows["device_s"].to_numpy(float))
    n = len(knots)
    return knots, np.cumsum(coef[:n]).tolist(), [float(c) for c in coef[n:]]


def fit_device(steps: pd.DataFrame, swap_s: float) -> tuple[DeviceTerms, tuple[float, float]]:
    """The device terms, and the launch an idle device waits for (decode graph, other steps)."""
    rows = steps[(steps["step"] >= FIRST_STEPS) & (steps["tokens"] > 0) & (steps["device_s"] > 0)]
    graph, eager = (_launch_known(r) for r in (rows[rows["graph_batch"] > 0], rows[rows["graph_batch"] == 0]))
    if eager.empty:
        raise ValueError("no eager steps (prefill or mixed) to fit: calibrate on runs that prefill")
    sizes, graph_s, kv, tail, offset, launch = fit_graph(graph) if len(graph) else ([1], [0.0], 0, 0, 0, 0)
    knots, linear_s, (attention, prefill_kv, chunk, eager_kv, seq, eager_offset, eager_launch) = fit_eager(
        eager)
    return DeviceTerms(sizes, graph_s, kv, tail, knots, linear_s, attention, prefill_kv, chunk, eager_kv, seq,
                       swap_s, max(offset, eager_offset)), (launch, eager_launch)


def _launch_known(rows: pd.DataFrame) -> pd.DataFrame:
    """`rows`, whose launch term is left at 0 unless steps queued behind others (async) tell it from the
    device's own time: without them it stays inside the device terms, where sync steps need it."""
    queued = (rows["idle"] == 0) & (rows["profile"] == 0)
    return rows if queued.any() and (rows["idle"] == 1).any() else rows.assign(idle=0.0)


def fit_host(steps: pd.DataFrame, device: DeviceTerms, launch: tuple[float, float], measured: bool
             ) -> HostTerms:
    """pre: the step's duration less its device time (0 without a device); post: the host gap after the
    step while the loop stayed busy; first steps: what the others leave unexplained of steps 0, 1, ..."""
    sync = steps[~steps["async_"] & (steps["profile"] == 0)]
    later = sync[sync["step"] >= FIRST_STEPS]
    pre = np.zeros(3)
    if measured and len(later):
        target = later["duration_s"] - later["device_s"]
        ok = target > 0
        x = np.column_stack([np.ones(ok.sum()), later.loc[ok, ["seqs", "tokens"]].to_numpy(float)])
        pre = fit_relative(x, target[ok].to_numpy(float))
    post = np.zeros(2)
    gaps = _busy_gaps(later)
    if len(gaps):
        post = fit_relative(np.column_stack([np.ones(len(gaps)), gaps["seqs"].to_numpy(float)]),
                            gaps["gap"].to_numpy(float))
    host = HostTerms(*(float(c) for c in pre), *(float(c) for c in post))
    host.launch_graph_s, host.launch_eager_s = (float(c) for c in launch)
    host.first_steps_s = _first_steps(sync, device, host, measured)
    return host


def _busy_gaps(steps: pd.DataFrame) -> pd.DataFrame:
    """Each step's following host gap, where the loop went on to the next step at once (requests left)."""
    parts = []
    for _, run in steps.groupby("run"):
        run = run.sort_values("step")
        gap = run["host_gap_s"].shift(-1)
        busy = (run["num_running"] + run["num_waiting"] > 0) & (run["step"].shift(-1) == run["step"] + 1)
        parts.append(run.assign(gap=gap)[busy & (gap > 0)])
    return pd.concat(parts) if parts else steps.iloc[:0].assign(gap=0.0)


def _first_steps(sync: pd.DataFrame, device: DeviceTerms, host: HostTerms, measured: bool) -> list[float]:
    first = sync[sync["step"] < FIRST_STEPS]
    if first.empty:
        return []
    cal = Calibration(device, host)
    excess = first["duration_s"] - predicted_duration(cal, first, measured)
    by_step = excess.groupby(first["step"]).median()
    return [max(float(by_step.get(i, 0.0)), 0.0) for i in range(FIRST_STEPS)]


def fit_swap(steps: pd.DataFrame, cal: Calibration, measured: bool) -> float:
    """Seconds per KV block swapped: the median, over the steps that swapped, of what the rest of the model
    (its swap_s still 0) leaves unexplained, per block; 0 where no step swapped. Of a sync step's duration
    where there are such steps (an engine may copy on the host before the forward, or on the device within
    it), else of async steps' device time (today's engine queues the copies on the device)."""
    swapped = steps[(steps["swapped"] > 0) & (steps["step"] >= FIRST_STEPS)]
    sync = swapped[~swapped["async_"]]
    if len(sync):
        miss, blocks = sync["duration_s"] - predicted_duration(cal, sync, measured), sync["swapped"]
    elif len(swapped) and measured:
        miss, blocks = swapped["device_s"] - predicted_device(cal, swapped), swapped["swapped"]
    else:
        return 0.0
    return max(float(np.median(miss / blocks)), 0.0)


def fit(steps: pd.DataFrame, profile: pd.DataFrame | None, swap_s: float) -> Calibration:
    """The device and host terms on the steps that swapped nothing; the swap cost from the profile's swap
    points (`swap_s`), else from the steps that swapped."""
    measured = bool(steps["device_s"].notna().any())
    if not measured:  # the CPU engine: all of a step is "device" time
        steps = steps.assign(device_s=steps["duration_s"].where(~steps["async_"]))
    plain = steps[steps["swapped"] == 0]
    both = pd.concat([plain, profile]) if profile is not None and measured else plain
    device, launch = fit_device(both, swap_s)
    cal = Calibration(device, fit_host(plain, device, launch, measured), {"device_measured": measured})
    if not swap_s:
        cal.device.swap_s = fit_swap(steps, cal, measured)
    return cal


# ---- errors ----

def predicted_device(cal: Calibration, steps: pd.DataFrame) -> np.ndarray:
    """A step's device window as the engine's events time it: the launch where the device was idle, then
    the device's work."""
    h = cal.host

    def one(r: object) -> float:
        return (h.launch(r) if r.idle else 0.0) + cal.device_time(int(r.graph_batch),
                                        int(r.linear_tokens), int(r.graph_seqs), int(r.num_prefill_chunks),
                                        r.prefill_attention, int(r.prefill_context_sum),
                                        int(r.decode_context_sum), int(r.decode_context_max), int(r.swapped))

    return np.array([one(r) for r in steps.itertuples(index=False)])


def predicted_duration(cal: Calibration, steps: pd.DataFrame, measured: bool = True) -> np.ndarray:
    """A sync step's duration: the host's work before the device, then the device's."""
    h = cal.host
    first = steps["step"].map(lambda i: h.first_steps_s[i] if i < len(h.first_steps_s) else 0.0)
    return predicted_device(cal, steps) + (_pre(h, steps).to_numpy() if measured else 0.0) + first.to_numpy()


def _pre(h: HostTerms, steps: pd.DataFrame) -> pd.Series:
    """HostTerms.pre of each row, the first steps' own terms aside."""
    return h.pre_s + h.pre_seq_s * steps["seqs"] + h.pre_token_s * steps["tokens"]


def step_errors(cal: Calibration, steps: pd.DataFrame) -> dict[str, dict[str, float]]:
    """|relative error| by kind of step (p50, p90): a sync step's whole duration; an async step's device time
    (its duration overlaps the host's work for the next step)."""
    measured = bool(steps["device_s"].notna().any())
    steps = steps[steps["tokens"] > 0]
    sync = ~steps["async_"].to_numpy()
    actual = np.where(sync, steps["duration_s"], steps["device_s"])
    pred = np.where(sync, predicted_duration(cal, steps, measured), predicted_device(cal, steps))
    err = pd.Series(np.abs(pred / actual - 1), index=steps.index)
    out = {}
    for kind in KINDS:
        e = err[(steps["kind"] == kind) & np.isfinite(err)]
        if len(e):
            out[kind] = {"steps": len(e), "p50": float(e.median()), "p90": float(e.quantile(0.9))}
    return out


def host_ratios(cal: Calibration, steps: pd.DataFrame) -> dict[str, float]:
    """Per sync run, the median of its steps' host time before the device (duration less device time) over
    the fitted `pre`: near 1 where the host ran as fast as in the fit. A machine whose host work slows or
    speeds up between runs (seen: 2x in a card's first minutes) shows here, not in the device terms."""
    sync = steps[~steps["async_"] & (steps["step"] >= FIRST_STEPS) & (steps["tokens"] > 0)]
    ratio = (sync["duration_s"] - sync["device_s"]) / _pre(cal.host, sync)
    return {run: float(r.median()) for run, r in ratio.groupby(sync["run"]) if r.notna().any()}


# ---- the command ----

def calibrate(runs: list[Path], out: Path, heldout: list[Path], profile: Path | None) -> Calibration:
    folders = run_folders(runs)
    settings = _settings(folders + run_folders(heldout), profile)
    steps = pd.concat([run_steps(f) for f in folders], ignore_index=True)
    grid, swap_s = profile_steps(profile) if profile is not None else (None, 0.0)
    cal = fit(steps, grid, swap_s)
    config = json.loads((folders[0] / "summary.json").read_text()).get("config", {})
    cal.meta |= {"model": config.get("model", {}).get("name"), **settings,
                 "hardware": config.get("hardware", {}).get("name"), "runs": [str(f) for f in folders],
                 "profile": str(profile) if profile else None,
                 "source_digest": _digest(folders), "fit_error": step_errors(cal, steps)}
    held = run_folders(heldout)
    held_steps = pd.concat([run_steps(f) for f in held], ignore_index=True) if held else steps.iloc[:0]
    if held:
        cal.meta |= {"heldout": [str(f) for f in held], "heldout_error": step_errors(cal, held_steps)}
    if cal.meta["device_measured"]:
        cal.meta["host_ratio"] = host_ratios(cal, pd.concat([steps, held_steps], ignore_index=True))
    out.mkdir(parents=True, exist_ok=True)
    cal.save(out / CALIBRATION_FILE)
    return cal


def _settings(folders: list[Path], profile: Path | None) -> dict[str, int | bool]:
    """The tensor_parallel_size and whether steps that prefill replayed CUDA graphs (cudagraph_mode FULL), one
    of each for all the runs and the profile: steps measured otherwise are other steps."""
    seen: dict[str, dict[str, int | bool]] = {"tensor_parallel_size": {}, "mixed_graphs": {}}
    for f in folders:
        summary = json.loads((f / "summary.json").read_text())
        config = summary.get("config", {})
        backend = config.get("backend") or {}
        seen["tensor_parallel_size"][str(f)] = (config.get("parallel") or {}).get("tensor_parallel_size", 1)
        seen["mixed_graphs"][str(f)] = mixed_graphs(backend) and summary.get("device") != "cpu"
    if profile is not None:
        engine = json.loads((profile / "meta.json").read_text()).get("engine", {})
        seen["tensor_parallel_size"][str(profile)] = engine.get("tensor_parallel_size", 1)
        seen["mixed_graphs"][str(profile)] = mixed_graphs(engine) and engine.get("cuda_graphs", True)
    settings = {}
    for what, values in seen.items():
        if len(set(values.values())) > 1:
            hint = " (fit on the runs alone: --no-profile)" if profile is not None else ""
            raise ValueError(f"runs and profile of different {what}: " + ", ".join(
                f"{where} ({value})" for where, value in values.items()) + hint)
        settings[what] = next(iter(values.values()))
    return settings


def mixed_graphs(backend: dict) -> bool:
    """Whether a backend group's engine replays the steps that prefill in CUDA graphs. A group without
    cudagraph_mode predates the key, and the FULL default: decode graphs only."""
    return backend.get("cudagraph_mode") == "FULL" and not backend.get("enforce_eager", False)


def _digest(folders: list[Path]) -> str | None:
    """The engine code the runs measured (summary.json's source_digest), if they agree."""
    digests = {json.loads((f / "summary.json").read_text()).get("source_digest") for f in folders}
    return digests.pop() if len(digests) == 1 else None


def error_table(meta: dict) -> list[str]:
    """A calibration's per-step errors (its meta's fit_error and heldout_error) as markdown table lines."""
    lines = ["| steps | kind | n | p50 abs. error | p90 abs. error | within 3 % / 8 % |",
             "|---|---|---|---|---|---|"]
    for name in ("fit_error", "heldout_error"):
        for kind, e in (meta.get(name) or {}).items():
            within = all(e[q] <= goal for q, goal in GOAL.items())
            lines.append(f"| {name.removesuffix('_error')} | {kind} | {e['steps']} | {e['p50']:.1%} | "
                         f"{e['p90']:.1%} | {'yes' if within else '**no**'} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="workbench-calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="engine run folders (or folders holding them)")
    p.add_argument("--out", type=Path, required=True, help="data/profiles/<hardware>/<model>")
    p.add_argument("--heldout", nargs="*", type=Path, default=[], help="run folders to judge the fit on")
    p.add_argument("--profile", type=Path, default=None, help="engine.profile folder (default: --out)")
    p.add_argument("--no-profile", action="store_true",
                   help="fit on the runs alone (the profile in --out measured other CUDA graphs, say)")
    a = p.parse_args(argv)
    profile = None if a.no_profile else a.profile or (a.out if (a.out / "steps.csv").is_file() else None)
    try:
        cal = calibrate(a.runs, a.out, a.heldout, profile)
    except (ValueError, OSError) as e:
        print(f"workbench-calibrate: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print("\n".join([f"wrote {a.out / CALIBRATION_FILE}", *error_table(cal.meta)]))
    for run, r in cal.meta.get("host_ratio", {}).items():
        if not 1 / HOST_DRIFT < r < HOST_DRIFT:
            print(f"warning: {run}: the host's work before each step took {r:.2f}x the fitted time: the "
                  "machine's host ran at another speed there; fit on runs recorded in the same state",
                  file=sys.stderr)


if __name__ == "__main__":
    main()
