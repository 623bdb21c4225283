"""What `LLM.generate` and `LLMEngine.step` return, shaped like vLLM's outputs."""

from __future__ import annotations

from dataclasses import dataclass

from servebench.engine.core.request import Request


@dataclass(slots=True)
class Logprob:
    """One token's log-probability under the model (before temperature and top-k/p), as in vLLM."""

    logprob: float
    rank: int  # 1: the most likely token


# One position's log-probabilities: the chosen token first, then the most likely ones (vLLM's layout).
PositionLogprobs = dict[int, Logprob]


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None  # one per token when SamplingParams.logprobs is set
    finish_reason: str | None = None  # stop | length | abort | error, None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestMetrics:
    """Lifecycle times of a request, in the engine's clock (time.time() seconds)."""

    arrival_time: float
    last_token_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    time_in_queue: float | None
    finish_time: float | None

    @classmethod
    def of(cls, req: Request) -> RequestMetrics:
        scheduled = req.first_scheduled_time
        return cls(arrival_time=req.arrival_time, last_token_time=req.last_token_time,
                   first_scheduled_time=scheduled, first_token_time=req.first_token_time,
                   time_in_queue=None if scheduled is None else scheduled - req.arrival_time,
                   finish_time=req.finish_time)


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    # With SamplingParams.prompt_logprobs: one per prompt token, None for the first (nothing predicts it).
    prompt_logprobs: list[PositionLogprobs | None] | None = None
