"""The engine loop in a background thread, fed by the asyncio side through a thread-safe inbox.

The engine is not thread-safe, so one thread owns it: it takes adds and aborts from the inbox
between steps, steps while any request is unfinished, and hands each step's updates to the event
loop in one callback. Concurrent HTTP requests therefore meet in the scheduler's batch.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from servebench.engine.core.sampling_params import SamplingParams
from servebench.engine.lora import LoRARequest
from servebench.engine.outputs import PositionLogprobs
from servebench.engine.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)


class RequestFailed(RuntimeError):
    """The engine ended this request with an error (its step failed because of it); the others went on."""


@dataclass(slots=True)
class Update:
    """One request's state after a step, copied out of the engine thread (cumulative text, tokens, ...)."""

    text: str
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int | None
    finish_reason: str | None
    token_ids: list[int]
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float | None = None
    prompt_logprobs: list[PositionLogprobs | None] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class _Seen:
    """What the engine thread has already reported of a live request."""

    num_tokens: int = 0
    last_token_time: float = 0.0


class AsyncEngine:
    def __init__(self, engine, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.metrics = metrics
        self.error: Exception | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue] = {}  # event-loop side
        self._live: dict[str, _Seen] = {}  # engine-thread side
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._inbox.put(None)
        self._thread.join()

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
        lora_request: LoRARequest | None = None,
    ) -> AsyncIterator[Update]:
        """Yield the request's updates until it finishes; the engine's ValueError for a bad request
        comes out of the first `anext`. Leaving early (client gone, cancelled) aborts the request."""
        if self.error is not None:
            raise self.error
        stream: asyncio.Queue[Update | Exception] = asyncio.Queue()
        self._streams[request_id] = stream
        # Arrival is now, in the engine's clock (a pure function of time, safe to read here).
        self._inbox.put(("add", request_id, prompt_token_ids, params, self.engine.now(), lora_request))
        finished = False
        try:
            while not finished:
                update = await stream.get()
                if isinstance(update, Exception):
                    raise update
                finished = update.finished
                yield update
        finally:
            del self._streams[request_id]
            if not finished:
                self._inbox.put(("abort", request_id))

    # ---- engine thread ---------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._take_inbox(block=not self.engine.has_unfinished_requests()):
                updates = self._step() if self.engine.has_unfinished_requests() else []
                self._record_engine()  # before the updates go out: a client that saw its last token
                if updates:  # and then reads /metrics finds the gauges up to date
                    self._loop.call_soon_threadsafe(self._dispatch, updates)
        except Exception as e:  # the engine is broken: fail every open request, /health turns 503
            logger.exception("the engine loop died")
            self.error = RuntimeError(f"the engine loop died: {e!r}")
            self._loop.call_soon_threadsafe(self._fail_all, self.error)

    def _take_inbox(self, block: bool) -> bool:
        """Apply every queued add and abort (waiting for one if idle); False once asked to stop."""
        while True:
            try:
                cmd = self._inbox.get(block=block)
            except queue.Empty:
                return True
            if cmd is None:
                return False
            block = False
            if cmd[0] == "abort":
                if self._live.pop(cmd[1], None) is not None:
                    self.engine.abort_request(cmd[1])
            else:
                self._add(*cmd[1:])

    def _add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
             arrival: float, lora_request: LoRARequest | None) -> None:
        try:
            self.engine.add_request(request_id, None, prompt_token_ids, params, arrival_time=arrival,
                                    lora_request=lora_request)
        except Exception as e:  # a bad request fails alone (ValueError: HTTP 400); the engine goes on
            self._loop.call_soon_threadsafe(self._dispatch, [(request_id, e)])
            return
        self._live[request_id] = _Seen()

    def _step(self) -> list[tuple[str, Update | Exception]]:
        return [(o.request_id, self._observe(o)) for o in self.engine.step() if o.request_id in self._live]

    def _observe(self, out) -> Update | Exception:
        """Count the step's tokens and latencies from the engine's own lifecycle times."""
        completion, times, metrics = out.outputs[0], out.metrics, self.metrics
        n, seen = len(completion.token_ids), self._live[out.request_id]
        if n > seen.num_tokens:
            if seen.num_tokens == 0:
                metrics.ttft.observe(times.first_token_time - times.arrival_time)
                metrics.prompt_tokens.inc(len(out.prompt_token_ids))
            else:
                metrics.itl.observe(times.last_token_time - seen.last_token_time)
            metrics.generation_tokens.inc(n - seen.num_tokens)
            seen.num_tokens, seen.last_token_time = n, times.last_token_time
        reason = completion.finish_reason if out.finished else None
        if reason is not None:
            del self._live[out.request_id]
            metrics.record_finish(reason, times.finish_time - times.arrival_time, times.time_in_queue)
        if reason == "error":
            return RequestFailed(f"the engine failed on request {out.request_id} (see the server log)")
        return Update(completion.text, len(out.prompt_token_ids), n, out.num_cached_tokens, reason,
                      completion.token_ids, completion.logprobs, completion.cumulative_logprob,
                      out.prompt_logprobs)

    def _record_engine(self) -> None:
        s = self.engine.stats()
        self.metrics.record_engine(s.num_running, s.num_waiting, s.kv_usage, {
            "num_preemptions": s.num_preemptions, "prefix_cache_queries": s.prefix_cache_queries_tokens,
            "prefix_cache_hits": s.prefix_cache_hits_tokens})

    # ---- event-loop side -----------------------------------------------------------
    def _dispatch(self, updates: list[tuple[str, Update | Exception]]) -> None:
        for request_id, update in updates:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.put_nowait(update)

    def _fail_all(self, error: Exception) -> None:
        for stream in self._streams.values():
            stream.put_nowait(error)
