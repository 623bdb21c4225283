"""Plain functions behind the CLI: build the objects a config names, run a backend, write the run folder."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pandas as pd

from engine.core import CacheConfig, Scheduler, SchedulerConfig, TraceRecorder
from engine.core.config import default_max_num_batched_tokens

BACKENDS = ("sim", "engine", "server")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


def scheduler_config(cfg: dict[str, Any], model_max_len: int) -> SchedulerConfig:
    """The `scheduler` group as a SchedulerConfig, with vLLM's rules for the null defaults."""
    s = dict(cfg["scheduler"])
    s["max_model_len"] = s.get("max_model_len") or model_max_len
    if s["max_model_len"] > model_max_len:
        raise ConfigError(
            f"scheduler.max_model_len={s['max_model_len']} exceeds the model's context length {model_max_len}"
        )
    if s.get("max_num_batched_tokens") is None:
        chunked = s.get("enable_chunked_prefill", True)
        s["max_num_batched_tokens"] = default_max_num_batched_tokens(s["max_model_len"], chunked)
    return _build(SchedulerConfig, "scheduler", s)


def cache_config(cfg: dict[str, Any]) -> CacheConfig:
    return _build(CacheConfig, "cache", dict(cfg["cache"]))


def _build(cls: type, group: str, values: dict[str, Any]) -> Any:
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{group}.{unknown[0]} is not a known key (known: {', '.join(sorted(known))})")
    return cls(**values)


def run_experiment(cfg: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Run the backend the config names and write requests/steps/summary (and the report) into run_dir."""
    from workbench.metrics import summarize
    from workbench.runs import write_run

    backend = cfg["backend"]["name"]
    if backend not in BACKENDS:
        raise ConfigError(f"backend.name={backend!r}: choose one of {', '.join(BACKENDS)}")
    wall0 = time.perf_counter()
    if backend == "sim":
        requests, steps, itl_s, info = simulate(cfg)
    elif backend == "engine":
        from workbench.engine_backend import replay_on_engine

        requests, steps, itl_s, info = replay_on_engine(cfg)
    else:
        from workbench.serve_backend import replay_on_server

        requests, steps, itl_s, info = replay_on_server(cfg)
    summary = summarize(requests, steps, itl_s, cfg.get("slo"), info.pop("duration_s", None))
    summary.update(info)
    summary["wall_s"] = round(time.perf_counter() - wall0, 3)
    summary["config"] = cfg
    write_run(run_dir, requests, steps, summary, itl_s)
    if cfg.get("report", True):
        from workbench.report import write_report  # matplotlib: imported only when a report is wanted

        write_report(run_dir)
    return summary


def simulate(cfg: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame, Any, dict[str, Any]]:
    """The configured workload through the shared scheduler on the SimPy clock."""
    from sim.simulator import Simulation
    from sim.specs import hardware_spec, model_spec, num_cpu_blocks, num_gpu_blocks, parallel_spec
    from sim.step_time import make_step_time_model
    from workbench.workloads import iter_requests, load_workload

    model = model_spec(cfg["model"])
    hw = hardware_spec(cfg["hardware"])
    par = parallel_spec(cfg.get("parallel"))
    sched_cfg = scheduler_config(cfg, model.max_model_len)
    cache_cfg = cache_config(cfg)
    blocks = cache_cfg.num_gpu_blocks_override or num_gpu_blocks(
        model,
        hw,
        par,
        cache_cfg.gpu_memory_utilization,
        cache_cfg.block_size,
        max_num_batched_tokens=sched_cfg.max_num_batched_tokens,
    )
    cpu_blocks = num_cpu_blocks(cache_cfg.swap_space, model, par, cache_cfg.block_size)
    step_time, step_time_note = _step_time_model(
        cfg["backend"].get("step_time", "auto"), model, hw, par, cache_cfg.block_size, make_step_time_model
    )
    workload = load_workload(cfg["workload"])
    recorder = TraceRecorder()
    scheduler = Scheduler(sched_cfg, cache_cfg, blocks, cpu_blocks, recorder)
    with _progress(cfg, len(workload)) as bar:
        sim = Simulation(scheduler, step_time, iter_requests(workload, model.vocab_size), bar.update)
        end_s = sim.run()
    info = {
        "backend": "sim",
        "step_time_model": step_time_note,
        "num_gpu_blocks": blocks,
        "num_cpu_blocks": cpu_blocks,
        "max_num_batched_tokens": sched_cfg.max_num_batched_tokens,
        "max_model_len": sched_cfg.max_model_len,
        "num_steps": scheduler.num_steps,
        "duration_s": end_s,
        "prefix_cache_queries_tokens": scheduler.kv.prefix_queries,
        "prefix_cache_hits_tokens": scheduler.kv.prefix_hits,
    }
    return (
        pd.DataFrame(recorder.requests_table()),
        pd.DataFrame(recorder.steps_table()),
        recorder.itl_s,
        info,
    )


def _step_time_model(kind, model, hw, par, block_size, factory):
    if kind != "auto":
        return factory(kind, model, hw, par, block_size), kind
    try:
        return factory("vidur", model, hw, par, block_size), "vidur"
    except ValueError as e:
        return factory("roofline", model, hw, par, block_size), f"roofline (no Vidur profile: {e})"


class _NoBar:
    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass


def _progress(cfg: dict[str, Any], total: int):
    if not cfg.get("progress", True):
        return _NoBar()
    from tqdm import tqdm

    # disable=None: shown on a terminal only, so logs and CI stay clean
    return tqdm(total=total, unit="req", desc="simulating", disable=None, mininterval=0.5)
