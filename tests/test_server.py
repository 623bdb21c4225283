"""The OpenAI-compatible server, driven by the official `openai` client over real localhost HTTP."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import numpy as np
import openai
import pytest
import uvicorn
from servebench.engine import sampler as sampler_module
from servebench.engine.config import EngineArgs, ModelConfig
from servebench.engine.dummy import write_dummy_adapter
from servebench.engine.lora import LoRARequest
from servebench.engine.server.__main__ import lora_modules, parse_args
from servebench.engine.server.api import build_app
from servebench.engine.server.engine_process import EngineProcess
from servebench.workbench.metrics import REQUEST_COLUMNS, summarize
from servebench.workbench.serve_client import run_serving_benchmark
from servebench.workbench.workloads import load_workload

from servebench import LLM, LLMEngine, SamplingParams

MODEL = "tiny"
ENGINE_KW = {"max_model_len": 256, "num_gpu_blocks_override": 512, "max_num_seqs": 256, "device": "cpu"}
PROMPTS = ["Hello, world!", "The quick brown fox", "Once upon a time there was"]
CHAT = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "What is 42?"}]


class ServerThread:
    """uvicorn serving `app` on a free 127.0.0.1 port, in a thread of the test process."""

    def __init__(self, app) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, "the server did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(what)
        time.sleep(0.01)


def start(model_dir, api_key: str | None = None, **kw) -> tuple[ServerThread, LLMEngine]:
    engine = LLMEngine(EngineArgs(model=str(model_dir), **ENGINE_KW, **kw))
    return ServerThread(build_app(engine, MODEL, str(model_dir), api_key)), engine


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def served(tiny_llama_dir, request) -> Iterator[tuple[ServerThread, LLMEngine]]:
    """The server, with the engine's scheduling in step and async (`--async-scheduling`)."""
    server, engine = start(tiny_llama_dir, async_scheduling=request.param)
    yield server, engine
    server.stop()


@pytest.fixture(scope="module")
def url(served) -> str:
    return served[0].url


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def llm(tiny_llama_dir) -> LLM:
    return LLM(str(tiny_llama_dir), **ENGINE_KW)


def greedy(max_tokens: int = 12, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def assert_idle(url: str, engine: LLMEngine) -> None:
    """Nothing runs or waits, and every KV block is free again (prefix-cached blocks count as free)."""
    def all_free() -> bool:  # engine state read from this thread: only once nothing runs
        stats = engine.stats()
        return stats.num_free_blocks == stats.num_gpu_blocks

    wait_until(all_free, "KV blocks stayed allocated")
    wait_until(lambda: metric(url, "vllm:num_requests_running") == 0, "/metrics still shows running requests")
    assert metric(url, "vllm:num_requests_waiting") == 0
    assert metric(url, "vllm:kv_cache_usage_perc") == 0


def stream_text(chunks, chat: bool) -> tuple[str, int, str | None]:
    """(text, chunks with a choice, finish reason) of a streamed response; usage checked by the caller."""
    text, n, reason = "", 0, None
    for c in chunks:
        if c.choices:
            n += 1
            text += (c.choices[0].delta.content if chat else c.choices[0].text) or ""
            reason = c.choices[0].finish_reason or reason
    return text, n, reason


# ---- outputs equal the offline API under greedy sampling ---------------------------------------------------

@pytest.mark.parametrize("stop", [None, "stop-from-output"])
def test_completions_match_llm_generate(client, llm, stop) -> None:
    refs = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    if stop:  # a stop string from inside the greedy output: the text must end right before it
        stop = refs[0].outputs[0].text[3:5]
        refs = llm.generate(PROMPTS, greedy(stop=[stop]), use_tqdm=False)
    for prompt, ref in zip(PROMPTS, refs, strict=True):
        want = ref.outputs[0]
        kw = {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0, "stop": stop}
        resp = client.completions.create(**kw)
        assert resp.choices[0].text == want.text
        assert resp.choices[0].finish_reason == want.finish_reason
        assert resp.usage.completion_tokens == len(want.token_ids)
        assert resp.usage.prompt_tokens == len(ref.prompt_token_ids)
        chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        text, n, reason = stream_text(chunks, chat=False)
        assert (text, n, reason) == (want.text, len(want.token_ids), want.finish_reason)
        assert chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_token_id_prompt_matches_llm_generate(client, llm) -> None:
    ids = llm.get_tokenizer().encode(PROMPTS[2])
    want = llm.generate({"prompt_token_ids": ids}, greedy(), use_tqdm=False)[0].outputs[0]
    resp = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
    assert resp.choices[0].text == want.text
    assert resp.usage.completion_tokens == len(want.token_ids)


def test_chat_matches_llm_chat(client, llm) -> None:
    want = llm.chat(CHAT, greedy(), use_tqdm=False)[0]
    resp = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == want.outputs[0].text
    assert resp.usage.prompt_tokens == len(want.prompt_token_ids)
    assert resp.usage.completion_tokens == len(want.outputs[0].token_ids)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text, n, _ = stream_text(chunks, chat=True)
    assert (text, n) == (want.outputs[0].text, len(want.outputs[0].token_ids))
    assert chunks[-1].usage.completion_tokens == n


# ---- concurrency, disconnects, bad input: the server keeps serving and frees every block ------------------

def test_200_concurrent_streams_batch_and_free_everything(served) -> None:
    server, engine = served
    max_tokens = 6

    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[int, int]:
        stream = await client.completions.create(
            model=MODEL, prompt=f"{PROMPTS[i % 3]} {i}", max_tokens=max_tokens, temperature=0.8, seed=i,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        chunks = [c async for c in stream]
        return sum(1 for c in chunks if c.choices), chunks[-1].usage.completion_tokens

    async def main() -> list[tuple[int, int]]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                                      http_client=openai.DefaultAsyncHttpxClient(limits=limits)) as client:
            return await asyncio.gather(*(one(client, i) for i in range(200)))

    before = metric(server.url, "vllm:generation_tokens_total")
    first_step = len(engine.recorder.step_rows)
    assert asyncio.run(main()) == [(max_tokens, max_tokens)] * 200
    assert metric(server.url, "vllm:generation_tokens_total") - before == 200 * max_tokens
    assert_idle(server.url, engine)
    running = engine.recorder.steps_table()["num_running"][first_step:]
    assert max(running) > 50  # the scheduler batched requests of different connections


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_and_frees_blocks(served, stream, monkeypatch) -> None:
    server, engine = served
    step = engine.step

    def slow_step() -> list:  # 200 tokens take >= 1 s on any machine, far longer than the client stays
        time.sleep(0.005)
        return step()

    monkeypatch.setattr(engine, "step", slow_step)
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 200, "ignore_eos": True, "stream": stream}
    before = metric(server.url, "vllm:generation_tokens_total")
    with httpx.Client(base_url=server.url) as http:
        if stream:
            with http.stream("POST", "/v1/completions", json=body) as resp:
                lines = resp.iter_lines()  # dropping this iterator would close the connection already
                assert all(next(lines).startswith("data: ") and next(lines) == "" for _ in range(3))
                assert metric(server.url, "vllm:kv_cache_usage_perc") > 0
        else:
            with pytest.raises(httpx.ReadTimeout):
                http.post("/v1/completions", json=body, timeout=0.3)
    assert_idle(server.url, engine)
    assert metric(server.url, "vllm:generation_tokens_total") - before < 200  # stopped early


BAD_INPUTS = [  # (route, JSON body or raw bytes, the param the error names)
    ("completions", b'{"prompt": "Hello", ', None),
    ("completions", {"model": MODEL}, "prompt"),
    ("completions", {"prompt": 5}, "prompt"),
    ("completions", {"prompt": "Hello", "max_tokens": "many"}, "max_tokens"),
    ("completions", {"prompt": "Hello", "model": "gpt-4"}, "model"),
    ("completions", {"prompt": ""}, "prompt"),
    ("completions", {"prompt": []}, "prompt"),
    ("completions", {"prompt": [1, 2, 10**6]}, "prompt"),
    ("completions", {"prompt": "Hello", "max_tokens": 253}, "max_tokens"),
    ("completions", {"prompt": [5] * 300}, "prompt"),
    ("completions", {"prompt": "Hello", "temperature": -0.5}, "temperature"),
    ("completions", {"prompt": "Hello", "top_p": 0}, "top_p"),
    ("completions", {"prompt": "Hello", "top_p": 1.5}, "top_p"),
    ("completions", {"prompt": "Hello", "max_tokens": 0}, "max_tokens"),
    ("completions", {"prompt": "Hello", "n": 0}, "n"),
    ("completions", {"prompt": "Hello", "seed": 2**70}, "seed"),
    ("completions", {"prompt": "Hello", "seed": -(2**63) - 1}, "seed"),
    ("completions", {"prompt": "Hello", "top_k": 2**63, "top_p": 0.5}, "top_k"),
    ("completions", {"prompt": "Hello", "top_k": -2}, "top_k"),
    ("completions", {"prompt": "Hello", "max_tokens": "5"}, "max_tokens"),  # strict types: no coercion
    ("completions", {"prompt": "Hello", "temperature": "0.5"}, "temperature"),
    ("completions", {"prompt": "Hello", "stream": 1}, "stream"),
    ("completions", b'{"prompt": "Hello", "temperature": 1e999}', "temperature"),
    ("completions", {"prompt": "Hello", "stop": ""}, "stop"),
    ("completions", {"prompt": "Hello", "stop": ["a", ""]}, "stop"),
    ("completions", {"prompt": "Hello", "logprobs": 21}, "logprobs"),
    ("completions", {"prompt": "Hello", "n": 2, "best_of": 1}, "best_of"),
    ("completions", {"prompt": "Hello", "best_of": 2, "stream": True}, "best_of"),
    ("completions", {"prompt": "Hello", "suffix": "!"}, "suffix"),
    ("completions", {"prompt": "Hello", "frequency_penalty": 0.5}, "frequency_penalty"),
    ("completions", {"prompt": "Hello", "logit_bias": {"5": 1}}, "logit_bias"),
    ("completions", {"prompt": "Hello", "response_format": {"type": "json_object"}}, "response_format"),
    ("completions", {"prompt": "Hello", "some_new_field": 1}, "some_new_field"),
    ("completions", b'{"prompt": "ab\\ud800cd"}', None),  # a lone surrogate
    ("completions", b'{"prompt": "ab\xff"}', None),  # invalid UTF-8
    ("chat/completions", {"model": MODEL}, "messages"),
    ("chat/completions", {"messages": []}, "messages"),
    ("chat/completions", {"messages": [{"content": "hi"}]}, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi", "tool_calls": []}]}, "messages"),
    ("chat/completions", b'{"messages": [{"role": "user", "content": "ab\\udc00"}]}', None),
    ("chat/completions", {"messages": CHAT, "max_tokens": 250}, "max_tokens"),
    ("chat/completions", {"messages": [{"role": "user", "content": "Hello there " * 200}]}, "messages"),
    ("chat/completions", {"messages": CHAT, "response_format": {"type": "json_object"}}, "response_format"),
    ("chat/completions", {"messages": CHAT, "response_format": {"type": "json_schema", "json_schema": {}}},
     "response_format"),
    ("chat/completions", {"messages": CHAT, "tools": [{"type": "function"}]}, "tools"),
    ("chat/completions", {"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("chat/completions", {"messages": CHAT, "logprobs": 1}, "logprobs"),
    ("chat/completions", {"messages": CHAT, "echo": True}, "echo"),
]


def test_bad_inputs_get_openai_errors_and_the_server_goes_on(served, client) -> None:
    server, engine = served
    with httpx.Client(base_url=server.url + "/v1") as http:
        for route, body, param in BAD_INPUTS:
            raw = isinstance(body, bytes)
            kw = {"content": body, "headers": {"content-type": "application/json"}} if raw else {"json": body}
            resp = http.post(f"/{route}", **kw)
            assert resp.status_code == 400, (body, resp.text)
            error = resp.json()["error"]
            assert error["type"] == "BadRequestError" and error["code"] == 400
            assert error["param"] == param, (body, error)
            assert error["message"]
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL, prompt="Hello", temperature=-1)
    assert client.completions.create(model=MODEL, prompt="Hello", max_tokens=3).usage.completion_tokens == 3
    assert_idle(server.url, engine)


def test_api_key(tiny_llama_dir) -> None:
    server, _ = start(tiny_llama_dir, api_key="secret")
    try:
        body = {"prompt": "Hello", "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer secrets"}):
            resp = httpx.post(server.url + "/v1/completions", json=body, headers=headers)
            assert resp.status_code == 401 and resp.json()["error"]["type"] == "AuthenticationError"
            # The key is checked before the body is read: a malformed body without the key is a 401 too.
            resp = httpx.post(server.url + "/v1/completions", content=b'{"prompt": ', headers=headers)
            assert resp.status_code == 401
        assert httpx.get(server.url + "/health").status_code == 200
        good = openai.OpenAI(base_url=server.url + "/v1", api_key="secret", max_retries=0)
        assert good.completions.create(model=MODEL, prompt="Hello", max_tokens=2).usage.completion_tokens == 2
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()
    finally:
        server.stop()


def test_lora_adapters_are_models_and_match_the_offline_engine(tiny_llama_dir, tmp_path) -> None:
    cfg = ModelConfig.from_dir(tiny_llama_dir)
    specs = [f"{name}={write_dummy_adapter(tmp_path / name, cfg, rank, seed=rank)}"
             for name, rank in (("tenant-a", 8), ("tenant-b", 16))]
    loras = lora_modules(specs, MODEL)
    kw = {"enable_lora": True, "max_loras": 1, "max_cpu_loras": 2}
    engine = LLMEngine(EngineArgs(model=str(tiny_llama_dir), **ENGINE_KW, **kw))
    for lora in loras:
        engine.add_lora(lora)
    server = ServerThread(build_app(engine, MODEL, str(tiny_llama_dir), loras=loras))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        cards = client.models.list().data
        assert [(c.id, getattr(c, "parent", None)) for c in cards] == [
            (MODEL, None), ("tenant-a", MODEL), ("tenant-b", MODEL)]
        llm = LLM(str(tiny_llama_dir), **ENGINE_KW, **kw)
        for model, lora in ((MODEL, None), ("tenant-a", loras[0]), ("tenant-b", loras[1])):
            want = llm.generate(PROMPTS, greedy(), use_tqdm=False, lora_request=lora)
            for prompt, ref in zip(PROMPTS, want, strict=True):
                resp = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
                assert resp.model == model and resp.choices[0].text == ref.outputs[0].text, (model, prompt)
        assert len({r.outputs[0].text for r in want}) > 1
        with pytest.raises(openai.BadRequestError, match="'tenant-a', 'tenant-b'"):
            client.completions.create(model="tenant-c", prompt="Hello")
        assert_idle(server.url, engine)
    finally:
        server.stop()


def test_lora_modules_flag() -> None:
    args = parse_args(["--model", "m", "--enable-lora", "--max-loras", "2", "--lora-modules", "a=/x", "b=/y"])
    assert (args.enable_lora, args.max_loras, args.lora_modules) == (True, 2, ["a=/x", "b=/y"])
    assert lora_modules(args.lora_modules, "m") == [LoRARequest("a", 1, "/x"), LoRARequest("b", 2, "/y")]
    for specs, message in ((["a"], "expected NAME=PATH"), (["m=/x"], "'m' is already served"),
                           (["a=/x", "a=/y"], "'a' is already served")):
        with pytest.raises(ValueError, match=message):
            lora_modules(specs, "m")


def assert_internal_error(error: dict) -> None:
    """A 500's body names an error id to look up in the server log, never the internal exception."""
    assert error["code"] == 500 and error["type"] == "InternalServerError"
    assert "error id" in error["message"] and "secret" not in error["message"]


def sse_events(lines: list[str]) -> list[dict | str]:
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines if line]


def test_engine_failure_fails_requests_and_health(tiny_llama_dir) -> None:
    server, engine = start(tiny_llama_dir)
    step = engine.step

    def slow_step() -> list:
        time.sleep(0.005)
        return step()

    def broken_step() -> list:
        raise RuntimeError("secret: device lost")

    engine.step = slow_step
    body = {"prompt": "Hello", "max_tokens": 200, "ignore_eos": True, "stream": True}
    try:
        with httpx.stream("POST", server.url + "/v1/completions", json=body) as resp:
            lines = resp.iter_lines()
            assert next(lines).startswith("data: {")
            engine.step = broken_step
            events = sse_events(list(lines))
        # The stream cut mid-way ends with an error event, then [DONE].
        assert events[-1] == "[DONE]" and "error" in events[-2]
        assert_internal_error(events[-2]["error"])
        resp = httpx.post(server.url + "/v1/completions", json={"prompt": "Hello"})
        assert resp.status_code == 500
        assert_internal_error(resp.json()["error"])
        assert httpx.get(server.url + "/health").status_code == 503
    finally:
        server.stop()


# ---- the engine in a process of its own (what servebench-serve runs) ---------------------------------------

def test_engine_process_serves_what_the_offline_engine_generates(tiny_llama_dir, llm) -> None:
    engine = EngineProcess(EngineArgs(model=str(tiny_llama_dir), **ENGINE_KW, async_scheduling=True))
    server = ServerThread(build_app(engine, MODEL, str(tiny_llama_dir)))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    try:
        refs = llm.generate(PROMPTS, greedy(logprobs=2), use_tqdm=False)
        stop = refs[0].outputs[0].text[3:5]  # the text is cut before it: a report that shortens the text
        cut = llm.generate(PROMPTS[0], greedy(stop=[stop]), use_tqdm=False)[0].outputs[0]
        for prompt, ref in zip(PROMPTS, refs, strict=True):
            want = ref.outputs[0]
            kw = {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0, "logprobs": 2}
            resp = client.completions.create(**kw)
            assert resp.choices[0].text == want.text
            assert resp.choices[0].logprobs.token_logprobs == pytest.approx(
                [p[t].logprob for t, p in zip(want.token_ids, want.logprobs, strict=True)], abs=1e-5)
            text, n, reason = stream_text(client.completions.create(**kw, stream=True), chat=False)
            assert (text, n, reason) == (want.text, len(want.token_ids), want.finish_reason)
        resp = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                         stop=[stop], stream=True)
        assert stream_text(resp, chat=False)[0] == cut.text

        # Streams that stop reading after their first chunk are aborted, and the engine frees everything.
        body = {"prompt": "Hello", "max_tokens": 100, "ignore_eos": True, "stream": True}
        for _ in range(8):
            with httpx.stream("POST", server.url + "/v1/completions", json=body) as resp:
                assert next(resp.iter_lines()).startswith("data: {")
        wait_until(lambda: metric(server.url, "vllm:num_requests_running") == 0, "requests kept running")
        wait_until(lambda: metric(server.url, "vllm:kv_cache_usage_perc") == 0, "KV blocks stayed allocated")

        # An engine process that dies fails what comes next, and /health says so.
        engine.process.kill()
        wait_until(lambda: httpx.get(server.url + "/health").status_code == 503, "/health stayed 200")
        resp = httpx.post(server.url + "/v1/completions", json={"prompt": "Hello"})
        assert resp.status_code == 500
        assert_internal_error(resp.json()["error"])
    finally:
        server.stop()


def test_engine_process_that_cannot_start_says_why(tmp_path) -> None:
    with pytest.raises(ValueError, match="missing is not a local Hugging Face model directory"):
        EngineProcess(EngineArgs(model=str(tmp_path / "missing"), device="cpu"))


def test_models_health_version_metrics(url, client) -> None:
    (card,) = client.models.list().data
    assert card.id == MODEL and card.max_model_len == 256
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/version").json()["version"]
    text = httpx.get(url + "/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:num_preemptions_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                 "vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count",
                 "vllm:e2e_request_latency_seconds_count", "vllm:request_queue_time_seconds_count"):
        assert f'{name}{{model_name="{MODEL}"' in text, name


def test_failing_inputs_are_refused_or_fail_alone_and_the_engine_serves_on(served, monkeypatch) -> None:
    """The inputs that used to kill the engine loop get 400s; a step that still fails because of one request
    (forced here) fails that request alone; greedy output is the same before and after."""
    server, _ = served
    greedy_body = {"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 12, "temperature": 0}
    url = server.url + "/v1/completions"
    before = httpx.post(url, json=greedy_body).json()["choices"][0]["text"]
    poison = [({"prompt": "Hello", "top_k": 2**63, "top_p": 0.5}, "top_k"),
              ({"prompt": "Hello", "top_k": 10**6, "temperature": 0.7}, "top_k")]
    for body, param in poison:
        resp = httpx.post(url, json=body)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param
    for raw in (b'{"prompt": "ab\\ud800cd"}', b'{"prompt": "ab\xffcd"}'):
        with httpx.Client() as http:  # the same keep-alive connection serves on after the 400
            assert http.post(url, content=raw).status_code == 400
            assert http.post(url, json=greedy_body).json()["choices"][0]["text"] == before

    real = sampler_module._top_k_top_p

    def failing(logits, top_k, top_p):  # a sampling failure that only requests with top_k=13 cause
        if (top_k == 13).any():
            raise RuntimeError("secret: sampler crashed")
        return real(logits, top_k, top_p)

    monkeypatch.setattr(sampler_module, "_top_k_top_p", failing)
    neighbour = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 200, "ignore_eos": True, "top_p": 0.9,
                 "seed": 1, "stream": True}
    with httpx.stream("POST", url, json=neighbour) as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith("data: {")  # the neighbour runs: the failing request joins its batch
        resp = httpx.post(url, json={"prompt": "Hello", "top_k": 13, "top_p": 0.5, "max_tokens": 5})
        assert resp.status_code == 500
        assert_internal_error(resp.json()["error"])
        resp = httpx.post(url, json={"prompt": "Hello", "top_k": 13, "stream": True})
        assert resp.status_code == 500  # failed before its stream began
        assert_internal_error(resp.json()["error"])
        real_of = sampler_module.Logprobs.of

        def failing_of(logits, chosen, k):  # as if 7 logprobs of a long prompt ran out of memory
            if k == 7:
                raise RuntimeError("secret: out of memory")
            return real_of(logits, chosen, k)

        monkeypatch.setattr(sampler_module.Logprobs, "of", staticmethod(failing_of))
        for echo in (False, True):  # the sampled tokens' logprobs fail; with echo, the prompt's too
            resp = httpx.post(url, json={"prompt": "Hello", "logprobs": 7, "echo": echo, "temperature": 0})
            assert resp.status_code == 500
            assert_internal_error(resp.json()["error"])
        events = sse_events(list(lines))
    assert events[-1] == "[DONE]" and all("error" not in e for e in events[:-1])
    assert sum(1 for e in events[:-1] if e["choices"]) == 199  # the neighbour's other 199 tokens
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.post(url, json=greedy_body).json()["choices"][0]["text"] == before


def test_errors_are_openai_error_objects(url) -> None:
    for method, path, status in [("GET", "/v1/nope", 404), ("GET", "/v1/completions", 405),
                                 ("DELETE", "/v1/models", 405)]:
        resp = httpx.request(method, url + path)
        assert resp.status_code == status
        error = resp.json()["error"]
        assert error["code"] == status and error["message"] and error["type"].endswith("Error")


def test_body_size_limit(url) -> None:
    """Bodies over the limit (default 1 MiB for this max_model_len) are refused before they are parsed."""
    for content in (b'{"prompt": "' + b"a" * (2 << 20) + b'"}',
                    iter([b'{"prompt": "', b"a" * (2 << 20), b'"}'])):  # chunked: no content-length
        resp = httpx.post(url + "/v1/completions", content=content)
        assert resp.status_code == 413 and resp.json()["error"]["type"] == "RequestTooLargeError"
    assert httpx.get(url + "/health").status_code == 200


# ---- logprobs, echo, n and best_of -------------------------------------------------------------------------

def test_completion_logprobs_match_llm_generate(client, llm) -> None:
    want = llm.generate(PROMPTS[1], greedy(logprobs=3), use_tqdm=False)[0].outputs[0]
    resp = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=12, temperature=0, logprobs=3)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(want.token_ids)
    tok = llm.get_tokenizer()
    assert lp.tokens == [tok.decode([t]) for t in want.token_ids]
    chosen = [want.logprobs[i][t].logprob for i, t in enumerate(want.token_ids)]
    assert lp.token_logprobs == pytest.approx(chosen, abs=1e-4)
    for token, top in zip(lp.tokens, lp.top_logprobs):
        assert max(top, key=top.get) == token  # greedy: the chosen token is the likeliest
    assert sum(lp.token_logprobs) == pytest.approx(want.cumulative_logprob, abs=1e-3)


def test_echo_with_prompt_logprobs_scores_a_continuation(client, llm) -> None:
    """What evaluation harnesses call: echo + logprobs + max_tokens=1 over context + continuation token ids.
    The continuation's prompt logprobs equal those the model gave its tokens when it generated them."""
    ids = llm.get_tokenizer().encode(PROMPTS[2])
    gen = llm.generate({"prompt_token_ids": ids}, greedy(max_tokens=6, logprobs=1), use_tqdm=False)[0]
    cont = gen.outputs[0].token_ids[:5]
    resp = client.completions.create(model=MODEL, prompt=[ids + cont], max_tokens=1, temperature=0,
                                     logprobs=1, echo=True)
    choice = resp.choices[0]
    lp = choice.logprobs
    assert choice.text.startswith(llm.get_tokenizer().decode(ids + cont))
    assert len(lp.token_logprobs) == len(ids) + len(cont) + 1 and lp.token_logprobs[0] is None
    want = [gen.outputs[0].logprobs[i][t].logprob for i, t in enumerate(cont)]
    assert lp.token_logprobs[len(ids):len(ids) + len(cont)] == pytest.approx(want, abs=1e-4)
    for token, top in zip(lp.tokens[len(ids):-1], lp.top_logprobs[len(ids):-1]):
        assert max(top, key=top.get) == token  # the continuation is greedy
    assert resp.usage.prompt_tokens == len(ids) + len(cont)


def test_chat_logprobs(client) -> None:
    resp = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    for entry in content:
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs),
                                                                 reverse=True)
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token  # greedy
        assert entry.bytes == list(entry.token.encode())
    stream = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0,
                                            logprobs=True, stream=True)
    streamed = [e.token for c in stream if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert streamed == [e.token for e in content]


def test_n_choices_batched_prompts_and_best_of(client) -> None:
    kw = {"model": MODEL, "max_tokens": 8, "temperature": 1.0, "seed": 7, "extra_body": {"ignore_eos": True}}
    resp = client.completions.create(prompt=PROMPTS[:2], n=3, **kw)
    assert [c.index for c in resp.choices] == list(range(6))
    assert len({c.text for c in resp.choices[:3]}) > 1  # the choices of a prompt differ
    assert resp.usage.completion_tokens == 6 * 8
    single = client.completions.create(prompt=PROMPTS[1], n=3, **kw)
    assert [c.text for c in single.choices] == [c.text for c in resp.choices[3:]]
    stream = client.completions.create(prompt=PROMPTS[1], n=3, stream=True, **kw)
    texts = ["", "", ""]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [c.text for c in single.choices]
    # best_of: of the same 3 candidates, the one the model finds likeliest.
    scored = client.completions.create(prompt=PROMPTS[1], n=3, logprobs=0, **kw)
    best = max(scored.choices, key=lambda c: sum(c.logprobs.token_logprobs))
    picked = client.completions.create(prompt=PROMPTS[1], n=1, best_of=3, **kw)
    assert [c.text for c in picked.choices] == [best.text] and picked.choices[0].logprobs is None
    chat = client.chat.completions.create(messages=CHAT, n=2, **kw)
    assert [c.index for c in chat.choices] == [0, 1] and chat.usage.completion_tokens == 16


# ---- the benchmark client ----------------------------------------------------------------------------------

@pytest.mark.parametrize("api", ["completions", "chat"])
def test_serving_benchmark_client(served, llm, api) -> None:
    server, engine = served
    workload = load_workload({"name": "synthetic", "num_requests": 12, "request_rate": 100.0, "input_len": 16,
                              "output_len": {"dist": "uniform", "min": 3, "max": 8}})
    requests, itl = run_serving_benchmark(server.url, workload, llm.get_tokenizer(), MODEL, api=api,
                                          max_concurrency=4)
    assert list(requests.columns) == list(REQUEST_COLUMNS)
    assert (requests["finish_reason"] == "length").all()
    assert requests["output_tokens"].tolist() == workload["output_tokens"].tolist()
    if api == "completions":
        assert requests["prompt_tokens"].tolist() == workload["prompt_tokens"].tolist()
    assert (requests["first_token_s"] >= requests["arrival_s"]).all()
    assert (requests["finish_s"] >= requests["first_token_s"]).all()
    assert len(itl) == (workload["output_tokens"] - 1).sum() and (itl >= 0).all()
    summary = summarize(requests, None, itl)
    assert summary["num_finished"] == 12 and np.isfinite(summary["mean_ttft_ms"])
    assert_idle(server.url, engine)


def test_workbench_server_backend_writes_a_run_folder(served, tmp_path, monkeypatch, capsys) -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from servebench.workbench import terminal
    from servebench.workbench.cli import CONF_DIR
    from servebench.workbench.experiment import run_experiment

    monkeypatch.setattr(terminal, "LINE_EVERY_S", 0)  # a progress line per request
    server, engine = served
    overrides = ["backend=server", f"backend.url={server.url}", "workload=synthetic", "report=false",
                 "workload.num_requests=10", "workload.request_rate=50", "workload.input_len=16",
                 "workload.output_len=5"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)
    summary = run_experiment(cfg, tmp_path)
    assert summary["backend"] == "server" and summary["num_finished"] == 10
    assert summary["num_preemptions"] == 0 and (tmp_path / "summary.json").exists()
    assert "server: 10/10 requests (100%)" in capsys.readouterr().err
    assert_idle(server.url, engine)
