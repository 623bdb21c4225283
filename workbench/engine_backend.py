"""`backend=engine`: the workload replayed on the real engine, arrivals honoured, into the same tables."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

from workbench.experiment import cache_config, scheduler_config
from workbench.workloads import iter_requests, load_workload

TIME_COLUMNS = ("arrival_s", "first_scheduled_s", "first_token_s", "finish_s")


def replay_on_engine(cfg: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame, Any, dict[str, Any]]:
    from engine import LLMEngine
    from engine.config import EngineArgs
    from engine.dummy import hf_config, write_dummy_model_dir

    b = cfg["backend"]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = b.get("model_path") or str(write_dummy_model_dir(hf_config(cfg["model"]), Path(tmp)))
        engine = LLMEngine(_engine_args(cfg, model_dir, EngineArgs))
    workload = load_workload(cfg["workload"])
    pending = iter_requests(workload, engine.vocab_size)
    nxt = next(pending, None)
    t0 = engine.now()
    while nxt is not None or engine.has_unfinished_requests():
        now = engine.now() - t0
        while nxt is not None and nxt.arrival_time <= now:
            engine.add_request(
                nxt.request_id,
                None,
                nxt.prompt_token_ids,
                nxt.sampling_params,
                arrival_time=t0 + nxt.arrival_time,
                priority=nxt.priority,
            )
            nxt = next(pending, None)
        if engine.has_unfinished_requests():
            engine.step(final_only=True)
        elif nxt is not None:
            time.sleep(max(0.0, nxt.arrival_time - (engine.now() - t0)))
    rec = engine.recorder
    requests = pd.DataFrame(rec.requests_table())
    for col in TIME_COLUMNS:
        requests[col] -= t0
    steps = pd.DataFrame(rec.steps_table())
    steps["start_s"] -= t0
    info = {
        "backend": "engine",
        "device": str(engine.runner.device),
        "num_gpu_blocks": engine.runner.num_gpu_blocks,
        "num_cpu_blocks": engine.runner.num_cpu_blocks,
        "num_steps": engine.scheduler.num_steps,
        "duration_s": engine.now() - t0,
        "prefix_cache_queries_tokens": engine.scheduler.kv.prefix_queries,
        "prefix_cache_hits_tokens": engine.scheduler.kv.prefix_hits,
    }
    return requests, steps, rec.itl_s, info


def _engine_args(cfg: dict[str, Any], model_dir: str, engine_args: type) -> Any:
    b, cache = cfg["backend"], cache_config(cfg)
    sched = scheduler_config(cfg, cfg["model"]["max_model_len"])
    return engine_args(
        model=model_dir,
        dtype=b.get("dtype", "auto"),
        seed=b.get("seed", 0),
        enforce_eager=b.get("enforce_eager", False),
        device=b.get("device", "auto"),
        load_format="auto" if b.get("model_path") else "dummy",
        max_model_len=sched.max_model_len,
        max_num_seqs=sched.max_num_seqs,
        max_num_batched_tokens=sched.max_num_batched_tokens,
        enable_chunked_prefill=sched.enable_chunked_prefill,
        preemption_mode=sched.preemption_mode,
        scheduling_policy=sched.queue_policy,
        enable_prefix_caching=cache.enable_prefix_caching,
        gpu_memory_utilization=cache.gpu_memory_utilization,
        swap_space=cache.swap_space,
        block_size=cache.block_size,
        num_gpu_blocks_override=cache.num_gpu_blocks_override,
    )
