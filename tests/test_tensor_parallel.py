"""Tensor parallelism on the CPU (gloo): 2 and 4 ranks give TP 1's greedy tokens under prefix caching, chunked
prefill and both preemption modes; sizes and features it cannot serve are one clear error before any process
starts; no rank outlives its engine, however the engine's process ends."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from quantized_checkpoint import quantize_checkpoint
from servebench.engine.core.scheduler_output import SchedulerOutput
from servebench.engine.profile import GRIDS, profile
from servebench.sim.specs import hardware_spec, model_spec, parallel_spec
from servebench.sim.step_time_models import make_step_time_model
from test_engine_correctness import PROMPTS
from test_lora import assert_matches_merged, lora_llm, run_mixed
from test_quantization import CASES as QUANTIZED
from test_quantization import baseline_run, check_near
from tiny_model import build_tiny_model

from servebench import LLM, SamplingParams

REPO = Path(__file__).resolve().parents[1]
GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
# A cache of 16 blocks of 16 tokens for 12 prompts of up to ~60 tokens and 32 more each: preemption at once.
PRESSURE = {"max_model_len": 256, "num_gpu_blocks_override": 16}
CASES = {  # model, tensor_parallel_size, knobs
    "llama_tp2_prefix_chunked": ("llama", 2, {"enable_prefix_caching": True, "max_num_batched_tokens": 32}),
    "llama_tp2_recompute": ("llama", 2, PRESSURE | {"preemption_mode": "recompute"}),
    "qwen3_tp4_swap_chunked": ("qwen3", 4, PRESSURE | {"preemption_mode": "swap", "swap_space": 0.01,
                                                       "max_num_batched_tokens": 32}),
    # async scheduling: rank 0 broadcasts each step's tokens, the next step's inputs on every rank
    "llama_tp2_async_prefix_chunked": ("llama", 2, {"async_scheduling": True, "enable_prefix_caching": True,
                                                    "max_num_batched_tokens": 32}),
    "qwen3_tp2_async_recompute": ("qwen3", 2, PRESSURE | {"async_scheduling": True,
                                                          "preemption_mode": "recompute"}),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    # Four KV heads, so that four ranks hold one each; Qwen3: tied embeddings and q/k norms.
    return {arch: build_tiny_model(tmp_path_factory.mktemp(arch), arch, num_key_value_heads=4)
            for arch in ("llama", "qwen3")}


def greedy(model: Path, **knobs) -> tuple[list[list[int]], int]:
    llm = LLM(model=str(model), dtype="float32", device="cpu", **knobs)
    try:
        outs = llm.generate(PROMPTS * 2, GREEDY, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs], llm.engine.stats().num_preemptions
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("case", CASES)
def test_greedy_tokens_equal_one_rank(models, case):
    arch, size, knobs = CASES[case]
    want, preemptions = greedy(models[arch], **knobs)
    got, tp_preemptions = greedy(models[arch], tensor_parallel_size=size, **knobs)
    assert got == want
    assert tp_preemptions == preemptions
    if "num_gpu_blocks_override" in knobs:
        assert preemptions > 0


def test_what_tensor_parallelism_cannot_serve_is_one_clear_error(tiny_llama_dir, models):
    with pytest.raises(ValueError, match="tensor_parallel_size=4 does not divide the model's "
                                         "num_key_value_heads=2"):
        LLM(model=str(tiny_llama_dir), device="cpu", tensor_parallel_size=4)
    with pytest.raises(ValueError, match="tensor_parallel_size=0 must be >= 1"):
        LLM(model=str(models["llama"]), device="cpu", tensor_parallel_size=0)
    first = LLM(model=str(models["llama"]), device="cpu", tensor_parallel_size=2)
    with pytest.raises(ValueError, match="already runs a tensor-parallel engine"):  # one default group
        LLM(model=str(models["llama"]), device="cpu", tensor_parallel_size=2)
    del first  # dropped without shutdown: the next engine collects it (and ends its ranks) first
    LLM(model=str(models["llama"]), device="cpu", tensor_parallel_size=2).engine.shutdown()


DRIVER = """
import sys, time
from servebench import LLM, SamplingParams
if __name__ == "__main__":
    llm = LLM(model=sys.argv[1], dtype="float32", device="cpu", tensor_parallel_size=2)
    llm.generate(["hello"], SamplingParams(max_tokens=2), use_tqdm=False)
    print(*llm.engine.workers.pids, flush=True)
    if sys.argv[2] == "crash":
        raise RuntimeError("the driver fails")
    time.sleep(600)
"""


def alive(pid: int) -> bool:
    """Running, and not a zombie (a container's init may never reap an orphan)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.parametrize("end", ["SIGKILL", "SIGINT", "crash"])
def test_no_rank_outlives_its_engine(models, tmp_path, end):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = os.environ | {"PYTHONPATH": str(REPO)}
    driver = subprocess.Popen([sys.executable, str(script), str(models["llama"]), end], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        pids = [int(p) for p in driver.stdout.readline().split()]
        assert len(pids) == 1 and alive(pids[0])
        if end != "crash":
            driver.send_signal(getattr(signal, end))
        driver.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(p) for p in pids)
    finally:
        driver.kill()


def test_the_workbench_runs_the_engine_tensor_parallel(tmp_path):
    cmd = [sys.executable, "-m", "workbench", f"hydra.run.dir={tmp_path}", "progress=false", "report=false",
           "backend=engine", "backend.device=cpu", "model=tiny_llama", "parallel=tp2", "workload=synthetic",
           "workload.num_requests=6", "workload.input_len=48", "workload.output_len=8"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["parallel"]["tensor_parallel_size"] == 2
    assert summary["num_finished"] == 6
    refused = (("engine", "parallel.pipeline_parallel_size=2", "pipeline_parallel_size=2 is simulated only"),
               ("server", "parallel=tp2", "parallel.tensor_parallel_size=2: a server runs as it was started"))
    for backend, override, message in refused:
        res = subprocess.run([*cmd[:5], f"backend={backend}", override], cwd=REPO, capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 2 and message in res.stderr, res.stderr


def test_the_simulator_prices_tensor_parallel_steps_from_the_engines_own_profile(tmp_path):
    """The profiler times whole steps of 2 ranks into <model>_tp2, where the simulator's profile model looks
    for parallel.tensor_parallel_size=2 (and refuses a profile of another size)."""
    profile("tiny_llama", tmp_path / "h200", GRIDS["tiny"], device="cpu", dtype="float32", swap_space=0.01,
            tensor_parallel_size=2)
    meta = json.loads((tmp_path / "h200" / "tiny_llama_tp2" / "meta.json").read_text())
    assert meta["engine"]["tensor_parallel_size"] == 2
    conf = {group: yaml.safe_load((REPO / "conf" / group / f"{name}.yaml").read_text())
            for group, name in (("model", "tiny_llama"), ("hardware", "h200"))}
    model, hw = model_spec(conf["model"]), hardware_spec(conf["hardware"])
    st = make_step_time_model("profile", model, hw, parallel_spec({"tensor_parallel_size": 2}), 16,
                              engine_profile_root=tmp_path)
    assert st.predict(SchedulerOutput(num_decode_tokens=2, decode_context_tokens=128)) > 0
    assert st.num_outside == 0
    with pytest.raises(ValueError, match="no profile for model tiny_llama"):  # tp 1 has its own folder
        make_step_time_model("profile", model, hw, parallel_spec({}), 16, engine_profile_root=tmp_path)
    shutil.copytree(tmp_path / "h200" / "tiny_llama_tp2", tmp_path / "h200" / "tiny_llama_tp4")
    with pytest.raises(ValueError, match="profiled at tensor_parallel_size=2, not 4"):
        make_step_time_model("profile", model, hw, parallel_spec({"tensor_parallel_size": 4}), 16,
                             engine_profile_root=tmp_path)


def test_tensor_parallel_benchmark_runs_tiny_on_the_cpu(tmp_path):
    out = tmp_path / "tp.json"
    script = REPO / "benchmarks" / "tensor_parallel.py"
    res = subprocess.run([sys.executable, str(script), "--tiny", "--device", "cpu", "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    result = json.loads(out.read_text())
    assert [r["tp"] for r in result["runs"]] == [1, 2]
    assert all(r["output_tok_s"] > 0 for r in result["runs"])
    assert [r["tokens"] for r in result["all_reduce"]][-1] == 8192


def test_a_rank_that_dies_fails_the_step_and_stops_the_engine(models):
    llm = LLM(model=str(models["llama"]), device="cpu", tensor_parallel_size=2)
    llm.generate(["hello"], GREEDY, use_tqdm=False)
    os.kill(llm.engine.workers.pids[0], signal.SIGKILL)
    with pytest.raises(RuntimeError, match="a tensor-parallel step failed, the ranks are stopped"):
        llm.generate(["hello again"], GREEDY, use_tqdm=False)
    with pytest.raises(RuntimeError, match="build a new engine"):
        llm.generate(["and again"], GREEDY, use_tqdm=False)


@pytest.mark.parametrize("method", ["awq", "gptq", "fp8"])
def test_quantized_models_split_across_ranks(trained_llama_dir, tmp_path, method):
    """int4 checkpoints (groups of a row-parallel layer's inputs split across ranks, GPTQ's g_idx too) give
    TP 1's tokens; fp8's per-channel scales are taken per rank's shard, so 2 ranks meet the CPU tests'
    criteria against the unquantized model, as one rank does."""
    if method == "fp8":
        baseline = baseline_run(LLM(model=str(trained_llama_dir), dtype="float32", device="cpu"))
        tp = LLM(model=str(trained_llama_dir), dtype="float32", device="cpu", quantization="fp8",
                 tensor_parallel_size=2)
        try:
            check_near(baseline, tp, *QUANTIZED["fp8"][2:])
        finally:
            tp.engine.shutdown()
        return
    folder = quantize_checkpoint(trained_llama_dir, tmp_path / method, method)[0]
    assert greedy(folder, tensor_parallel_size=2)[0] == greedy(folder)[0]


@pytest.mark.parametrize("knobs", [{}, {"max_loras": 1, "max_cpu_loras": 2}], ids=["mixed", "evict"])
def test_lora_adapters_split_across_ranks(tiny_llama_dir, lora_adapters, knobs):
    """A batch mixing three adapters and the base model on 2 ranks (an adapter's B split by the
    column-parallel layers' outputs, its A by the row-parallel layers' inputs), also with one slot for the
    three (loads and evictions each step, on every rank): HF's tokens with each adapter merged."""
    llm = lora_llm(tiny_llama_dir, tensor_parallel_size=2, **knobs)
    try:
        assert_matches_merged(tiny_llama_dir, run_mixed(llm, lora_adapters))
    finally:
        llm.engine.shutdown()
