"""The CPU engine (torch reference kernels, fp32) against HF transformers on tiny random models.

Engines are pinned to device="cpu" so that the suite checks the same path on a GPU box (where
tests/test_engine_gpu.py covers CUDA); only the vLLM-style example picks its device itself.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers
from servebench.engine.llm_engine import LLMEngine
from tiny_model import build_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from servebench import LLM, SamplingParams

PROMPTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.",
    "1",
    "Once upon a time there was a small model that answered every question with a story about the sea. "
    "Large language models generate text one token at a time, reading keys and values from a paged cache.",
    "What is the capital of France?",
    "def f(x): return x * 2 + 1",
]
SHARED = "Large language models generate text one token at a time, reading keys and values from a cache. "
PREFIX_PROMPTS = [SHARED + s for s in ("Hello, world!", "To be or not", "Numbers: 0 1 2 3", "Paris is.")]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24)

_hf_cache: dict[tuple, list[int]] = {}


def hf_greedy(model_dir, prompt: str, max_tokens: int) -> list[int]:
    """HF transformers' greedy continuation, cut after the first EOS as the engine stops there."""
    key = (str(model_dir), prompt, max_tokens)
    if key not in _hf_cache:
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        ids = tok(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, do_sample=False, max_new_tokens=max_tokens, pad_token_id=tok.eos_token_id)
        new = out[0, ids.shape[1]:].tolist()
        _hf_cache[key] = new[: new.index(tok.eos_token_id) + 1] if tok.eos_token_id in new else new
    return _hf_cache[key]


def assert_matches_hf(model_dir, prompts, outputs, max_tokens=GREEDY.max_tokens):
    assert [o.prompt for o in outputs] == prompts
    for prompt, out in zip(prompts, outputs):
        assert out.finished
        assert out.outputs[0].token_ids == hf_greedy(model_dir, prompt, max_tokens), prompt


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"), "qwen2")


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny_mistral"), "mistral")


@pytest.fixture(scope="module")
def llama3_rope_dir(tmp_path_factory):
    """Llama 3.1's rope scaling, with an original context short enough for the prompts to pass it."""
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    # transformers 4.x knows rope_theta + rope_scaling only; 5.x writes rope_parameters.
    if int(transformers.__version__.split(".")[0]) < 5:
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        kwargs = {"rope_theta": rope["rope_theta"], "rope_scaling": scaling}
    else:
        kwargs = {"rope_parameters": rope}
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama3"), "llama", **kwargs)


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(model=str(tiny_llama_dir), dtype="float32", device="cpu")


@pytest.mark.parametrize("model,async_scheduling", [
    ("tiny_llama_dir", False), ("tiny_qwen3_dir", False), ("qwen2_dir", False), ("mistral_dir", False),
    ("llama3_rope_dir", False), ("tiny_llama_dir", True)])
def test_greedy_matches_hf(model, async_scheduling, request):
    model_dir = request.getfixturevalue(model)
    llm = LLM(model=str(model_dir), dtype="float32", device="cpu", enable_prefix_caching=False,
              async_scheduling=async_scheduling)
    assert_matches_hf(model_dir, PROMPTS, llm.generate(PROMPTS, GREEDY, use_tqdm=False))


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_prefix_caching_matches_hf(tiny_llama_dir, async_scheduling):
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", device="cpu", enable_prefix_caching=True,
              async_scheduling=async_scheduling)
    first = llm.generate(PREFIX_PROMPTS[:1], GREEDY, use_tqdm=False)
    rest = llm.generate(PREFIX_PROMPTS[1:], GREEDY, use_tqdm=False)
    assert_matches_hf(tiny_llama_dir, PREFIX_PROMPTS, first + rest)
    assert all(o.num_cached_tokens >= 16 for o in rest)
    assert llm.engine.stats().prefix_cache_hits_tokens > 0


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_chunked_prefill_matches_hf(tiny_qwen3_dir, async_scheduling):
    llm = LLM(model=str(tiny_qwen3_dir), dtype="float32", device="cpu", enable_chunked_prefill=True,
              max_num_batched_tokens=16, async_scheduling=async_scheduling)
    assert_matches_hf(tiny_qwen3_dir, PROMPTS, llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    steps = llm.engine.recorder.steps_table()
    assert max(p + d for p, d in zip(steps["num_prefill_tokens"], steps["num_decode_tokens"])) <= 16


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preemption_matches_hf(tiny_llama_dir, mode, async_scheduling):
    # 16 blocks x 16 tokens hold 256 tokens, the requests need about 380 when all have run.
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", device="cpu", max_model_len=256,
              num_gpu_blocks_override=16, preemption_mode=mode, swap_space=0.01, enable_prefix_caching=False,
              async_scheduling=async_scheduling)
    params = SamplingParams(temperature=0.0, max_tokens=40)
    assert_matches_hf(tiny_llama_dir, PROMPTS, llm.generate(PROMPTS, params, use_tqdm=False), max_tokens=40)
    assert llm.engine.stats().num_preemptions > 0
    assert llm.engine.stats().num_free_blocks == 16


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_logprobs_match_hf(tiny_llama_dir, async_scheduling):
    """Prompt and sampled-token logprobs equal HF's log-softmax, with prompts cut in chunks, preempted
    (recompute) and sharing a prefix with an earlier request in the prefix cache."""
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", device="cpu", max_model_len=256,
              num_gpu_blocks_override=16, preemption_mode="recompute", enable_chunked_prefill=True,
              max_num_batched_tokens=16, enable_prefix_caching=True, async_scheduling=async_scheduling)
    llm.generate(PREFIX_PROMPTS[:1], GREEDY, use_tqdm=False)
    params = SamplingParams(temperature=0.0, max_tokens=40, logprobs=2, prompt_logprobs=1)
    outs = llm.generate(PROMPTS + PREFIX_PROMPTS[1:], params, use_tqdm=False)
    assert llm.engine.stats().num_preemptions > 0
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    for out in outs:
        completion = out.outputs[0]
        ids = out.prompt_token_ids + completion.token_ids
        with torch.no_grad():
            logprobs = hf(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
        want = logprobs.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        assert out.prompt_logprobs[0] is None
        positions = out.prompt_logprobs[1:] + completion.logprobs
        got = [p[t].logprob for p, t in zip(positions, ids[1:], strict=True)]
        torch.testing.assert_close(torch.tensor(got), want, atol=1e-4, rtol=0)
        assert all(p[t].rank == 1 for p, t in zip(completion.logprobs, completion.token_ids))  # greedy
        sampled = got[len(out.prompt_token_ids) - 1:]
        assert completion.cumulative_logprob == pytest.approx(sum(sampled), abs=1e-4)


def test_sampling_example_runs_and_is_recorded(tiny_llama_dir):
    llm = LLM(model=str(tiny_llama_dir), dtype="float32")
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.8, top_p=0.95, max_tokens=100))
    for out in outs:
        c = out.outputs[0]
        assert 1 <= len(c.token_ids) <= 100 and c.finish_reason in ("stop", "length")
        m = out.metrics
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finish_time
    steps, reqs = llm.engine.recorder.steps_table(), llm.engine.recorder.requests_table()
    assert len(steps["step"]) > 0 and all(d > 0 for d in steps["duration_s"])
    assert {o.request_id for o in outs} <= set(reqs["request_id"])


def test_seeded_sampling_is_reproducible(llm):
    seeded = SamplingParams(temperature=1.0, top_k=50, seed=1234, max_tokens=20, ignore_eos=True)
    alone = llm.generate(PROMPTS[0], seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=20)
    mixed = llm.generate(PROMPTS[:3], [others, others, seeded][::-1], use_tqdm=False)[0].outputs[0].token_ids
    other_seed = SamplingParams(temperature=1.0, top_k=50, seed=99, max_tokens=20, ignore_eos=True)
    assert alone == mixed
    assert llm.generate(PROMPTS[0], other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_stop_string_truncates_text(tiny_llama_dir, async_scheduling):
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", device="cpu", async_scheduling=async_scheduling)
    full = llm.generate(PROMPTS[1], GREEDY, use_tqdm=False)[0].outputs[0]
    stop = full.text[6:8]
    cut = llm.generate(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=24, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert cut.text == full.text[: full.text.find(stop)]
    assert (cut.finish_reason, cut.stop_reason) == ("stop", stop)
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)] and len(cut.token_ids) < len(full.token_ids)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_stop_token_ids_max_tokens_and_ignore_eos(tiny_llama_dir, async_scheduling):
    LEN12 = SamplingParams(temperature=0.0, max_tokens=12)
    engine = LLMEngine.from_kwargs(str(tiny_llama_dir), dtype="float32", device="cpu",
                                   async_scheduling=async_scheduling)
    llm = LLM.__new__(LLM)
    llm.engine, llm._ids = engine, iter(range(10**6))
    greedy = llm.generate(PROMPTS[0], LEN12, use_tqdm=False)[0].outputs[0]
    assert (len(greedy.token_ids), greedy.finish_reason) == (12, "length")
    tok = greedy.token_ids[4]
    stopped = llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[tok]),
                           use_tqdm=False)[0].outputs[0]
    assert stopped.token_ids == greedy.token_ids[: greedy.token_ids.index(tok) + 1]
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", tok)
    engine.eos_token_id = tok  # make the model "emit EOS" at a known step
    eos = llm.generate(PROMPTS[0], LEN12, use_tqdm=False)[0].outputs[0]
    assert eos.token_ids == stopped.token_ids and eos.finish_reason == "stop"
    ignored = llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0]
    assert ignored.token_ids == greedy.token_ids


def test_token_id_prompts_and_chat(llm):
    ids = llm.get_tokenizer().encode(PROMPTS[0])
    by_ids = llm.generate({"prompt_token_ids": ids}, GREEDY, use_tqdm=False)[0]
    by_text = llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)[0]
    assert by_ids.prompt_token_ids == ids and by_ids.outputs[0].token_ids == by_text.outputs[0].token_ids
    chat = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=4), use_tqdm=False)[0]
    assert chat.prompt.endswith("<|im_start|>assistant\n") and len(chat.outputs[0].token_ids) <= 4


def test_bad_arguments_are_clear_errors(tiny_llama_dir, tmp_path):
    with pytest.raises(TypeError, match="unknown engine argument.*not_a_knob"):
        LLM(model=str(tiny_llama_dir), not_a_knob=1)
    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not divide the model's num_attention"):
        LLM(model=str(tiny_llama_dir), tensor_parallel_size=3)
    with pytest.raises(ValueError, match="compilation_config.cudagraph_mode='PIECEWISE': choose NONE"):
        LLM(model=str(tiny_llama_dir), compilation_config={"cudagraph_mode": "PIECEWISE"})
    with pytest.raises(ValueError, match="compilation_config: level not supported; only cudagraph_mode"):
        LLM(model=str(tiny_llama_dir), compilation_config={"level": 3})
    with pytest.raises(FileNotFoundError, match="is not a local Hugging Face model directory"):
        LLM(model=str(tmp_path))
    with pytest.raises(ValueError, match="max_model_len=100000 exceeds"):
        LLM(model=str(tiny_llama_dir), max_model_len=100000)


def test_bad_requests_and_abort(llm):
    engine = llm.engine
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.add_request("a", None, [], SamplingParams())
    with pytest.raises(ValueError, match="more than max_model_len=512"):
        engine.add_request("b", None, [5] * 600, SamplingParams())
    with pytest.raises(ValueError, match="exceeds max_model_len=512"):
        engine.add_request("c", None, [5] * 500, SamplingParams(max_tokens=20))
    total = engine.stats().num_gpu_blocks
    engine.add_request("d", PROMPTS[3], None, SamplingParams(max_tokens=50))
    outs = engine.step()
    assert [o.request_id for o in outs] == ["d"] and not outs[0].finished
    assert engine.stats().num_free_blocks < total
    engine.abort_request("d")
    assert engine.stats().num_free_blocks == total and not engine.has_unfinished_requests()


def test_a_too_long_prompt_can_be_recorded_as_rejected(llm):
    """As the simulator's scheduler takes it (the workbench's replay): finished at once, never scheduled."""
    engine = llm.engine
    rejected = engine.stats().num_rejected
    engine.add_request("long", None, [5] * 600, SamplingParams(max_tokens=8), reject_if_too_long=True)
    assert engine.has_unfinished_requests()
    outs = engine.step()
    assert [(o.request_id, o.finished, o.outputs[0].finish_reason) for o in outs] == [
        ("long", True, "rejected")]
    assert not engine.has_unfinished_requests() and engine.stats().num_rejected == rejected + 1
    rows = engine.recorder.requests_table()
    last = {name: values[-1] for name, values in rows.items()}
    assert (last["request_id"], last["finish_reason"], last["output_tokens"]) == ("long", "rejected", 0)


def test_async_abort_mid_flight_leaves_the_others_exact(tiny_llama_dir, llm):
    """With async scheduling a request aborted while its step runs frees its blocks; the others' tokens are
    the same as without async scheduling."""
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:3], params, use_tqdm=False)]
    engine = LLMEngine.from_kwargs(str(tiny_llama_dir), dtype="float32", device="cpu", async_scheduling=True)
    for i, prompt in enumerate(PROMPTS[:3]):
        engine.add_request(str(i), prompt, None, params)
    for _ in range(5):
        engine.step()
    engine.abort_request("1")  # scheduled in the step in flight
    done = {}
    while engine.has_unfinished_requests():
        done |= {o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished}
    assert done == {"0": expected[0], "2": expected[2]}
    assert engine.stats().num_free_blocks == engine.stats().num_gpu_blocks


def test_streaming_steps_are_cumulative(llm):
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=10)
    engine.add_request("s", PROMPTS[1], None, params)
    seen = []
    while engine.has_unfinished_requests():
        seen += engine.step()
    assert all(o.request_id == "s" for o in seen) and [o.finished for o in seen][-1]
    for prev, cur in zip(seen, seen[1:]):
        assert cur.outputs[0].token_ids[:-1] == prev.outputs[0].token_ids
        assert cur.outputs[0].text.startswith(prev.outputs[0].text)
    offline = llm.generate(PROMPTS[1], params, use_tqdm=False)[0].outputs[0]
    assert (seen[-1].outputs[0].text, seen[-1].outputs[0].token_ids) == (offline.text, offline.token_ids)


@pytest.mark.parametrize("knob", [{"max_waiting": 1}, {"shed_ttft_ms": 1e-6}], ids=["queue-cap", "ttft-slo"])
def test_shed_requests_come_back_finished(tiny_llama_dir, knob):
    # The engine runs engine/core's admission control too: what it sheds is returned, with no token.
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", max_num_seqs=1)
    engine = llm.engine
    engine.scheduler_config = dataclasses.replace(engine.scheduler_config, **knob)
    engine.reset()
    outs = llm.generate(["one", "two", "three"], SamplingParams(max_tokens=2), use_tqdm=False)
    reasons = [o.outputs[0].finish_reason for o in outs]
    assert all(o.finished for o in outs) and "shed" in reasons
    assert all(o.outputs[0].token_ids == [] for o, r in zip(outs, reasons) if r == "shed")
    assert engine.scheduler.num_shed == reasons.count("shed") and not engine.has_unfinished_requests()
