"""Vidur (microsoft/vidur, PyPI ``vidur==0.0.26``) as the external baseline for the simulator benchmarks.

Runs Vidur in its own venv, as a subprocess, on a Vidur-format trace (arrived_at, num_prefill_tokens,
num_decode_tokens) with the one configuration whose profiles are complete here: CodeLlama-34B on A100,
tensor parallel 2, pairwise NVLink, Vidur's 'vllm' replica scheduler. See benchmarks/VIDUR.md.

    python benchmarks/vidur_baseline.py [--venv /tmp/vidur-venv] [--trace PATH] [--workdir DIR] [--setup]

Vidur 0.0.26 fetches its profiles from Hugging Face datasets; offline, it reads them from a hand-built HF
cache snapshot in ``<workdir>/.vidur_cache`` (built here from data/vidur_profiles), and its fitted models
and predictions are cached in the same folder, so the second run on a workdir is warm.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import lzma
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

VIDUR_VERSION = "0.0.26"
REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
DEFAULT_VENV = Path("/tmp/vidur-venv")
DEFAULT_WORKDIR = Path("/tmp/vidur-work")
DEFAULT_TRACE = REPO / "data" / "traces" / "splitwise_conv.csv"

MODEL = "codellama/CodeLlama-34b-Instruct-hf"
DEVICE = "a100"
NETWORK = "a100_pairwise_nvlink"
TP = 2
MAX_TOKENS = 16384  # CodeLlama-34B max_model_len: no request of the Azure conv trace is clipped
# the only CodeLlama-34B attention profile sits in a dated TP2 folder; Vidur wants it under the model name
COMPUTE_SRC = f"compute/{DEVICE}/codellama/CodeLlama-34b-Instruct-hf-tp2-2024-05"
COMPUTE_DST = f"data/profiling/compute/{DEVICE}/{MODEL}"
NETWORK_SRC = f"network/{NETWORK}"
NETWORK_DST = f"data/profiling/network/{NETWORK}"
COMPUTE_DATASET = "vidur-local/codellama-34b-instruct-hf-a100-tp2"
NETWORK_DATASET = "vidur-local/a100-pairwise-nvlink"
CACHE_DIR = ".vidur_cache"
FITTED = ("attn_prefill", "attn_decode", "all_reduce")  # predictions present in a warm cache
RF = "--random_forrest_execution_time_predictor_config_"
TRACE_COLUMNS = ("arrived_at", "num_prefill_tokens", "num_decode_tokens")


def profile_root() -> Path:
    for root in (REPO / "data" / "vidur_profiles", SHARED_DATA / "vidur_profiles"):
        if (root / COMPUTE_SRC / "attention.csv").is_file():
            return root
    raise FileNotFoundError(f"Vidur profiles not found: need {COMPUTE_SRC}/attention.csv under "
                            f"{REPO / 'data/vidur_profiles'} or {SHARED_DATA / 'vidur_profiles'}")


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def installed_version(venv: Path) -> str | None:
    py = venv_python(venv)
    if not py.exists():
        return None
    out = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('vidur'))"],
                         capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def setup_venv(venv: Path) -> None:
    """Create the venv and pip-install the pinned Vidur wheel unless that version is already there."""
    if installed_version(venv) == VIDUR_VERSION:
        return
    if not venv_python(venv).exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv_python(venv)), "-m", "pip", "install", "-q", f"vidur=={VIDUR_VERSION}"]
    subprocess.run(pip, check=True)


def link_profiles(workdir: Path) -> None:
    """Vidur's data/profiling layout, as symlinks into data/vidur_profiles."""
    root = profile_root()
    for src, dst, names in ((COMPUTE_SRC, COMPUTE_DST, ("mlp", "attention", "cpu_overheads")),
                            (NETWORK_SRC, NETWORK_DST, ("all_reduce", "send_recv"))):
        (workdir / dst).mkdir(parents=True, exist_ok=True)
        for name in names:
            link = workdir / dst / f"{name}.csv"
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(root / src / f"{name}.csv")


def hf_snapshot(workdir: Path, kind: str, dataset: str, files: list[Path], config: dict) -> None:
    """An offline Hugging Face cache entry: snapshot_download(dataset) resolves to it under HF_HUB_OFFLINE."""
    digest = hashlib.sha1()
    for f in files:
        digest.update(f.read_bytes())
    rev = digest.hexdigest()
    repo_dir = workdir / CACHE_DIR / "profiling_data" / kind / f"datasets--{dataset.replace('/', '--')}"
    snap = repo_dir / "snapshots" / rev
    if not (snap / "config.json").exists():
        snap.mkdir(parents=True, exist_ok=True)
        for f in files:
            (snap / f"{f.name}.xz").write_bytes(lzma.compress(f.read_bytes()))
        (snap / "config.json").write_text(json.dumps(config))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(rev)


def replay_trace(trace: Path, workdir: Path) -> Path:
    """The trace in the columns that Vidur 0.0.26's trace_replay generator reads (Date, Time, ...Count)."""
    out = workdir / "data" / "processed_traces" / f"{trace.stem}_replay.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with trace.open(newline="") as src, out.open("w", newline="") as dst:
        rows = csv.DictReader(src)
        missing = set(TRACE_COLUMNS) - set(rows.fieldnames or ())
        if missing:
            raise ValueError(f"trace {trace}: missing column(s) {sorted(missing)}")
        writer = csv.writer(dst)
        writer.writerow(["Date", "Time", "PromptTokenCount", "CompletionTokenCount"])
        for row in rows:
            writer.writerow(["replay", *(row[c] for c in TRACE_COLUMNS)])
    return out


def prepare_workdir(trace: Path, workdir: Path) -> Path:
    link_profiles(workdir)
    compute, network = workdir / COMPUTE_DST, workdir / NETWORK_DST
    hf_snapshot(workdir, "compute", COMPUTE_DATASET, [compute / "mlp.csv", compute / "attention.csv"],
                {"model": MODEL, "device_sku": DEVICE})
    hf_snapshot(workdir, "network", NETWORK_DATASET, [network / "all_reduce.csv", network / "send_recv.csv"],
                {"sku": NETWORK})
    return replay_trace(trace, workdir)


def vidur_args(trace_csv: Path, output_dir: Path) -> list[str]:
    return [
        "--seed", "42",
        "--cluster_config_num_replicas", "1",
        "--replica_config_model_name", MODEL,
        "--replica_config_device", DEVICE,
        "--replica_config_network_device", NETWORK,
        "--replica_config_tensor_parallel_size", str(TP),
        "--replica_config_num_pipeline_stages", "1",
        "--global_scheduler_config_type", "round_robin",
        "--replica_scheduler_config_type", "vllm",
        "--vllm_scheduler_config_batch_size_cap", "128",
        # vLLM V0 without chunked prefill: max_num_batched_tokens = max_model_len, so every prompt fits
        "--vllm_scheduler_config_max_tokens_in_batch", str(MAX_TOKENS),
        "--request_generator_config_type", "trace_replay",
        "--trace_request_generator_config_trace_file", str(trace_csv),
        "--trace_request_generator_config_date", "replay",
        "--trace_request_generator_config_prefill_scale_factor", "1",
        "--trace_request_generator_config_decode_scale_factor", "1",
        "--trace_request_generator_config_time_scale_factor", "1",
        "--trace_request_generator_config_max_tokens", str(MAX_TOKENS),
        "--execution_time_predictor_config_type", "random_forrest",
        f"{RF}model_profiling_dataset", COMPUTE_DATASET,
        f"{RF}network_profiling_dataset", NETWORK_DATASET,
        f"{RF}prediction_max_prefill_chunk_size", str(MAX_TOKENS),
        f"{RF}prediction_max_tokens_per_request", str(MAX_TOKENS),
        f"{RF}prediction_max_batch_size", "128",
        # the smallest forest of Vidur's grid (250, 500, 750 trees): the full grid search took 5.5 min per
        # operator model on this 2-core machine, over an hour in all; depth and split grids stay Vidur's
        f"{RF}num_estimators", "250",
        f"{RF}cache_dir", CACHE_DIR,
        "--metrics_config_output_dir", str(output_dir),
        # plots need kaleido's Chrome (absent offline) and, like the Chrome trace, are output, not simulation
        "--no-metrics_config_store_plots",
        "--no-metrics_config_enable_chrome_trace",
    ]


def is_warm(workdir: Path) -> bool:
    names = {p.name.split(".")[0] for p in (workdir / CACHE_DIR / "predictions").glob("*/*.csv.xz")}
    return set(FITTED) <= names


def run_subprocess(cmd: list[str], cwd: Path, log: Path) -> tuple[int, float, float]:
    """(exit code, wall s, peak RSS MB): wait4 gives this child's own RUSAGE_CHILDREN-style peak, so earlier
    children of the calling process cannot inflate it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "MPLBACKEND": "Agg"}
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, wall, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def column(rows: list[dict[str, str]], name: str) -> list[float]:
    if not rows or name not in rows[0]:
        raise ValueError(f"Vidur request_metrics.csv has no column {name!r}")
    return [float(r[name]) for r in rows]


def summarize(metrics_csv: Path, wall_s: float) -> dict:
    """Medians in the workbench's definitions: TTFT = prefill_e2e_time (Vidur emits the first token when the
    prefill ends), TPOT = (E2E - TTFT) / (output tokens - 1) over requests with > 1 output token."""
    with metrics_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    ttft, e2e = column(rows, "prefill_e2e_time"), column(rows, "request_e2e_time")
    out = column(rows, "request_num_decode_tokens")
    tpot = [(e - t) / (n - 1) for t, e, n in zip(ttft, e2e, out, strict=True) if n > 1]
    # Vidur's own per-token decode time divides by all output tokens, the first one included
    decode_norm = column(rows, "decode_time_execution_plus_preemption_normalized")
    medians = {name: statistics.median(values) for name, values in
               (("ttft", ttft), ("tpot", tpot), ("e2el", e2e), ("vidur_decode_normalized", decode_norm))}
    return {"requests": len(rows), "sim_req_per_wall_s": len(rows) / wall_s,
            **{f"median_{k}_s": v for k, v in medians.items()},
            **{f"median_{k}_ms": v * 1e3 for k, v in medians.items()}}


def run_vidur(trace_path: Path | str = DEFAULT_TRACE, venv: Path | str = DEFAULT_VENV,
              workdir: Path | str | None = None) -> dict:
    """Run Vidur once on trace_path (workdir None: /tmp/vidur-work, which keeps the fitted-model cache).

    Returns wall_s, peak_rss_mb, warm (the fitted-model cache existed before), requests,
    sim_req_per_wall_s and median TTFT / TPOT / E2E latency in seconds and ms."""
    trace_path, venv = Path(trace_path), Path(venv)
    workdir = Path(workdir or DEFAULT_WORKDIR).resolve()
    if not trace_path.is_file():
        raise FileNotFoundError(f"trace not found: {trace_path}")
    if installed_version(venv) != VIDUR_VERSION:
        raise FileNotFoundError(f"vidur=={VIDUR_VERSION} not installed in venv {venv}; rerun with --setup")
    trace_csv = prepare_workdir(trace_path, workdir)
    warm = is_warm(workdir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    output_dir = workdir / "simulator_output" / stamp
    log = workdir / f"vidur-{stamp}.log"
    cmd = [str(venv_python(venv)), "-m", "vidur.main", *vidur_args(trace_csv, output_dir)]
    code, wall, rss = run_subprocess(cmd, workdir, log)
    found = sorted(output_dir.glob("**/request_metrics.csv"))
    if code != 0 or not found:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"Vidur exited {code} without request_metrics.csv (log {log}):\n{tail}")
    return {"vidur_version": VIDUR_VERSION, "wall_s": wall, "peak_rss_mb": rss, "warm": warm,
            **summarize(found[-1], wall), "metrics_csv": str(found[-1]), "log": str(log)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--setup", action="store_true",
                        help=f"create the venv and pip install vidur=={VIDUR_VERSION} if missing")
    args = parser.parse_args()
    if args.setup:
        setup_venv(args.venv)
    print(json.dumps(run_vidur(args.trace, args.venv, args.workdir), indent=2))


if __name__ == "__main__":
    main()
