"""The harness behind the CLI: validate the config, run the backend it names, write the run folder.

Each backend is one module, `workbench/{sim,engine,server}_backend.py`, with `run(cfg) -> RunResult`; the
harness composes them and never builds a backend's insides."""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from typing import Any

from servebench.workbench.metrics import summarize
from servebench.workbench.runs import Run, RunResult, clear_run, write_summary, write_tables
from servebench.workbench.schema import ConfigError, validate
from servebench.workbench.vllm_compat import write_vllm_result


def num_gpus(cfg: dict[str, Any]) -> int:
    """GPUs the deployment occupies: tensor x pipeline parallel degree per replica, times the replicas."""
    par = cfg.get("parallel") or {}
    replicas = (cfg.get("deployment") or {}).get("num_replicas", 1)
    return par.get("tensor_parallel_size", 1) * par.get("pipeline_parallel_size", 1) * replicas


# Deployment features the simulator models and the engine does not (yet): key path and its neutral value.
SIM_ONLY = (
    (("deployment", "num_replicas"), 1),
    (("parallel", "pipeline_parallel_size"), 1),
    (("multimodal", "images_per_request"), 0),
)
# What the engine runs too; a server runs what it was started with (servebench-serve --quantization ...).
NOT_ON_SERVER = (
    (("parallel", "tensor_parallel_size"), 1),
    (("quantization", "method"), "none"),
    (("cache", "kv_cache_dtype"), "auto"),
    (("lora", "num_adapters"), 0),
)


def _check_sim_only(cfg: dict[str, Any], backend: str) -> None:
    for (group, key), neutral in SIM_ONLY + (NOT_ON_SERVER if backend == "server" else ()):
        value = (cfg.get(group) or {}).get(key, neutral)
        if value == neutral:
            continue
        if backend == "server" and ((group, key), neutral) in NOT_ON_SERVER:
            raise ConfigError(f"{group}.{key}={value!r}: a server runs as it was started (servebench-serve "
                              "--tensor-parallel-size, --quantization, --kv-cache-dtype, --lora-modules); "
                              "use backend=sim or engine")
        raise ConfigError(f"{group}.{key}={value!r} is simulated only: use backend=sim, not {backend}")


def run_experiment(cfg: dict[str, Any], run_dir: Path, engine: Any = None) -> dict[str, Any]:
    """Run the backend the config names and write requests/steps/summary (and the report) into run_dir.
    `engine` (backend=engine): an already loaded engine for the same model and knobs, reused."""
    clear_run(run_dir)  # an earlier run's results in this folder must not sit beside this run's config
    cfg = validate(cfg)
    backend = cfg["backend"]["name"]
    if backend != "sim":
        _check_sim_only(cfg, backend)
    wall0 = time.perf_counter()
    result = run_backend(cfg, engine)
    requests, steps, itl_s = result.requests, result.steps, result.itl_s
    summary = summarize(requests, steps, itl_s, cfg.get("slo"), result.info.pop("duration_s", None))
    summary.update(result.info)
    summary.setdefault("max_model_len", (cfg.get("scheduler") or {}).get("max_model_len")
                       or (cfg.get("model") or {}).get("max_model_len"))
    summary["num_gpus"] = num_gpus(cfg)
    summary["goodput_per_gpu"] = summary["goodput"] / summary["num_gpus"]
    summary["wall_s"] = round(time.perf_counter() - wall0, 3)
    summary["config"] = cfg
    write_tables(run_dir, requests, steps, itl_s)
    write_vllm_result(run_dir, summary, requests, itl_s)
    if cfg.get("report", True):
        from servebench.workbench.report import write_report  # matplotlib: imported only when wanted

        config = summary["config"]
        metrics = {k: v for k, v in summary.items() if k != "config"}
        write_report(Run(run_dir, metrics, config, requests, steps, itl_s))
    write_summary(run_dir, summary)  # last: its presence marks a complete run
    return summary


def run_backend(cfg: dict[str, Any], engine: Any = None) -> RunResult:
    """`run(cfg)` of the backend's module, imported only now (the engine needs torch, the server httpx);
    a loaded `engine` is the engine backend's one extra argument."""
    name = cfg["backend"]["name"]
    backend = importlib.import_module(f"servebench.workbench.{name}_backend")
    return backend.run(cfg, engine) if name == "engine" else backend.run(cfg)
