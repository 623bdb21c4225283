"""The server's streaming path on the CPU, no model and no HTTP: its event-loop cost per streamed token, and
how the GIL switch interval delays an engine thread that shares the process with it.

    python benchmarks/server_stream_cost.py                   # 256 streams x 64 tokens, 5 / 1 / 0.5 ms
    python benchmarks/server_stream_cost.py --streams 64 --switch-interval-ms 5 0.5

`per token`: updates dispatched as the engine thread does (AsyncEngine._dispatch), through each request's
stream to its SSE chunk (OpenAIServer._serve, completions, one choice), all on one event loop.
`engine steps`: the same streams fed by a stand-in engine thread that, each step, waits --device-ms with the
GIL released (a device sync), then holds it for --host-ms (scheduling, inputs, outputs); each chunk's send
costs --send-us of Python on the loop (uvicorn's write, not run here). The step period against device +
host is what the engine loses to the event loop; `servebench-serve` sets the interval to
engine/server/__main__.py's GIL_SWITCH_INTERVAL_S.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
import types

from servebench.engine.server.api import CompletionFormat, OpenAIServer, Prompt
from servebench.engine.server.async_engine import Update
from servebench.engine.server.protocol import CompletionRequest


class _Tokenizer:
    def decode(self, ids: list[int]) -> str:
        return "x"


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _update(n: int, last: bool) -> Update:
    return Update("ab" * n, 3, n, 0, "length" if last else None, list(range(n)))


async def _streams(server: OpenAIServer, streams: int, tokens: int) -> tuple[list[str], list]:
    """`streams` streaming completions past their first token: their request ids and responses."""
    req = CompletionRequest.model_validate({"prompt": [1, 2, 3], "stream": True, "max_tokens": tokens})
    prompt = [Prompt([1, 2, 3], "")]
    serving = [asyncio.create_task(server._serve(req, prompt, tokens, None, CompletionFormat))
               for _ in range(streams)]
    while len(server.engine._streams) < streams:
        await asyncio.sleep(0)
    ids = list(server.engine._streams)
    server.engine._dispatch([(i, _update(1, False)) for i in ids])
    return ids, await asyncio.gather(*serving)


async def per_token(streams: int, tokens: int) -> float:
    server = OpenAIServer(_ENGINE, "model", "/model")
    ids, responses = await _streams(server, streams, tokens)
    readers = [asyncio.create_task(_drain(r, 0.0)) for r in responses]
    began = time.perf_counter()
    for n in range(2, tokens + 1):
        server.engine._dispatch([(i, _update(n, n == tokens)) for i in ids])
        for _ in range(4):  # each reader takes its token in the first pass of the loop
            await asyncio.sleep(0)
    await asyncio.gather(*readers)
    return (time.perf_counter() - began) / (streams * (tokens - 1))


async def _drain(response, send_s: float) -> None:
    async for _ in response.body_iterator:
        if send_s:
            _busy(send_s)


async def engine_steps(streams: int, tokens: int, device_s: float, host_s: float, send_s: float) -> float:
    server = OpenAIServer(_ENGINE, "model", "/model")
    ids, responses = await _streams(server, streams, tokens)
    loop = asyncio.get_running_loop()
    readers = [asyncio.create_task(_drain(r, send_s)) for r in responses]

    def engine() -> None:
        for n in range(2, tokens + 1):
            time.sleep(device_s)
            _busy(host_s)
            loop.call_soon_threadsafe(server.engine._dispatch, [(i, _update(n, n == tokens)) for i in ids])

    began = time.perf_counter()
    thread = threading.Thread(target=engine)
    thread.start()
    await asyncio.gather(*readers)
    thread.join()
    return (time.perf_counter() - began) / (tokens - 1)


_ENGINE = types.SimpleNamespace(tokenizer=_Tokenizer(), max_model_len=1 << 16, vocab_size=32000,
                                now=lambda: 0.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--device-ms", type=float, default=8.0)
    p.add_argument("--host-ms", type=float, default=1.0)
    p.add_argument("--send-us", type=float, default=20.0)
    p.add_argument("--switch-interval-ms", type=float, nargs="+", default=[5.0, 1.0, 0.5])
    a = p.parse_args()
    cost = asyncio.run(per_token(a.streams, a.tokens))
    print(f"per token: {cost * 1e6:.1f} us of the event loop ({a.streams} streams x {a.tokens} tokens)")
    for ms in a.switch_interval_ms:
        sys.setswitchinterval(ms / 1e3)
        step = asyncio.run(engine_steps(a.streams, a.tokens, a.device_ms / 1e3, a.host_ms / 1e3,
                                        a.send_us / 1e6))
        print(f"engine steps, switch interval {ms:g} ms: {step * 1e3:.2f} ms a step against "
              f"{a.device_ms:g} + {a.host_ms:g} ms (device + host), {a.streams} streams")


if __name__ == "__main__":
    main()
