"""Requests and a step loop for scheduler tests: the scheduler alone, no executor, one time unit a step."""

from __future__ import annotations

from servebench.engine.core import Request, SamplingParams, Scheduler, SchedulerOutput


def make(n_tokens: int, rid: str, max_tokens: int = 4, base: int = 0, t: float = 0.0, **kw) -> Request:
    """A request of prompt ids base..base + n_tokens - 1 arriving at t; kw: priority, lora_id, mm fields."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return Request(rid, list(range(base, base + n_tokens)), params, arrival_time=t, **kw)


def step(sched: Scheduler, t: float) -> SchedulerOutput:
    out = sched.schedule(t)
    sched.update(out, None, t + 1)
    return out


def run_all(sched: Scheduler, t: float = 0.0) -> list[SchedulerOutput]:
    """Step from t until every request finished; the outputs of the steps."""
    outs = []
    while sched.has_unfinished_requests():
        outs.append(step(sched, t))
        t += 1
    return outs
