"""A step's sampled tokens and logprobs on their way from the device to the host, awaited only when read."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from servebench.engine.core.request import Request
from servebench.engine.outputs import PositionLogprobs
from servebench.engine.sampler import Logprobs, SamplerOutput


@dataclass(slots=True)
class SampledTokens:
    """A step's sampled tokens (and logprobs) on their way to the host; `tolist()` waits for them and the
    step's GPU work."""

    host: torch.Tensor | None  # [rows] int64, pinned where the device is a GPU
    rows: list[int]  # indices into SchedulerOutput.requests of the requests that sampled
    num_requests: int
    done: torch.cuda.Event | None
    sampled_logprobs: Logprobs | None  # of the sampled tokens, for the requests that asked
    prompt: list[tuple[int, int, Logprobs]]  # (request index, first position of its chunk, its scores)
    failures: dict[int, Exception]  # request index -> why its part of the step failed (the rest went on)
    began: torch.cuda.Event | None = None  # recorded before the forward: `device_s` runs from it to `done`

    @classmethod
    def start(cls, sampled: SamplerOutput | None, rows: list[int], num_requests: int, device: torch.device,
              prompt: list[tuple[int, int, Logprobs]], failures: dict[int, Exception],
              began: torch.cuda.Event | None = None) -> SampledTokens:
        tokens, logprobs = (None, None) if sampled is None else (sampled.tokens, sampled.logprobs)
        if device.type != "cuda":
            return cls(tokens, rows, num_requests, None, logprobs, prompt, failures)
        host = None if tokens is None else _to_host(tokens)
        logprobs = None if logprobs is None else logprobs.map(_to_host)
        prompt = [(i, start, lp.map(_to_host)) for i, start, lp in prompt]
        done = torch.cuda.Event(enable_timing=began is not None)
        done.record()  # also when nothing sampled: the step's measured duration covers its GPU work
        return cls(host, rows, num_requests, done, logprobs, prompt, failures, began)

    def wait(self) -> None:
        if self.done is not None:
            self.done.synchronize()

    def tolist(self) -> list[int]:
        """The token of request i at i (-1: none)."""
        self.wait()
        sampled = [-1] * self.num_requests
        if self.host is not None:
            for i, tok in zip(self.rows, self.host.tolist()):
                sampled[i] = tok
        return sampled

    def logprobs(self, requests: list[Request]) -> dict[int, PositionLogprobs]:
        """Request index -> its sampled token's logprobs, for those of the step's `requests` that asked."""
        if self.sampled_logprobs is None:
            return {}
        index = [i for i in self.rows if requests[i].sampling_params.logprobs is not None]
        ks = [requests[i].sampling_params.logprobs for i in index]
        return dict(zip(index, self.sampled_logprobs.tolist(ks), strict=True))

    def prompt_logprobs(self, requests: list[Request]) -> list[tuple[int, int, list[PositionLogprobs]]]:
        """(request index, p, logprobs of its prompt tokens p + 1, p + 2, ...) for this step's chunks."""
        return [(i, start, lp.tolist([requests[i].sampling_params.prompt_logprobs] * len(lp.ranks)))
                for i, start, lp in self.prompt]

    @property
    def device_s(self) -> float:
        """Seconds the device spent on the step's forward and sampling, once `wait` returned (NaN without
        a CUDA device). Events time the stream: a step queued behind the previous one starts when it ends."""
        if self.began is None:
            return math.nan
        return self.began.elapsed_time(self.done) / 1e3


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """Start copying `t` to pinned host memory; it is there once the step's done event has passed."""
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)
