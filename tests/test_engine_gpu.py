"""The CUDA engine (Triton kernels, CUDA graphs) against HF transformers. Run on a GPU box:

    pytest -m gpu tests/test_engine_gpu.py -v -s
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from quantized_checkpoint import quantize_checkpoint
from servebench.engine.input_batch import host_batch
from servebench.engine.llm_engine import release_engines
from test_engine_correctness import PROMPTS, assert_matches_hf
from test_lora import assert_matches_merged, lora_llm, run_mixed
from test_quantization import CASES, SWAP, baseline_run, check_near
from tiny_model import ONE_B, build_tiny_model, hf_greedy, hf_model, random_prompts

from servebench import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

NUM_PROMPTS, NUM_TOKENS = 64, 32
DECODE_GRAPHS = {"cudagraph_mode": "FULL_DECODE_ONLY"}  # steps that prefill run eagerly


@pytest.fixture(autouse=True)
def release_gpu():
    """Each engine sizes its KV cache from the free memory: give back the previous test's first."""
    yield
    release_engines()


@pytest.fixture(scope="module")
def one_b_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("one_b"), dtype=torch.bfloat16, device="cuda", **ONE_B)


@pytest.fixture(scope="module")
def prompts(one_b_dir):
    return random_prompts(one_b_dir, NUM_PROMPTS)


@torch.inference_mode()
def engine_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    """Logits of every position of one prompt, computed in the idle engine's first KV blocks (which
    overwrites whatever prefix they cached: generate nothing with this engine afterwards)."""
    runner = llm.engine.runner
    blocks = list(range(-(-len(ids) // runner.block_size)))
    batch = host_batch([ids], [0], [blocks], [0], runner.block_size)
    batch.logits_index = np.arange(len(ids))
    return runner._run_eager(batch)


@torch.inference_mode()
def test_one_b_bf16_matches_hf(one_b_dir, prompts):
    # Half the GPU: the HF models (fp32 and bf16) are loaded beside the engine.
    llm = LLM(model=str(one_b_dir), dtype="bfloat16", max_model_len=1024, gpu_memory_utilization=0.5)
    params = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True)
    ours = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]

    # Logits: our bf16 error against fp32 HF is within twice HF's own bf16 error.
    hf16, hf32 = hf_model(one_b_dir, torch.bfloat16), hf_model(one_b_dir, torch.float32)
    for ids in prompts[:8]:
        x = torch.tensor([ids], device="cuda")
        ref = hf32(x).logits[0].float()
        hf_err = (hf16(x).logits[0].float() - ref).abs()
        our_err = (engine_logits(llm, ids) - ref).abs()
        assert our_err.mean() <= 2 * hf_err.mean() + 1e-3 and our_err.max() <= 2 * hf_err.max() + 1e-2

    # Greedy: the same 32 tokens as HF bf16, or a first divergence where HF's two candidates are within bf16
    # noise of each other (random weights give flat logits, so such near-ties are common). How often HF bf16
    # itself keeps HF fp32's 32 tokens, and HF bf16 with its other attention implementation (eager, not
    # sdpa) keeps HF bf16's, says what any bf16 implementation that is not bit-identical can reach.
    exact = near_tie = same_as_fp32 = hf16_as_fp32 = eager_as_hf16 = 0
    hf16_eager = hf_model(one_b_dir, torch.bfloat16, "eager")
    runs = [hf_greedy(m, prompts, NUM_TOKENS) for m in (hf16, hf32, hf16_eager)]
    for ids, mine, theirs, fp32, eager in zip(prompts, ours, *runs):
        same_as_fp32 += mine == fp32
        hf16_as_fp32 += theirs == fp32
        eager_as_hf16 += eager == theirs
        if mine == theirs:
            exact += 1
            continue
        k = next(i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b)
        logits = hf32(torch.tensor([ids + mine[:k]], device="cuda")).logits[0, -1].float()
        near_tie += bool(abs(logits[mine[k]] - logits[theirs[k]]) <= 0.1 * logits.std())
    n = NUM_PROMPTS
    print(f"greedy over {NUM_TOKENS} tokens: {exact}/{n} identical to HF bf16, {near_tie} diverge at a "
          f"near-tie; identical to HF fp32: ours {same_as_fp32}/{n}, HF bf16's {hf16_as_fp32}/{n}; "
          f"HF bf16 eager attention identical to HF bf16 sdpa: {eager_as_hf16}/{n}")
    assert exact + near_tie >= 0.95 * NUM_PROMPTS


@pytest.mark.parametrize("knobs", [
    {},
    {"enable_prefix_caching": True, "max_num_batched_tokens": 16},
    {"max_model_len": 256, "num_gpu_blocks_override": 16, "preemption_mode": "swap", "swap_space": 0.01},
    {"max_model_len": 256, "num_gpu_blocks_override": 16, "preemption_mode": "recompute",
     "enforce_eager": True},
    {"async_scheduling": True},
    {"async_scheduling": True, "enable_prefix_caching": True, "max_num_batched_tokens": 16},
    {"async_scheduling": True, "max_model_len": 256, "num_gpu_blocks_override": 16, "preemption_mode": "swap",
     "swap_space": 0.01},
    {"compilation_config": DECODE_GRAPHS, "enable_prefix_caching": True, "max_num_batched_tokens": 16},
    {"compilation_config": DECODE_GRAPHS, "async_scheduling": True, "max_model_len": 256,
     "num_gpu_blocks_override": 16, "preemption_mode": "swap", "swap_space": 0.01},
], ids=["graphs", "prefix+chunked", "swap", "recompute-eager", "graphs-async", "prefix+chunked-async",
        "swap-async", "decode-graphs-prefix+chunked", "decode-graphs-swap-async"])
def test_tiny_fp32_exact_on_gpu(tiny_llama_dir, knobs):
    """Every step kind (prefill chunks, prefix hits, decode and mixed graphs, swaps) on the Triton path, in
    fp32; the default cudagraph_mode FULL and FULL_DECODE_ONLY."""
    # A small share of the GPU: a tiny model would otherwise get millions of blocks.
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", gpu_memory_utilization=0.05, **knobs)
    params = SamplingParams(temperature=0.0, max_tokens=40)
    assert_matches_hf(tiny_llama_dir, PROMPTS, llm.generate(PROMPTS, params, use_tqdm=False), max_tokens=40)
    if "num_gpu_blocks_override" in knobs:
        assert llm.engine.stats().num_preemptions > 0
    if not knobs.get("enforce_eager"):  # the steps that prefill replayed mixed graphs, unless decode-only
        assert bool(llm.engine.runner.cuda_graphs.mixed_graphs) == ("compilation_config" not in knobs)


def test_async_launches_never_wait_for_the_device(tiny_llama_dir, monkeypatch):
    """With async scheduling the host launches a step while the one before runs: nothing in a launch may copy
    from pageable memory or read the device (each waits for every queued kernel). Eager steps (decode-only
    graphs), sampling with temperature, top-k/top-p and logprobs, a changing batch (pending tokens), swaps."""
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", gpu_memory_utilization=0.05, async_scheduling=True,
              compilation_config=DECODE_GRAPHS, max_model_len=256, num_gpu_blocks_override=16,
              preemption_mode="swap", swap_space=0.01)
    runner, launch = llm.engine.runner, llm.engine.runner.launch

    def checked(out):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return launch(out)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(runner, "launch", checked)
    params = [SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=i, max_tokens=40 - i, logprobs=2,
                             ignore_eos=True) for i in range(len(PROMPTS))]
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [40 - i for i in range(len(PROMPTS))]
    assert llm.engine.stats().num_preemptions > 0


TP_SWAP = {"max_model_len": 256, "preemption_mode": "swap", "num_gpu_blocks_override": 16, "swap_space": 0.01}


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("knobs", [{}, {"enforce_eager": True}, TP_SWAP, {"async_scheduling": True}],
                         ids=["graphs", "eager", "swap", "async"])
def test_tensor_parallel_exact_on_two_gpus(tiny_llama_dir, knobs):
    """Two ranks over NCCL (decode graphs capture the all-reduces and the logits' all-gather), fp32: HF's
    greedy tokens, as one GPU gives them."""
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", gpu_memory_utilization=0.05, tensor_parallel_size=2,
              **knobs)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=40)
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        assert_matches_hf(tiny_llama_dir, PROMPTS, outs, max_tokens=40)
        assert (llm.engine.runner.cuda_graphs is None) == bool(knobs.get("enforce_eager"))
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("case", [*CASES, "fp8+kv_fp8", "kv_fp8+swap"])
def test_quantized_on_gpu(case: str, trained_llama_dir, tmp_path):
    """The quantized paths on the GPU (W8A8 through torch._scaled_mm, the int4 Triton GEMM, the fp8 KV
    cache in the Triton KV write and attention and in swaps; CUDA graphs) against the bf16 engine, with the
    CPU tests' criteria (tests/test_quantization.py)."""
    first, _, second = case.partition("+")
    method, kwargs, max_kl, min_top1 = CASES[first]
    kwargs = kwargs | ({"kv_cache_dtype": "fp8"} if second == "kv_fp8" else SWAP if second == "swap" else {})
    common = dict(dtype="bfloat16", gpu_memory_utilization=0.05, enable_prefix_caching=False)
    baseline = baseline_run(LLM(model=str(trained_llama_dir), **common))
    release_engines()  # the next engine sizes its cache from what is free: the baseline's memory first
    folder = trained_llama_dir
    if method:
        folder = quantize_checkpoint(trained_llama_dir, tmp_path / method, method)[0]
    check_near(baseline, LLM(model=str(folder), **common, **kwargs), max_kl, min_top1)


def engine_memory(model_dir, **kwargs) -> dict[str, int]:
    """An engine's weight, KV-cache and profiled peak bytes and its block count; the engine is released
    before this returns (only numbers outlive it, also in a failing test's traceback)."""
    runner = LLM(model=str(model_dir), **kwargs).engine.runner
    memory = {"weights": runner.weight_bytes, "kv": runner.kv_cache_bytes,
              "blocks": runner.kv_cache.num_gpu_blocks, "peak": runner.kv_cache.peak_bytes}
    del runner
    release_engines()
    return memory


@pytest.mark.parametrize("kwargs", [{"quantization": "fp8"}, {"quantization": "awq"},
                                    {"kv_cache_dtype": "fp8"}], ids=["fp8", "awq", "kv_fp8"])
def test_quantization_frees_memory_for_kv_blocks(one_b_dir, kwargs):
    # ~1B parameters: the weights fp8 or int4 no longer hold become KV blocks, less what the quantized
    # forward's largest step needs beyond the plain one's (int4 GEMM scratch); an fp8 cache holds twice the
    # blocks in the same bytes.
    common = dict(dtype="bfloat16", load_format="dummy", max_model_len=1024, gpu_memory_utilization=0.5)
    plain = engine_memory(one_b_dir, **common)
    quantized = engine_memory(one_b_dir, **common, **kwargs)
    if "kv_cache_dtype" in kwargs:
        assert quantized["blocks"] == pytest.approx(2 * plain["blocks"], rel=0.01)
        return
    freed = plain["weights"] - quantized["weights"]
    assert freed > 0.4 * plain["weights"]
    more_activations = (quantized["peak"] - quantized["weights"]) - (plain["peak"] - plain["weights"])
    assert quantized["kv"] - plain["kv"] == pytest.approx(freed - more_activations, rel=0.02)


@pytest.mark.parametrize("knobs", [{}, {"enforce_eager": True}, {"max_loras": 1, "max_cpu_loras": 2},
                                   {"async_scheduling": True}], ids=["graphs", "eager", "evict", "async"])
def test_lora_mixed_batch_matches_hf_merged_on_gpu(tiny_llama_dir, lora_adapters, knobs):
    """The Triton LoRA kernels in a batch mixing three adapters and the base model (decode steps in CUDA
    graphs, whose static inputs carry each row's adapter slot), fp32, against HF with each adapter merged:
    the CPU test's criterion (tests/test_lora.py)."""
    llm = lora_llm(tiny_llama_dir, device="cuda", gpu_memory_utilization=0.05, **knobs)
    assert_matches_merged(tiny_llama_dir, run_mixed(llm, lora_adapters))
    assert (llm.engine.runner.cuda_graphs is None) == bool(knobs.get("enforce_eager"))
    steps = llm.engine.recorder.steps_table()
    assert all(s > 0 for s, n in zip(steps["lora_load_s"], steps["lora_loads"]) if n)
