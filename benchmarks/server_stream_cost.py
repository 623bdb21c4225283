"""The server's streaming path on the CPU, no model and no HTTP: its event-loop cost per streamed token, and
what the event loop costs an engine loop in a thread of its process against one in a process of its own.

    python benchmarks/server_stream_cost.py                   # 256 streams x 64 tokens
    python benchmarks/server_stream_cost.py --streams 64 --device-ms 40 --host-ms 3

`per token`: step reports delivered as the engine loop's are (AsyncEngine._deliver), through each request's
stream to its SSE chunk (OpenAIServer._serve, completions, one choice), all on one event loop.
`engine steps`: the same streams fed by a stand-in engine loop that, each step, waits --device-ms with the
GIL released (a device sync), then holds it for --host-ms (scheduling, inputs, outputs) and sends its
report; each chunk's send costs --send-us of Python on the loop (uvicorn's write, not run here). The stand-in
runs in a thread of the server's process (an LLMEngine given to build_app) and in a process of its own
whose reports a reader thread hands to the loop (EngineProcess, what servebench-serve runs): the step period
against device + host is what the engine loses to the event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import threading
import time
import types
from collections.abc import Callable
from multiprocessing.connection import Connection

from servebench.engine.server.api import CompletionFormat, OpenAIServer, Prompt
from servebench.engine.server.async_engine import Delta, StepReport
from servebench.engine.server.protocol import CompletionRequest


class _Tokenizer:
    def decode(self, ids: list[int]) -> str:
        return "x"


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _report(ids: list[str], n: int, last: bool) -> StepReport:
    """Token n (from 1) of every stream: two characters each."""
    delta = Delta(2 * (n - 1), "ab", [n], None, None, "length" if last else None, 3, 0, None,
                  1e-3 if n == 1 else None, None if n == 1 else 1e-3, 1.0 if last else None, 0.0)
    return StepReport(len(ids), 0, 0.5, {}, [(i, delta) for i in ids])


async def _streams(server: OpenAIServer, streams: int, tokens: int) -> tuple[list[str], list]:
    """`streams` streaming completions past their first token: their request ids and responses."""
    req = CompletionRequest.model_validate({"prompt": [1, 2, 3], "stream": True, "max_tokens": tokens})
    prompt = [Prompt([1, 2, 3], "")]
    serving = [asyncio.create_task(server._serve(req, prompt, tokens, None, CompletionFormat))
               for _ in range(streams)]
    while len(server.engine._streams) < streams:
        await asyncio.sleep(0)
    ids = list(server.engine._streams)
    server.engine._deliver(_report(ids, 1, False))
    return ids, await asyncio.gather(*serving)


async def per_token(streams: int, tokens: int) -> float:
    server = OpenAIServer(_ENGINE, "model", "/model")
    ids, responses = await _streams(server, streams, tokens)
    readers = [asyncio.create_task(_drain(r, 0.0)) for r in responses]
    began = time.perf_counter()
    for n in range(2, tokens + 1):
        server.engine._deliver(_report(ids, n, n == tokens))
        for _ in range(4):  # each reader takes its token in the first pass of the loop
            await asyncio.sleep(0)
    await asyncio.gather(*readers)
    return (time.perf_counter() - began) / (streams * (tokens - 1))


async def _drain(response, send_s: float) -> None:
    async for _ in response.body_iterator:
        if send_s:
            _busy(send_s)


def _stand_in_engine(ids: list[str], tokens: int, device_s: float, host_s: float,
                     send: Callable[[StepReport], None]) -> None:
    for n in range(2, tokens + 1):
        time.sleep(device_s)
        _busy(host_s)
        send(_report(ids, n, n == tokens))


def _engine_process_main(ids: list[str], tokens: int, device_s: float, host_s: float, go: Connection,
                         reports: Connection) -> None:
    reports.send(None)  # started (its imports are not timed)
    go.recv()
    _stand_in_engine(ids, tokens, device_s, host_s, reports.send)


async def engine_steps(streams: int, tokens: int, device_s: float, host_s: float, send_s: float,
                       in_process: bool) -> float:
    server = OpenAIServer(_ENGINE, "model", "/model")
    ids, responses = await _streams(server, streams, tokens)
    loop = asyncio.get_running_loop()
    readers = [asyncio.create_task(_drain(r, send_s)) for r in responses]

    def deliver(report: StepReport) -> None:
        loop.call_soon_threadsafe(server.engine._deliver, report)

    if in_process:  # EngineProcess's reader thread
        ctx = multiprocessing.get_context("spawn")
        reports, child_reports = ctx.Pipe(duplex=False)
        child_go, go = ctx.Pipe(duplex=False)
        child = ctx.Process(target=_engine_process_main,
                            args=(ids, tokens, device_s, host_s, child_go, child_reports))
        child.start()
        reports.recv()

        def engine() -> None:
            go.send(True)
            for _ in range(tokens - 1):
                deliver(reports.recv())
    else:
        def engine() -> None:
            _stand_in_engine(ids, tokens, device_s, host_s, deliver)

    began = time.perf_counter()
    thread = threading.Thread(target=engine)
    thread.start()
    await asyncio.gather(*readers)
    seconds = time.perf_counter() - began
    thread.join()
    if in_process:
        child.join()  # not timed: the exit of a process that imported torch
    return seconds / (tokens - 1)


_ENGINE = types.SimpleNamespace(tokenizer=_Tokenizer(), max_model_len=1 << 16, vocab_size=32000,
                                now=lambda: 0.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--device-ms", type=float, default=8.0)
    p.add_argument("--host-ms", type=float, default=1.0)
    p.add_argument("--send-us", type=float, default=20.0)
    a = p.parse_args()
    cost = asyncio.run(per_token(a.streams, a.tokens))
    print(f"per token: {cost * 1e6:.1f} us of the event loop ({a.streams} streams x {a.tokens} tokens)")
    for where, in_process in (("a thread of the server's process", False), ("a process of its own", True)):
        step = asyncio.run(engine_steps(a.streams, a.tokens, a.device_ms / 1e3, a.host_ms / 1e3,
                                        a.send_us / 1e6, in_process))
        print(f"engine steps, the engine loop in {where}: {step * 1e3:.2f} ms a step against "
              f"{a.device_ms:g} + {a.host_ms:g} ms (device + host), {a.streams} streams")


if __name__ == "__main__":
    main()
