"""Serving benchmark client: replay a workload against an OpenAI-compatible server, as `vllm bench serve`.

Each request is sent at its arrival time with streaming on; TTFT, every inter-chunk gap (ITL) and E2E
are measured at the client. The requests table has the ARCHITECTURE.md columns; what only the server
knows (first scheduling, preemptions) is NaN, cached tokens come from `usage` where the server reports them.
Chosen clients may close their stream after a few tokens (`disconnects`), as impatient users do; the server
must then abort them and free what they held, which `wait_until_idle` checks from /metrics.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
from servebench.workbench.token_ids import APPROX_VOCAB, prompt_token_ids

NAN = float("nan")
APIS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass(slots=True)
class RequestResult:
    request_id: str
    arrival_s: float = NAN
    first_token_s: float = NAN
    finish_s: float = NAN
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: float = NAN
    finish_reason: str | None = None
    itl_s: list[float] = field(default_factory=list)
    disconnect_after: int | None = None  # the client closes its stream once it has this many tokens


def run_serving_benchmark(
    url: str, workload_df: pd.DataFrame, tokenizer_or_none: Any, model_name: str, api: str = "completions",
    slo: Any = None, max_concurrency: int | None = None, api_key: str | None = None,
    disconnects: Mapping[int, int] | None = None, on_finished: Callable[[int], None] | None = None,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Replay `workload_df` against the server at `url` (e.g. http://127.0.0.1:8000).

    Prompts are the rows' `prompt_token_ids` (or ids synthesized from `prompt_tokens` / `hash_ids`), sent as
    token ids to /v1/completions; `api='chat'` sends their decoded text as one user message (needs a
    tokenizer). Every request asks for exactly `output_tokens` tokens (`ignore_eos`). `slo` is accepted for
    the caller's goodput summary and unused here. Times are seconds from the benchmark start; a request's
    `arrival_s` is when it was sent (later than its workload arrival when `max_concurrency` holds it back).
    `disconnects` maps row positions to a token count: that client closes its stream once it has read so many
    tokens, and its row ends with finish_reason 'abort'. `on_finished(1)` is called as each request ends
    (a progress bar's update).
    Returns the requests table and every inter-chunk gap in seconds.
    """
    del slo  # goodput is computed from the returned table
    if api not in APIS:
        raise ValueError(f"api={api!r}: choose one of {', '.join(APIS)}")
    if api == "chat" and tokenizer_or_none is None:
        raise ValueError("api='chat' sends text: pass the model's tokenizer to decode the workload's prompts")
    results = asyncio.run(_replay(url.rstrip("/") + APIS[api], workload_df, tokenizer_or_none, model_name,
                                  api, max_concurrency, api_key, disconnects or {}, on_finished))
    table = pd.DataFrame({
        "request_id": [r.request_id for r in results],
        "arrival_s": [r.arrival_s for r in results],
        "first_scheduled_s": NAN,
        "first_token_s": [r.first_token_s for r in results],
        "finish_s": [r.finish_s for r in results],
        "prompt_tokens": [r.prompt_tokens for r in results],
        "output_tokens": [r.output_tokens for r in results],
        "cached_tokens": [r.cached_tokens for r in results],
        "num_preemptions": NAN,
        "finish_reason": [r.finish_reason for r in results],
    })
    itl = np.fromiter((gap for r in results for gap in r.itl_s), dtype=float)
    return table, itl


async def _replay(url: str, df: pd.DataFrame, tokenizer: Any, model: str, api: str,
                  max_concurrency: int | None, api_key: str | None,
                  disconnects: Mapping[int, int],
                  on_finished: Callable[[int], None] | None) -> list[RequestResult]:
    vocab_size = len(tokenizer) if tokenizer is not None else APPROX_VOCAB
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
    async with httpx.AsyncClient(timeout=None, limits=limits, headers=headers) as client:
        t0 = time.perf_counter()
        tasks = []
        for i, row in enumerate(df.itertuples(index=False)):
            ids = prompt_token_ids(row, i, vocab_size)
            body = _body(api, model, ids, int(row.output_tokens), tokenizer)
            delay = t0 + float(row.arrival_s) - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            result = RequestResult(str(row.request_id), prompt_tokens=len(ids),
                                   disconnect_after=disconnects.get(i))
            task = asyncio.create_task(_send(client, url, body, result, t0, limit))
            if on_finished is not None:
                task.add_done_callback(lambda _: on_finished(1))
            tasks.append(task)
        return await asyncio.gather(*tasks)


def _body(api: str, model: str, ids: list[int], max_tokens: int, tokenizer: Any) -> dict:
    body = {"model": model, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    if api == "chat":
        body["messages"] = [{"role": "user", "content": tokenizer.decode(ids, skip_special_tokens=True)}]
    else:
        body["prompt"] = ids
    return body


async def _send(client: httpx.AsyncClient, url: str, body: dict, r: RequestResult, t0: float,
                limit: asyncio.Semaphore | None) -> RequestResult:
    if limit is not None:
        async with limit:
            return await _send(client, url, body, r, t0, None)
    r.arrival_s = time.perf_counter() - t0
    last = r.arrival_s
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                r.finish_reason = f"error: HTTP {resp.status_code} {(await resp.aread())[:200]!r}"
                return r
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter() - t0
                if chunk.get("choices"):
                    if math.isnan(r.first_token_s):
                        r.first_token_s = now
                    else:
                        r.itl_s.append(now - last)
                    last = now
                    r.output_tokens += 1  # one chunk per token; `usage` below corrects it when sent
                    r.finish_reason = chunk["choices"][0].get("finish_reason") or r.finish_reason
                if usage := chunk.get("usage"):
                    _read_usage(r, usage)
                if r.disconnect_after is not None and r.output_tokens >= r.disconnect_after \
                        and r.finish_reason is None:  # a stream already finished is not cut
                    r.finish_reason = "abort"  # leaving the block closes the connection mid-stream
                    break
        r.finish_s = last
    except httpx.HTTPError as e:
        r.finish_reason = f"error: {e!r}"
    return r


def _read_usage(r: RequestResult, usage: dict) -> None:
    r.output_tokens = usage["completion_tokens"]
    r.prompt_tokens = usage["prompt_tokens"]
    details = usage.get("prompt_tokens_details") or {}
    if details.get("cached_tokens") is not None:
        r.cached_tokens = details["cached_tokens"]


def pick_disconnects(n: int, fraction: float, after_tokens: int, seed: int = 0) -> dict[int, int]:
    """round(fraction * n) of n requests, drawn with `seed`, each closing its stream after `after_tokens`."""
    chosen = random.Random(seed).sample(range(n), round(fraction * n))
    return dict.fromkeys(sorted(chosen), after_tokens)


def received_throughput(requests: pd.DataFrame) -> float:
    """Tokens that reached the clients, disconnected streams included, per second from first send to last
    token: the work the server did for its clients, comparable to an offline run of the same token counts."""
    duration = requests["finish_s"].max() - requests["arrival_s"].min()
    return float(requests["output_tokens"].sum() / duration)


SERVER_COUNTERS = ("vllm:num_preemptions", "vllm:prefix_cache_queries", "vllm:prefix_cache_hits",
                   "vllm:generation_tokens")
SERVER_LOAD = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")


def _samples(http: httpx.Client) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {s.name: s.value for fam in text_string_to_metric_families(http.get("/metrics").text)
            for s in fam.samples}


def server_counters(http: httpx.Client) -> dict[str, float]:
    """The server's cumulative counters from /metrics: preemptions, prefix-cache and generated tokens."""
    samples = _samples(http)
    return {name: samples.get(name + "_total", NAN) for name in SERVER_COUNTERS}


def wait_until_idle(http: httpx.Client, timeout_s: float = 30.0) -> tuple[dict[str, float], float]:
    """The server's gauges (SERVER_LOAD) once no request runs or waits and no KV block is held, and the
    seconds that took; after `timeout_s`, the last reading: what the server leaked (a missing gauge: NaN)."""
    t0 = time.perf_counter()
    while True:
        samples = _samples(http)
        load = {name: samples.get(name, NAN) for name in SERVER_LOAD}
        waited = time.perf_counter() - t0
        if all(v == 0 for v in load.values()) or waited >= timeout_s:
            return load, waited
        time.sleep(0.2)


def leak_check(load: dict[str, float], waited_s: float) -> str:
    """One line on `wait_until_idle`'s reading: 'nothing leaked' or 'LEAK'."""
    running, waiting, kv = (load[name] for name in SERVER_LOAD)
    verdict = "nothing leaked" if all(v == 0 for v in load.values()) else "LEAK"
    return (f"leak check: {running:.0f} running, {waiting:.0f} waiting, KV usage {kv:.4f} "
            f"{waited_s:.1f} s after the load: {verdict}")


def counter_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What the client cannot see, from the counters around a run: preemptions and the prefix hit rate."""
    queries = after["vllm:prefix_cache_queries"] - before["vllm:prefix_cache_queries"]
    hits = after["vllm:prefix_cache_hits"] - before["vllm:prefix_cache_hits"]
    return {"num_preemptions": int(after["vllm:num_preemptions"] - before["vllm:num_preemptions"]),
            "prefix_cache_hit_rate": hits / queries if queries > 0 else NAN}


def load_tokenizer(path: str | None) -> Any:
    """The served model's tokenizer where its folder exists here; None: the workloads' approximate one."""
    if path is None or not Path(path).is_dir():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
