"""The engine loop beside the server's event loop: in a thread of the server's process (an `LLMEngine` given
to build_app) or in a process of its own (`EngineProcess`, what `servebench-serve` runs).

The engine is not thread-safe, so one loop owns it (`EngineLoop`): it takes adds and aborts from its inbox
between steps, steps while any request is unfinished, and sends each step's news in one `StepReport`.
Concurrent HTTP requests therefore meet in the scheduler's batch. A report carries each request's new
tokens and text only (`Delta`), so that what crosses a process boundary does not grow with the output; the
event-loop side (`AsyncEngine`) keeps each stream's text and tokens so far and the server's metrics.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from servebench.engine.core.sampling_params import SamplingParams
from servebench.engine.lora import LoRARequest
from servebench.engine.outputs import PositionLogprobs
from servebench.engine.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)


class RequestFailed(RuntimeError):
    """The engine ended this request with an error (its step failed because of it); the others went on."""


@dataclass(slots=True)
class Update:
    """One request's state after a step, as the server reads it (cumulative text, tokens, ...)."""

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


class Delta(NamedTuple):
    """What one step added to a request, and the latencies it completed (seconds, None: not this step)."""

    text_keep: int  # characters of the text so far that stay: fewer only when a stop string cut them
    text: str  # the text after them
    token_ids: list[int]  # the new tokens
    logprobs: list[PositionLogprobs] | None  # theirs, when asked for
    cumulative_logprob: float | None
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int | None
    prompt_logprobs: list[PositionLogprobs | None] | None  # the first delta's only
    ttft_s: float | None
    itl_s: float | None
    e2e_s: float | None  # with the finish
    queue_s: float | None

    def after(self, last: Update | None) -> Update:
        """The request's Update once this delta is applied to its `last` one."""
        if last is None:
            return Update(self.text, self.num_prompt_tokens, len(self.token_ids), self.num_cached_tokens,
                          self.finish_reason, self.token_ids, self.logprobs, self.cumulative_logprob,
                          self.prompt_logprobs)
        ids = last.token_ids + self.token_ids  # new lists: a stream may still hold `last`
        logprobs = None if self.logprobs is None else (last.logprobs or []) + self.logprobs
        return Update(last.text[:self.text_keep] + self.text, self.num_prompt_tokens, len(ids),
                      self.num_cached_tokens, self.finish_reason, ids, logprobs, self.cumulative_logprob,
                      last.prompt_logprobs)


class StepReport(NamedTuple):
    """One pass of the engine loop: its gauges and counters (SchedulerStats'), then each request's news."""

    running: int
    waiting: int
    kv_usage: float
    counters: dict[str, int]
    updates: list[tuple[str, Delta | Exception]]


@dataclass(slots=True)
class _Seen:
    """What the engine loop has already reported of a live request."""

    num_tokens: int = 0
    num_logprobs: int = 0
    text_len: int = 0
    last_token_time: float = 0.0


class EngineLoop:
    """The engine's side. `receive(block)` gives the next command (("add", request_id, prompt_token_ids,
    params, arrival, lora_request), ("abort", request_id), or None to stop), raising queue.Empty when not
    blocking and there is none; `send` takes each StepReport, and a RuntimeError if the engine dies."""

    def __init__(self, engine, receive: Callable[[bool], Any], send: Callable[[Any], None]) -> None:
        self.engine, self.receive, self.send = engine, receive, send
        self._live: dict[str, _Seen] = {}
        self._refused: list[tuple[str, Exception]] = []  # adds the engine refused, for the next report

    def run(self) -> None:
        try:
            while self._take_inbox(block=not self.engine.has_unfinished_requests()):
                updates, self._refused = self._refused, []
                if self.engine.has_unfinished_requests():
                    updates += self._step()
                # Every pass, so that the gauges follow aborts too; before the updates go out, so that a
                # client that saw its last token and then reads /metrics finds them up to date.
                s = self.engine.stats()
                counters = {"num_preemptions": s.num_preemptions, "prefix_cache_queries":
                            s.prefix_cache_queries_tokens, "prefix_cache_hits": s.prefix_cache_hits_tokens}
                self.send(StepReport(s.num_running, s.num_waiting, s.kv_usage, counters, updates))
        except Exception as e:  # the engine is broken: every open request fails, /health turns 503
            logger.exception("the engine loop died")
            self.send(RuntimeError(f"the engine loop died: {e!r}"))

    def _take_inbox(self, block: bool) -> bool:
        """Apply every queued add and abort (waiting for one if idle); False once asked to stop."""
        while True:
            try:
                cmd = self.receive(block)
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
            # As a plain exception of its message: a report may cross a pipe, whatever raised it.
            self._refused.append((request_id, ValueError(str(e)) if isinstance(e, ValueError) else
                                  RuntimeError(f"request {request_id} was refused: {e!r}")))
            return
        self._live[request_id] = _Seen()

    def _step(self) -> list[tuple[str, Delta | Exception]]:
        return [(o.request_id, self._delta(o)) for o in self.engine.step() if o.request_id in self._live]

    def _delta(self, out) -> Delta:
        """The step's news of a request, with the latencies it completed in the engine's own clock."""
        completion, times, seen = out.outputs[0], out.metrics, self._live[out.request_id]
        n, ttft, itl, e2e, in_queue = len(completion.token_ids), None, None, None, None
        if n > seen.num_tokens:
            if seen.num_tokens == 0:
                ttft = times.first_token_time - times.arrival_time
            else:
                itl = times.last_token_time - seen.last_token_time
        if out.finished:
            del self._live[out.request_id]
            e2e, in_queue = times.finish_time - times.arrival_time, times.time_in_queue
        logprobs, text = completion.logprobs, completion.text
        keep = min(seen.text_len, len(text))  # the text only grows, but for a stop string's cut
        delta = Delta(keep, text[keep:], completion.token_ids[seen.num_tokens:],
                      None if logprobs is None else logprobs[seen.num_logprobs:],
                      completion.cumulative_logprob, completion.finish_reason if out.finished else None,
                      len(out.prompt_token_ids),
                      out.num_cached_tokens, out.prompt_logprobs if seen.num_tokens == 0 else None,
                      ttft, itl, e2e, in_queue)
        seen.num_tokens, seen.text_len = n, len(text)
        seen.num_logprobs = seen.num_logprobs if logprobs is None else len(logprobs)
        seen.last_token_time = times.last_token_time
        return delta


class EngineThread:
    """An LLMEngine's loop in a thread of this process: what build_app runs for an engine it is given."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.tokenizer, self.max_model_len, self.vocab_size = engine.tokenizer, engine.max_model_len, \
            engine.vocab_size
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def now(self) -> float:
        return self.engine.now()

    def start(self, deliver: Callable[[Any], None]) -> None:
        """Run the loop; `deliver` takes each report in the loop's thread."""
        loop = EngineLoop(self.engine, lambda block: self._inbox.get(block=block), deliver)
        self._thread = threading.Thread(target=loop.run, name="engine-loop", daemon=True)
        self._thread.start()

    def submit(self, cmd: tuple | None) -> None:
        self._inbox.put(cmd)

    def stop(self) -> None:
        self.submit(None)
        self._thread.join()


class _Stream:
    __slots__ = ("last", "queue")

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Update | Exception] = asyncio.Queue()
        self.last: Update | None = None


class AsyncEngine:
    """The event loop's side: each request's stream of Updates, and the server's metrics. `engine` is an
    EngineThread or an EngineProcess (start, submit, stop, now)."""

    def __init__(self, engine, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.metrics = metrics
        self.error: Exception | None = None
        self._streams: dict[str, _Stream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.engine.start(lambda report: self._loop.call_soon_threadsafe(self._deliver, report))

    def stop(self) -> None:
        self.engine.stop()

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
        lora_request: LoRARequest | None = None,
    ) -> AsyncIterator[Update]:
        """Yield the request's updates until it finishes; the engine's ValueError for a bad request
        comes out of the first `anext`. Leaving early (client gone, cancelled) aborts the request."""
        if self.error is not None:
            raise self.error
        stream = self._streams[request_id] = _Stream()
        # Arrival is now, in the engine's clock.
        self.engine.submit(("add", request_id, prompt_token_ids, params, self.engine.now(), lora_request))
        finished = False
        try:
            while not finished:
                update = await stream.queue.get()
                if isinstance(update, Exception):
                    raise update
                finished = update.finished
                yield update
        finally:
            del self._streams[request_id]
            if not finished and self.error is None:
                self.engine.submit(("abort", request_id))

    def _deliver(self, report: StepReport | Exception) -> None:
        if isinstance(report, Exception):  # the engine died
            self.error = report
            for stream in self._streams.values():
                stream.queue.put_nowait(report)
            return
        self.metrics.record_engine(report.running, report.waiting, report.kv_usage, report.counters)
        for request_id, item in report.updates:
            if isinstance(item, Delta):
                self._observe(item)
            stream = self._streams.get(request_id)
            if stream is None:
                continue
            if isinstance(item, Delta):
                stream.last = item.after(stream.last)
                item = stream.last
                if item.finish_reason == "error":
                    item = RequestFailed(f"the engine failed on request {request_id} (see the server log)")
            stream.queue.put_nowait(item)

    def _observe(self, d: Delta) -> None:
        metrics = self.metrics
        if d.ttft_s is not None:
            metrics.ttft.observe(d.ttft_s)
            metrics.prompt_tokens.inc(d.num_prompt_tokens)
        elif d.itl_s is not None:
            metrics.itl.observe(d.itl_s)
        metrics.generation_tokens.inc(len(d.token_ids))
        if d.finish_reason is not None:
            metrics.record_finish(d.finish_reason, d.e2e_s, d.queue_s)
