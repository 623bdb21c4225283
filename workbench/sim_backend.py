"""`backend=sim`: the workload through the shared scheduler on the SimPy clock, into the run's tables."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from servebench.engine.core import CacheConfig, Scheduler, SchedulerConfig, SchedulerOutput, TraceRecorder
from servebench.engine.core.graphs import GraphSizes
from servebench.engine.digest import REPO, stale_warning
from servebench.sim.calibrate import mixed_graphs
from servebench.sim.cluster import ClusterSimulation, Deployment, deployment_spec, make_router
from servebench.sim.lora import LoRA, LoRATerm, lora_spec
from servebench.sim.multimodal import (
    EncoderTerm,
    Multimodal,
    VisionEncoder,
    encoder_weight_bytes,
    multimodal_spec,
)
from servebench.sim.quantization import Quantization, QuantizationTerm, kv_dtype_bytes, quantization_spec
from servebench.sim.simulator import StepTimeModel
from servebench.sim.specs import (
    HardwareSpec,
    ModelSpec,
    ParallelSpec,
    block_bytes,
    default_activation_reserve,
    hardware_spec,
    model_spec,
    num_cpu_blocks,
    num_gpu_blocks,
    parallel_spec,
    weight_bytes_per_gpu,
)
from servebench.sim.step_time_models import make_step_time_model
from servebench.sim.terms import Term, with_terms
from servebench.workbench.core_configs import cache_config, scheduler_config
from servebench.workbench.metrics import lora_loads, num_truncated
from servebench.workbench.runs import RunResult
from servebench.workbench.scheduler_stats import per_replica_counts, scheduler_counts
from servebench.workbench.terminal import Progress
from servebench.workbench.workload_requests import (
    assign_adapters,
    assign_images,
    iter_requests,
    with_lora_ids,
)
from servebench.workbench.workloads import load_workload


@dataclass(slots=True)
class _Specs:
    """What the config says about the simulated deployment, as the simulator's specs."""

    model: ModelSpec
    hw: HardwareSpec
    par: ParallelSpec
    cluster: Deployment  # replicas and router
    sched: SchedulerConfig
    cache: CacheConfig
    quant: Quantization
    kv_bytes: int | None  # bytes per KV element when kv_cache_dtype is not the model's
    lora: LoRA
    mm: Multimodal
    encoder: VisionEncoder | None

    @property
    def block_bytes(self) -> int:
        return block_bytes(self.model, self.par, self.cache.block_size, self.kv_bytes)


def run(cfg: dict[str, Any]) -> RunResult:
    """The configured workload through the shared scheduler on the SimPy clock: `deployment.num_replicas`
    replicas, each with `pipeline_parallel_size` virtual engines (sim.cluster)."""
    d = _specs(cfg)
    blocks, cpu_blocks = _num_blocks(d)
    backend = cfg["backend"]
    base, step_time_name, step_time_reason = _step_time_model(
        backend.get("step_time", "auto"), d, backend.get("profile_root"), mixed_graphs(backend))
    if d.sched.preemption_mode == "cost" or d.sched.shed_ttft_ms:
        _fill_step_costs(d.sched, base, d.block_bytes / (d.hw.pcie_gbs * 1e9))
    workload = _workload(cfg["workload"], d)
    # vLLM V0 pipelining: P virtual engines per replica, each with 1/P of the KV blocks (sim.cluster)
    pp = d.par.pipeline_parallel_size
    recorders = [[TraceRecorder() for _ in range(pp)] for _ in range(d.cluster.num_replicas)]
    replicas = [[Scheduler(d.sched, d.cache, blocks // pp, cpu_blocks // pp, rec) for rec in replica]
                for replica in recorders]
    # one set of terms per replica: LoRA and encoder terms count that replica's loads and images
    quant_term = _quantization_term(d)
    terms = [_feature_terms(quant_term, d) for _ in replicas]
    step_times = [with_terms(base, t) for t in terms]
    requests = iter_requests(workload, d.model.vocab_size, d.mm.image_tokens or 0)
    with Progress(len(workload), "simulating", cfg.get("progress", True)) as bar:
        sim = ClusterSimulation(replicas, step_times, requests, make_router(d.cluster.router), bar.update,
                                _graph_sizes(backend, d.sched), backend.get("async_scheduling", False),
                                backend.get("device_time_scale", 1.0))
        end_s = sim.run()
    stats = [[s.stats() for s in replica] for replica in replicas]
    all_stats = [s for replica in stats for s in replica]
    info = {
        "backend": "sim",
        "step_time_model": step_time_name,
        "step_time_reason": step_time_reason,
        "step_time_stale": _stale(base),
        **_memory_info(d, blocks, cpu_blocks),
        **scheduler_counts(all_stats, end_s),
    }
    if hasattr(base, "num_outside"):  # profile tables: steps priced by the roofline instead
        info["num_steps_outside_profile"] = base.num_outside
    if len(all_stats) > 1:
        info["per_replica"] = per_replica_counts(stats)
    info |= _images_encoded([t for replica_terms in terms for t in replica_terms])
    requests_df, steps_df, itl = _tables(recorders)
    info["num_truncated"] = num_truncated(requests_df, workload)
    if d.lora.enabled:
        info |= lora_loads(steps_df)
        requests_df = with_lora_ids(requests_df, workload)
    return RunResult(requests_df, steps_df, itl, info)


def _specs(cfg: dict[str, Any]) -> _Specs:
    model = model_spec(cfg["model"])
    hw, par = hardware_spec(cfg["hardware"]), parallel_spec(cfg.get("parallel"))
    cluster = deployment_spec(cfg.get("deployment"))
    quant = quantization_spec(cfg.get("quantization"))
    kv_bytes = kv_dtype_bytes(cfg["cache"].get("kv_cache_dtype", "auto"))
    lora = lora_spec(cfg.get("lora"))
    mm, encoder = multimodal_spec(cfg.get("multimodal"), model)
    # built in this order, so that of several bad groups the same one is reported as before
    sched, cache = scheduler_config(cfg, model.max_model_len), cache_config(cfg)
    return _Specs(model, hw, par, cluster, sched, cache, quant, kv_bytes, lora, mm, encoder)


def _linear_bytes(d: _Specs) -> float | None:
    return d.quant.bytes_per_weight if d.quant.enabled else None


def _num_blocks(d: _Specs) -> tuple[int, int]:
    """GPU and CPU KV blocks: what vLLM's memory profiling would leave for the cache on each GPU."""
    model, par, bs = d.model, d.par, d.cache.block_size
    reserve = default_activation_reserve(model, par, d.sched.max_num_batched_tokens)
    if d.lora.enabled:  # vLLM preallocates max_loras adapter slots (no limit: every adapter resident)
        reserve += d.lora.slot_bytes_per_gpu(model, par, d.sched.max_loras or d.lora.num_adapters)
    if d.encoder is not None:
        reserve += encoder_weight_bytes(d.encoder, model, par)
    blocks = d.cache.num_gpu_blocks_override or num_gpu_blocks(
        model, d.hw, par, d.cache.gpu_memory_utilization, bs, reserve,
        linear_weight_bytes=_linear_bytes(d), kv_dtype_bytes=d.kv_bytes,
    )
    return blocks, num_cpu_blocks(d.cache.swap_space, model, par, bs, d.kv_bytes)


def _memory_info(d: _Specs, blocks: int, cpu_blocks: int) -> dict[str, Any]:
    return {
        "quantization": d.quant.note(d.hw),
        "num_gpu_blocks": blocks,
        "num_cpu_blocks": cpu_blocks,
        # per GPU: what vLLM reserves (gpu_memory_utilization x memory) and what of it the KV cache holds
        "gpu_memory_gib": d.cache.gpu_memory_utilization * d.hw.mem_gib,
        "kv_cache_gib": blocks * d.block_bytes / 2**30,
        "weight_gib": weight_bytes_per_gpu(d.model, d.par, _linear_bytes(d)) / 2**30,
        "max_num_batched_tokens": d.sched.max_num_batched_tokens,
        "max_model_len": d.sched.max_model_len,
    }


def _workload(spec: dict[str, Any], d: _Specs) -> pd.DataFrame:
    """The workload, with the adapter and image columns its LoRA and multimodal settings ask for."""
    workload = load_workload(spec)
    seed = spec.get("seed", 0)
    if d.lora.enabled:
        workload = assign_adapters(workload, d.lora.num_adapters, d.lora.distribution, d.lora.zipf_s, seed)
    if d.mm.enabled:
        workload = assign_images(workload, d.mm.images_per_request, d.mm.num_unique_images, seed)
    return workload


def _quantization_term(d: _Specs) -> QuantizationTerm | None:
    """One for all replicas: it counts nothing, unlike the LoRA and encoder terms."""
    if not (d.quant.enabled or d.kv_bytes):
        return None
    return QuantizationTerm(d.model, d.hw, d.par, d.cache.block_size, d.quant, d.kv_bytes)


def _feature_terms(quant_term: QuantizationTerm | None, d: _Specs) -> list[Term]:
    """Step-time terms of the features that are on (sim.terms): none by default."""
    terms: list[Term] = [quant_term] if quant_term is not None else []
    if d.lora.enabled:
        terms.append(LoRATerm(d.model, d.hw, d.par, d.lora))
    if d.encoder is not None:
        terms.append(EncoderTerm(d.encoder, d.model, d.hw, d.par))
    return terms


def _images_encoded(terms: list[Term]) -> dict[str, Any]:
    """Images encoded, summed over replicas (for summary.json)."""
    encoders = [t for t in terms if isinstance(t, EncoderTerm)]
    return {"images_encoded": sum(t.num_encoded for t in encoders)} if encoders else {}


def _tables(recorders: list[list[TraceRecorder]]) -> tuple[pd.DataFrame, pd.DataFrame, Any]:
    """requests and steps of every scheduler's recorder with `replica` (and, pipelined, `virtual_engine`)
    columns; steps in order of start time; every inter-token gap."""
    pipelined = len(recorders[0]) > 1
    requests, steps = [], []
    for r, replica in enumerate(recorders):
        for v, rec in enumerate(replica):
            where = {"replica": r} | ({"virtual_engine": v} if pipelined else {})
            requests.append(pd.DataFrame(rec.requests_table()).assign(**where))
            steps.append(pd.DataFrame(rec.steps_table()).assign(**where))
    if len(requests) == 1:
        return requests[0], steps[0], recorders[0][0].itl_s
    steps_df = pd.concat(steps, ignore_index=True).sort_values("start_s", kind="stable", ignore_index=True)
    itl = np.concatenate([np.asarray(rec.itl_s) for replica in recorders for rec in replica])
    return pd.concat(requests, ignore_index=True), steps_df, itl


def _fill_step_costs(sched_cfg: SchedulerConfig, step_time: Any, swap_s_per_block: float) -> None:
    """preemption_mode=cost and TTFT shedding: the costs left null, from the hardware's PCIe bandwidth and
    the step-time model (one prefill chunk of max_num_batched_tokens tokens, per token)."""
    if sched_cfg.swap_s_per_block is None:
        sched_cfg.swap_s_per_block = swap_s_per_block
    if sched_cfg.recompute_s_per_token is None:
        n = sched_cfg.max_num_batched_tokens
        chunk = SchedulerOutput(num_prefill_tokens=n, prefill_chunks=[(n, 0)])
        sched_cfg.recompute_s_per_token = step_time.predict(chunk) / n


def _stale(step_time: Any) -> str | None:
    """One line, also printed, when the profile or calibration the step times come from measured other
    engine code than this checkout's (engine.digest); None when it matches or no engine data is used."""
    meta = getattr(step_time, "meta", None)
    if meta is None:
        return None
    folder = Path(step_time.folder).resolve()
    warning = stale_warning(str(folder.relative_to(REPO) if folder.is_relative_to(REPO) else folder), meta)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return warning


def _graph_sizes(backend: dict[str, Any], sched_cfg: SchedulerConfig) -> GraphSizes | None:
    """The CUDA graphs the engine would capture: none with backend.enforce_eager."""
    if backend.get("enforce_eager", False):
        return None
    return GraphSizes.of(sched_cfg.max_num_seqs, sched_cfg.max_num_batched_tokens, mixed_graphs(backend))


def _step_time_model(kind: str, d: _Specs, engine_profiles: str | None, graphs: bool
                     ) -> tuple[StepTimeModel, str, str]:
    """The model, its name and why it was chosen. auto: the calibration of this model and card (fitted with
    the engine's cudagraph_mode: `graphs`, FULL), else its engine profiles, else Vidur's, else the
    roofline."""
    def build(name: str) -> StepTimeModel:
        return make_step_time_model(name, d.model, d.hw, d.par, d.cache.block_size,
                                    engine_profile_root=engine_profiles, mixed_graphs=graphs,
                                    max_num_seqs=d.sched.max_num_seqs)

    if kind != "auto":
        return build(kind), kind, f"backend.step_time={kind}"
    for name in ("calibrated", "profile"):
        try:
            st = build(name)
            return st, name, f"the engine's {name} step times in {st.folder}"
        except ValueError as e:
            why = f"no engine {name} step times: {e}"
    try:
        return build("vidur"), "vidur", why
    except ValueError as e:
        return build("roofline"), "roofline", f"{why}; no Vidur profile: {e}"
