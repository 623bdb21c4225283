"""`backend=engine`: the workload replayed on the real engine, arrivals honoured, into the same tables."""

from __future__ import annotations

import dataclasses
import gc
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import pandas as pd
from servebench.engine.core.request import Request
from servebench.engine.core.sampling_params import SamplingParams
from servebench.engine.digest import source_digest
from servebench.engine.llm_engine import release_engines
from servebench.sim.lora import LoRA, lora_spec
from servebench.workbench.core_configs import cache_config, scheduler_config
from servebench.workbench.metrics import lora_loads, num_truncated
from servebench.workbench.runs import RunResult
from servebench.workbench.scheduler_stats import scheduler_counts
from servebench.workbench.terminal import Progress
from servebench.workbench.token_ids import MIN_TOKEN_ID
from servebench.workbench.workload_requests import assign_adapters, iter_requests, with_lora_ids
from servebench.workbench.workloads import load_workload

TIME_COLUMNS = ("arrival_s", "first_scheduled_s", "first_token_s", "finish_s")


def run(cfg: dict[str, Any], engine: Any = None) -> RunResult:
    """Replay the workload in real time. `engine`: one `build_engine` made for the same model and knobs,
    reset and reused (one model load for several runs; the caller owns it); None builds one for this run
    and releases it when the run ends, failed or not, so the next run of the process (a Hydra multirun's
    next job) finds the device memory free."""
    if engine is not None:
        engine.reset()
        return _replay(cfg, engine)
    try:
        engine = build_engine(cfg)
        return _replay(cfg, engine)
    except BaseException as e:
        # The launcher keeps a failed job's exception, whose frames would keep this engine alive.
        traceback.clear_frames(e.__traceback__)
        raise
    finally:
        if engine is not None:
            engine.shutdown()  # its tensor-parallel ranks, if any
        engine = None
        release_engines()


def _replay(cfg: dict[str, Any], engine: Any) -> RunResult:
    workload = load_workload(cfg["workload"])
    lora = lora_spec(cfg.get("lora"))
    rec = engine.recorder
    allocs_before = _device_allocations(engine)
    with tempfile.TemporaryDirectory() as tmp:  # random adapters live as long as the run reads them
        loras = adapters(lora, engine, Path(tmp)) if lora.enabled else {}
        if loras:  # the simulator's draw: the same adapter for each request on both backends
            workload = assign_adapters(workload, lora.num_adapters, lora.distribution, lora.zipf_s,
                                       cfg["workload"].get("seed", 0))
        t0 = engine.now()
        with GCPauses() as pauses, Progress(len(workload), "engine", cfg.get("progress", True)) as bar:
            _serve(engine, workload, loras, t0, bar)
    requests = pd.DataFrame(rec.requests_table())
    for col in TIME_COLUMNS:
        requests[col] -= t0
    steps = pd.DataFrame(rec.steps_table())
    steps["start_s"] -= t0
    info = {
        "backend": "engine",
        "device": str(engine.runner.device),
        **_device_names(engine.runner.device),
        "source_digest": source_digest(),  # the engine and kernel code that ran (engine.digest)
        "num_gpu_blocks": engine.runner.kv_cache.num_gpu_blocks,
        "num_cpu_blocks": engine.runner.kv_cache.num_cpu_blocks,
        # The simulator's names: what the weights (quantized as they run) and the KV cache hold.
        "quantization": engine.args.quantization or "none",
        "kv_cache_dtype": engine.args.kv_cache_dtype,
        "weight_gib": engine.runner.weight_bytes / 2**30,
        "kv_cache_gib": engine.runner.kv_cache_bytes / 2**30,
        **scheduler_counts([engine.stats()], engine.now() - t0),
        "num_truncated": num_truncated(requests, workload),
        # Host pauses no step-time model predicts: how often Python's garbage collector stopped the loop.
        "gc_collections": pauses.count,
        "gc_pause_s": pauses.seconds,
        "gc_max_pause_ms": pauses.longest * 1e3,
        # cudaMalloc / cudaFree calls and allocator retries during the replay: each can stall a step by
        # milliseconds, in serving (varied step shapes) but not in the profiler (one shape back to back).
        **{k: v - allocs_before.get(k, 0) for k, v in _device_allocations(engine).items()},
    }
    if loras:
        info |= lora_loads(steps) | {"lora_gib": engine.runner.lora_bytes / 2**30}
        requests = with_lora_ids(requests, workload)
    return RunResult(requests, steps, rec.itl_s, info)


def _serve(engine: Any, workload: pd.DataFrame, loras: dict[int, Any], t0: float, bar: Progress) -> None:
    """Submit each request at its arrival (`t0` + its arrival time) and step the engine until all ended."""
    pending = iter_requests(workload, engine.vocab_size)
    nxt = next(pending, None)
    rec = engine.recorder
    while nxt is not None or engine.has_unfinished_requests():
        now = engine.now() - t0
        while nxt is not None and nxt.arrival_time <= now:
            _submit(engine, nxt, t0, loras.get(nxt.lora_id))
            nxt = next(pending, None)
        if engine.has_unfinished_requests():
            engine.step(final_only=True)
        elif nxt is not None:
            time.sleep(max(0.0, nxt.arrival_time - (engine.now() - t0)))
        # The trace holds every request that ended (step()'s outputs, final_only, are not kept).
        if len(rec.request_rows) > bar.done:
            bar.update(len(rec.request_rows) - bar.done)


def adapters(lora: LoRA, engine: Any, folder: Path) -> dict[int, Any]:
    """LoRARequests of adapters 1..lora.num_adapters, made known to the engine (a bad folder fails here,
    before the clock starts): the folders of lora.paths, or random adapters of lora.rank written in
    `folder`."""
    from servebench.engine.dummy import write_dummy_adapter
    from servebench.engine.lora import LoRARequest

    cfg = engine.model_config
    paths = lora.paths or [write_dummy_adapter(folder / f"adapter-{i}", cfg, lora.rank, seed=i)
                           for i in range(1, lora.num_adapters + 1)]
    requests = {i: LoRARequest(f"adapter-{i}", i, str(path)) for i, path in enumerate(paths, start=1)}
    for request in requests.values():
        engine.add_lora(request)
    return requests


def _device_names(device: Any) -> dict[str, str]:
    """Which card and torch ran the replay (study reports name them)."""
    import torch
    from servebench.kernels.dispatch import device_name

    return {"card": device_name(device), "torch": torch.__version__}


def _device_allocations(engine: Any) -> dict[str, int]:
    if engine.runner.device.type != "cuda":
        return {}
    import torch

    stats = torch.cuda.memory_stats(engine.runner.device)
    return {"cuda_mallocs": stats.get("num_device_alloc", 0), "cuda_frees": stats.get("num_device_free", 0),
            "cuda_alloc_retries": stats.get("num_alloc_retries", 0)}


class GCPauses:
    """Counts Python's garbage collections and their total and longest pause while the block runs."""

    def __init__(self) -> None:
        self.count, self.seconds, self.longest, self._start = 0, 0.0, 0.0, 0.0

    def __enter__(self) -> GCPauses:
        gc.callbacks.append(self._on_gc)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        pause = time.perf_counter() - self._start
        self.count += 1
        self.seconds += pause
        self.longest = max(self.longest, pause)


def _submit(engine: Any, req: Request, t0: float, lora_request: Any) -> None:
    """Hand a workload request to the engine as the simulator's scheduler takes it: a prompt longer than
    max_model_len is rejected (and recorded), max_tokens is cut to what max_model_len leaves; it runs with
    its adapter's `lora_request` (None: the base model)."""
    params = req.sampling_params
    room = max(engine.max_model_len - req.num_prompt_tokens, 1)
    if params.max_tokens is not None and params.max_tokens > room:
        params = dataclasses.replace(params, max_tokens=room)
    engine.add_request(req.request_id, None, req.prompt_token_ids, params, arrival_time=req.arrival_time + t0,
                       priority=req.priority, reject_if_too_long=True, lora_request=lora_request)


def build_engine(cfg: dict[str, Any]) -> Any:
    """The engine the config describes (dummy weights unless backend.model_path), warmed up unless
    backend.warmup is false."""
    from servebench.engine.config import EngineArgs
    from servebench.engine.dummy import write_dummy_model_dir
    from servebench.engine.llm_engine import LLMEngine

    b, lora = cfg["backend"], lora_spec(cfg.get("lora"))
    sched = scheduler_config(_with_lora_slots(cfg, lora), cfg["model"]["max_model_len"])
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = b.get("model_path") or str(write_dummy_model_dir(_dummy_config(cfg), Path(tmp)))
        # The harness's whole scheduler and cache groups, so every engine/core policy runs on the engine too.
        engine = LLMEngine(_engine_args(cfg, model_dir, sched, lora, EngineArgs), sched, cache_config(cfg))
        if b.get("warmup", True):
            warm_up(engine, _warmup_adapter(lora, engine, Path(tmp)))
    return engine


def _warmup_adapter(lora: LoRA, engine: Any, folder: Path) -> Any:
    """With LoRA, a random adapter of lora.rank that compiles the LoRA kernels in the warm-up (whose reset
    forgets it); None without."""
    return adapters(LoRA(num_adapters=1, rank=lora.rank), engine, folder)[1] if lora.enabled else None


def _with_lora_slots(cfg: dict[str, Any], lora: LoRA) -> dict[str, Any]:
    """With adapters and scheduler.max_loras 0 (no slot limit), a GPU slot for each adapter."""
    if not lora.enabled or cfg["scheduler"].get("max_loras"):
        return cfg
    return {**cfg, "scheduler": {**cfg["scheduler"], "max_loras": lora.num_adapters}}


WARMUP_PROMPTS = (1, 16, 17, 100, 512, 1000, 2051)  # token counts: odd and multiple-of-16 shapes, long ones


def warm_up(engine: Any, lora_request: Any = None) -> None:
    """Compile the Triton kernels for this model's shapes before the clock starts: each prompt alone, then
    all at once (a mixed batch), a few decode steps each; a kernel's first use would add seconds to a TTFT.
    With a `lora_request`, every other prompt runs with that adapter."""
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    prompts = [n for n in WARMUP_PROMPTS if n + params.max_tokens <= engine.max_model_len]
    for group in [*([n] for n in prompts), prompts]:
        for i, n in enumerate(group):
            ids = [MIN_TOKEN_ID + j % 50 for j in range(n)]
            engine.add_request(f"warmup-{len(group)}-{i}", None, ids, params,
                               lora_request=lora_request if i % 2 == 0 else None)
        while engine.has_unfinished_requests():
            engine.step(final_only=True)
    engine.reset()


def _dummy_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """config.json of the model group's shape; with an int4 quantization group, the quantization_config a
    checkpoint of that method would carry (bits, group size: null is per channel)."""
    from servebench.engine.dummy import hf_config

    config = hf_config(cfg["model"])
    q = cfg.get("quantization") or {}
    if q.get("method") in ("awq", "gptq"):
        config["quantization_config"] = {"quant_method": q["method"], "bits": q.get("weight_bits", 4),
                                         "group_size": q.get("group_size") or -1}
    return config


def _engine_args(cfg: dict[str, Any], model_dir: str, sched: Any, lora: LoRA, engine_args: type) -> Any:
    """EngineArgs of the backend group, the quantization method, KV-cache dtype and LoRA (max_lora_rank: the
    smallest that holds lora.rank); the scheduler and cache knobs reach the engine in their configs."""
    from servebench.engine.config import CUDAGRAPH_MODES, DEFAULT_CUDAGRAPH_MODE, LORA_RANKS

    b, method = cfg["backend"], (cfg.get("quantization") or {}).get("method", "none")
    graphs = b.get("cudagraph_mode", DEFAULT_CUDAGRAPH_MODE)
    if graphs not in CUDAGRAPH_MODES:
        raise ValueError(f"backend.cudagraph_mode={graphs!r}: choose {', '.join(CUDAGRAPH_MODES)}")
    lora_args = {}
    if lora.enabled:
        rank = next((r for r in LORA_RANKS if r >= lora.rank), None)
        if rank is None:
            raise ValueError(f"lora.rank={lora.rank}: the engine serves ranks up to {LORA_RANKS[-1]}")
        lora_args = {"enable_lora": True, "max_lora_rank": rank, "max_loras": sched.max_loras,
                     "max_cpu_loras": sched.max_cpu_loras}
    return engine_args(**lora_args,
        model=model_dir,
        tensor_parallel_size=(cfg.get("parallel") or {}).get("tensor_parallel_size", 1),
        dtype=b.get("dtype", "auto"),
        seed=b.get("seed", 0),
        enforce_eager=b.get("enforce_eager", False),
        compilation_config={"cudagraph_mode": graphs},
        async_scheduling=b.get("async_scheduling", False),
        device=b.get("device", "auto"),
        load_format="auto" if b.get("model_path") else "dummy",
        max_model_len=sched.max_model_len,
        quantization=None if method == "none" else method,
        kv_cache_dtype=cfg["cache"].get("kv_cache_dtype", "auto"),
    )
