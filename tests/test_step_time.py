"""Step-time models, specs and KV capacity: behaviour a simulator user relies on."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from servebench.engine.core.scheduler_output import SchedulerOutput
from servebench.sim.specs import (
    GiB,
    ParallelSpec,
    block_bytes,
    hardware_spec,
    model_spec,
    num_cpu_blocks,
    num_gpu_blocks,
    parallel_spec,
)
from servebench.sim.step_time import RooflineStepTime, VidurProfileStepTime
from servebench.sim.step_time_models import make_step_time_model

CONF = Path(__file__).resolve().parents[1] / "conf"


def conf(group: str, name: str):
    return OmegaConf.load(CONF / group / f"{name}.yaml")  # a DictConfig, as Hydra passes it


def model(name: str):
    return model_spec(conf("model", name))


def hw(name: str):
    return hardware_spec(conf("hardware", name))


def step(
    decode_contexts: list[int] = (), chunks: list[tuple[int, int]] = (), swaps: int = 0
) -> SchedulerOutput:
    return SchedulerOutput(
        num_prefill_tokens=sum(n for n, _ in chunks),
        num_decode_tokens=len(decode_contexts),
        decode_context_tokens=sum(decode_contexts),
        prefill_chunks=list(chunks),
        swap_in=[(i, i) for i in range(swaps)],
    )


@pytest.fixture(scope="module")
def llama7b_h100() -> dict[str, RooflineStepTime]:
    m, h = model("llama2_7b"), hw("h100_80g")
    return {kind: make_step_time_model(kind, m, h, ParallelSpec(), 16) for kind in ("roofline", "vidur")}


@pytest.fixture(scope="module")
def codellama_a100_tp2() -> VidurProfileStepTime:
    return VidurProfileStepTime(model("codellama_34b"), hw("a100_80g"), ParallelSpec(2), 16)


@pytest.mark.parametrize("group", ["model", "hardware", "parallel"])
def test_every_config_builds_a_spec(group: str) -> None:
    build = {"model": model_spec, "hardware": hardware_spec, "parallel": parallel_spec}[group]
    paths = sorted((CONF / group).glob("*.yaml"))
    assert paths
    for path in paths:
        spec = build(OmegaConf.load(path))
        if group != "parallel":
            assert spec.name == path.stem


@pytest.mark.parametrize(
    "name, billions",
    [
        ("llama2_7b", 6.74),
        ("llama2_70b", 68.98),
        ("codellama_34b", 33.74),
        ("llama3_1_8b", 8.03),
        ("qwen3_0_6b", 0.596),
        ("qwen3_8b", 8.19),
    ],
)
def test_parameter_counts_match_the_published_models(name: str, billions: float) -> None:
    assert model(name).num_params / 1e9 == pytest.approx(billions, rel=0.005)


def test_derived_shapes() -> None:
    llama = model("llama2_7b")
    assert llama.head_dim == 128  # derived from hidden / heads
    assert llama.kv_bytes_per_token == 2 * 32 * 32 * 128 * 2
    assert model("qwen3_0_6b").head_dim == 128  # explicit, not 1024 / 16


@pytest.mark.parametrize("kind", ["roofline", "vidur"])
def test_decode_time_grows_with_batch_and_context(llama7b_h100, kind: str) -> None:
    predict = llama7b_h100[kind].predict
    by_batch = [predict(step([1024] * b)) for b in (1, 16, 64, 256)]
    by_context = [predict(step([c] * 32)) for c in (128, 1024, 4096, 32768)]
    assert by_batch == sorted(by_batch) and by_batch[-1] > 2 * by_batch[0]
    assert by_context == sorted(by_context) and by_context[-1] > 2 * by_context[0]


def test_prefill_attention_grows_quadratically(llama7b_h100, codellama_a100_tp2) -> None:
    roofline = llama7b_h100["roofline"]
    for model_ in (roofline, codellama_a100_tp2):  # analytic, and fitted to a measured profile
        ratio = model_.attention_time(step(chunks=[(16384, 0)])) / model_.attention_time(
            step(chunks=[(8192, 0)])
        )
        assert 3.5 < ratio < 4.1
    # a chunk's cost also grows with the context it attends to
    assert roofline.attention_time(step(chunks=[(512, 8192)])) > 4 * roofline.attention_time(
        step(chunks=[(512, 0)])
    )


def test_whole_prefill_step_is_superlinear_at_long_context(llama7b_h100) -> None:
    predict = llama7b_h100["roofline"].predict
    assert predict(step(chunks=[(8192, 24576)])) > 1.5 * predict(step(chunks=[(8192, 0)]))


@pytest.mark.parametrize("kind", ["roofline", "vidur"])
def test_tensor_parallel_speeds_up_big_batches(kind: str) -> None:
    m, h = model("llama2_7b"), hw("h100_80g")
    tp1, tp2 = (make_step_time_model(kind, m, h, ParallelSpec(tp), 16) for tp in (1, 2))
    for out in (step([2048] * 128), step(chunks=[(4096, 0)]), step([1024] * 64, [(2048, 0)])):
        assert tp2.predict(out) < 0.8 * tp1.predict(out)


def test_pipeline_parallel_adds_sends_not_speed() -> None:
    m, h = model("llama2_7b"), hw("h100_80g")
    pp1, pp2 = (RooflineStepTime(m, h, ParallelSpec(1, pp), 16) for pp in (1, 2))
    out = step([1024] * 64)
    assert pp1.predict(out) < pp2.predict(out) < 1.05 * pp1.predict(out)


def test_vidur_and_roofline_agree_in_order_of_magnitude(llama7b_h100) -> None:
    roofline, vidur = llama7b_h100["roofline"], llama7b_h100["vidur"]
    assert vidur.sources["linear"] == "compute/h100/meta-llama/Llama-2-7b-hf/mlp.csv"
    for out in (
        step([512]),
        step([1024] * 32),
        step([2048] * 128),
        step(chunks=[(2048, 0)]),
        step([1024] * 64, [(512, 1024)]),
        step(chunks=[(8192, 0)]),
    ):
        assert 0.5 < vidur.predict(out) / roofline.predict(out) < 2


def test_vidur_uses_attention_and_cpu_profiles_where_they_exist(codellama_a100_tp2) -> None:
    sources = codellama_a100_tp2.sources
    assert sources["attention"].endswith("CodeLlama-34b-Instruct-hf-tp2-2024-05/attention.csv")
    assert sources["cpu"].endswith("cpu_overheads.csv")
    assert sources["all_reduce"] == "network/a100_pairwise_nvlink/all_reduce.csv"
    # Vidur's decode attention profile: batch 64 at 1984 cached tokens took 0.208 ms per layer
    assert codellama_a100_tp2.attention_time(step([1984] * 64)) == pytest.approx(0.208e-3, rel=0.05)


def test_swap_and_overhead_only_steps() -> None:
    m, h = model("llama2_7b"), hw("h100_80g")
    roofline = RooflineStepTime(m, h, ParallelSpec(), 16)
    assert roofline.predict(step()) == pytest.approx(h.cpu_overhead_s)
    copy = 10 * block_bytes(m, ParallelSpec(), 16) / (h.pcie_gbs * 1e9)
    assert roofline.predict(step(swaps=10)) == pytest.approx(h.cpu_overhead_s + copy)


def test_kv_capacity() -> None:
    m, h = model("llama2_7b"), hw("h100_80g")
    one = num_gpu_blocks(m, h, ParallelSpec(1), 0.9, 16)
    two = num_gpu_blocks(m, h, ParallelSpec(2), 0.9, 16)
    assert 6000 < one < 8000  # ~58 GiB of KV at 8 MiB per 16-token block
    assert two > 2 * one  # half the KV heads and half the weights per GPU
    assert num_gpu_blocks(m, h, ParallelSpec(1), 0.9, 16, activation_reserve_bytes=0) > one
    assert num_cpu_blocks(4, m, ParallelSpec(1), 16) == 4 * GiB // (16 * m.kv_bytes_per_token)


def test_weights_that_do_not_fit_are_reported() -> None:
    with pytest.raises(ValueError, match="llama2_70b does not fit on h100_80g.*tensor_parallel_size"):
        num_gpu_blocks(model("llama2_70b"), hw("h100_80g"), ParallelSpec(1), 0.9, 16)


def test_bad_spec_keys_are_named() -> None:
    cfg = OmegaConf.to_container(conf("model", "llama2_7b"))
    with pytest.raises(ValueError, match="^model.hidden_size is missing$"):
        model_spec({k: v for k, v in cfg.items() if k != "hidden_size"})
    with pytest.raises(ValueError, match="^model.hidden_sise is not a known key"):
        model_spec({**cfg, "hidden_sise": 1})
    with pytest.raises(ValueError, match="hardware.matmul_efficiency must be in"):
        hardware_spec({**OmegaConf.to_container(conf("hardware", "h100_80g")), "matmul_efficiency": 1.5})
    with pytest.raises(ValueError, match="parallel.tensor_parallel_size=3 does not divide"):
        RooflineStepTime(model_spec(cfg), hw("h100_80g"), parallel_spec({"tensor_parallel_size": 3}), 16)


def test_missing_profiles_are_explained(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="qwen3_0_6b has no vidur_name.*available: a100/"):
        make_step_time_model("vidur", model("qwen3_0_6b"), hw("h100_80g"), ParallelSpec(), 16)
    with pytest.raises(ValueError, match="hardware h200 has no vidur_device"):
        make_step_time_model("vidur", model("llama2_7b"), hw("h200"), ParallelSpec(), 16)
    with pytest.raises(FileNotFoundError, match="no Vidur profile for model llama2_7b on h100 at tp=1"):
        make_step_time_model(
            "vidur", model("llama2_7b"), hw("h100_80g"), ParallelSpec(), 16, profile_root=tmp_path
        )
    with pytest.raises(ValueError, match="unknown step-time model 'exact'"):
        make_step_time_model("exact", model("llama2_7b"), hw("h100_80g"), ParallelSpec(), 16)
