"""Deployment models in the simulator: replicas behind a router, pipeline parallelism, quantization, LoRA
and images, each driven through the CLI's config keys."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from servebench.engine.core.request import Request
from servebench.engine.core.sampling_params import SamplingParams
from servebench.sim.lora import LoRATerm, lora_spec
from servebench.sim.quantization import QuantizationTerm, quantization_spec
from servebench.sim.specs import ParallelSpec, num_gpu_blocks
from servebench.sim.step_time_models import make_step_time_model
from servebench.workbench import sim_backend
from servebench.workbench.metrics import summarize
from test_step_time import conf, hw, model, step

REPO = Path(__file__).resolve().parents[1]


def run(*overrides: str) -> dict:
    """The summary of a simulated run of the default config with `overrides`, as the CLI would build it."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = OmegaConf.to_container(compose("config", [*overrides, "progress=false"]), resolve=True)
    result = sim_backend.run(cfg)
    summary = summarize(result.requests, result.steps, result.itl_s, None, result.info.pop("duration_s"))
    return summary | result.info | {"requests": result.requests, "steps": result.steps}


def test_prefix_aware_routing_raises_the_hit_rate_on_mooncake() -> None:
    common = ("model=llama3_1_8b", "hardware=h100_80g", "backend.step_time=roofline", "workload=mooncake",
              "workload.num_requests=400", "deployment.num_replicas=4",
              "cache.num_gpu_blocks_override=100000")
    rr, pa = (run(*common, f"deployment.router={r}") for r in ("round_robin", "prefix_aware"))
    # round robin scatters a conversation's turns over the replicas; prefix-aware sends each to its cache
    assert pa["prefix_cache_hit_rate"] > 1.5 * rr["prefix_cache_hit_rate"] > 0
    assert pa["mean_ttft_ms"] < rr["mean_ttft_ms"]
    assert rr["per_replica"]["num_requests"] == [100] * 4
    assert sorted(rr["requests"]["replica"].unique()) == [0, 1, 2, 3]
    assert set(rr["steps"]["replica"]) == {0, 1, 2, 3}


def test_least_outstanding_balances_the_load() -> None:
    s = run("workload=synthetic", "workload.num_requests=300", "workload.request_rate=30",
            "deployment.num_replicas=3", "deployment.router=least_outstanding")
    assert s["num_finished"] == 300 and min(s["per_replica"]["num_requests"]) > 60


PIPELINE = ("model=llama2_70b", "hardware=h100_80g", "parallel=tp4", "backend.step_time=roofline",
            "workload=synthetic", "workload.input_len=512", "workload.output_len=128",
            "cache.num_gpu_blocks_override=40000")


@pytest.mark.parametrize("pp", [2, 4])
def test_pipeline_stages_overlap_batches_but_not_one_request(pp: int) -> None:
    def both(*extra):
        return [run(*PIPELINE, *extra, f"parallel.pipeline_parallel_size={p}") for p in (1, pp)]

    # one request: its batches go through the stages one after another, so no speedup (only the sends)
    one, piped = both("workload.num_requests=1")
    assert one["mean_tpot_ms"] <= piped["mean_tpot_ms"] < 1.02 * one["mean_tpot_ms"]
    # saturated (all requests at t = 0, 32 a virtual engine): pp batches in flight, ~pp x the throughput
    full, piped = both("workload.num_requests=512", "workload.request_rate=null", "scheduler.max_num_seqs=32")
    assert 0.85 * pp < piped["output_throughput"] / full["output_throughput"] <= pp
    assert set(piped["steps"]["virtual_engine"]) == set(range(pp))


def test_tensor_and_pipeline_layouts_on_a100_40g() -> None:
    for layout in (["parallel=tp2"], ["parallel=tp4"], ["parallel=tp2", "parallel.pipeline_parallel_size=2"]):
        s = run("hardware=a100_40g", *layout, "workload=synthetic", "workload.num_requests=50")
        assert s["num_finished"] == 50 and s["step_time_model"].startswith("vidur"), layout


def test_awq_raises_kv_capacity_and_lowers_small_batch_decode_time() -> None:
    m, h, par = model("llama2_7b"), hw("a100_80g"), ParallelSpec()
    awq = quantization_spec(conf("quantization", "awq"))
    assert awq.bytes_per_weight == pytest.approx(0.5 + 2.5 / 128)
    plain_blocks = num_gpu_blocks(m, h, par, 0.9, 16)
    awq_blocks = num_gpu_blocks(m, h, par, 0.9, 16, linear_weight_bytes=awq.bytes_per_weight)
    assert awq_blocks > 1.1 * plain_blocks  # ~9 GiB of weights freed for KV
    for kind in ("roofline", "vidur"):
        base = make_step_time_model(kind, m, h, par, 16)
        term = QuantizationTerm(m, h, par, 16, awq, None)
        small, large = step([1024] * 4), step(chunks=[(8192, 0)])
        assert base.predict(small) + term(small) < 0.7 * base.predict(small)  # memory-bound: 4x fewer bytes
        assert term(large) > 0  # compute-bound: dequantization costs a little


def test_fp8_kv_cache_doubles_blocks_and_fp8_on_a100_falls_back_to_weight_only() -> None:
    plain, fp8_kv = (run("workload=synthetic", "workload.num_requests=20", f"cache.kv_cache_dtype={d}")
                     for d in ("auto", "fp8"))
    assert fp8_kv["num_gpu_blocks"] == pytest.approx(2 * plain["num_gpu_blocks"], rel=0.01)
    a100 = run("workload=synthetic", "workload.num_requests=20", "quantization=fp8")
    assert "no fp8 tensor cores" in a100["quantization"]
    h100 = run("hardware=h100_80g", "workload=synthetic", "workload.num_requests=20", "quantization=fp8")
    assert "2.00x" in h100["quantization"]


LORA = ("workload=synthetic", "workload.num_requests=300", "workload.request_rate=8", "lora.num_adapters=32",
        "scheduler.max_loras=2")


def test_lora_adapters_load_into_few_slots_and_cost_time() -> None:
    roomy = run(*LORA[:4], "scheduler.max_loras=0")  # every adapter resident: nothing loads
    tight, cached = (run(*LORA, f"scheduler.max_cpu_loras={n}") for n in (2, 32))
    assert roomy["lora_loads"] == 0
    assert tight["lora_loads"] == tight["lora_loads_from_disk"] > 32  # reloads: a 2-adapter CPU cache misses
    assert tight["mean_lora_load_ms"] > 20  # ~80 MB a Llama-2-7B rank-16 adapter, from disk at 2 GB/s
    assert tight["mean_ttft_ms"] > 2 * roomy["mean_ttft_ms"]  # requests wait for a slot
    # a CPU cache of every adapter: each is read from disk once, reloads come over PCIe
    assert cached["lora_loads_from_disk"] <= 32 < cached["lora_loads"]
    assert cached["mean_lora_load_ms"] < tight["mean_lora_load_ms"]
    assert set(tight["requests"]["lora_id"]) == set(range(1, 33))


def test_zipf_draws_popular_adapters_and_sgmv_costs_little() -> None:
    s = run(*LORA, "lora.distribution=zipf")
    counts = s["requests"]["lora_id"].value_counts()
    assert counts[1] > 5 * counts.get(32, 0)
    m, h, par = model("llama2_7b"), hw("a100_80g"), ParallelSpec()
    term = LoRATerm(m, h, par, lora_spec({"num_adapters": 4}))
    batch = step([1024] * 16)
    batch.requests = [Request(str(i), [1], SamplingParams(), lora_id=1 + i % 4) for i in range(16)]
    batch.num_scheduled_tokens = [1] * 16
    base = make_step_time_model("roofline", m, h, par, 16).predict(batch)
    assert 0 < term(batch) < 0.1 * base  # 4 adapters' SGMV: a few % of the step (Punica, S-LoRA)


IMAGES = ("model=llava1_5_13b", "workload=synthetic", "workload.num_requests=200", "workload.request_rate=2",
          "workload.input_len=64", "workload.output_len=32", "multimodal.images_per_request=4",
          "multimodal.num_unique_images=8", "cache.enable_prefix_caching=false")


def test_encoder_cache_lowers_ttft_on_repeated_images() -> None:
    off, on = (run(*IMAGES, f"scheduler.encoder_cache_size={n}") for n in (0, 8 * 576))
    assert off["images_encoded"] == 800 and on["images_encoded"] == 8
    assert on["mean_ttft_ms"] < off["mean_ttft_ms"]
    assert off["requests"]["prompt_tokens"].min() == 64 + 4 * 576  # placeholders are part of the prompt


@pytest.mark.parametrize("override, key", [
    ("deployment.num_replicas=0", "deployment.num_replicas"),
    ("deployment.router=random", "deployment.router"),
    ("quantization.method=int3", "quantization.method"),
    ("cache.kv_cache_dtype=int8", "cache.kv_cache_dtype"),
    ("lora.distribution=pareto", "lora.distribution"),
    ("multimodal.images_per_request=2", "multimodal.images_per_request"),  # llama2_7b sees no images
])
def test_bad_deployment_values_name_their_key(override: str, key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        run(override, "workload=synthetic", "workload.num_requests=5")


def test_cli_rejects_a_bad_router_in_one_line(tmp_path) -> None:
    cmd = [sys.executable, "-m", "workbench", f"hydra.run.dir={tmp_path}", "deployment.router=random"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.startswith("workbench: error: deployment.router='random'")
