"""The shared scheduler in virtual time: an arrival process and an engine-loop process on one SimPy clock."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

import simpy

from engine.core.request import Request
from engine.core.scheduler import Scheduler
from engine.core.scheduler_output import SchedulerOutput


class StepTimeModel(Protocol):
    def predict(self, out: SchedulerOutput) -> float: ...


class Simulation:
    """Replays `requests` (sorted by arrival) through `scheduler`, a step at a time.

    Each step: schedule, predict its duration, advance the clock, update. With
    nothing runnable the engine loop sleeps until the next arrival. Output
    tokens are placeholders; lengths come from each request's max_tokens.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        step_time: StepTimeModel,
        requests: Iterable[Request],
        on_finished: Callable[[int], None] | None = None,
    ) -> None:
        self.env = simpy.Environment()
        self.scheduler = scheduler
        self.step_time = step_time
        self.on_finished = on_finished
        self._requests: Iterator[Request] = iter(requests)
        self._arrivals_done = False
        self._wake: simpy.Event | None = None

    def run(self) -> float:
        """Run until every request has finished; returns the simulated end time in seconds."""
        self.env.process(self._arrive())
        done = self.env.process(self._engine_loop())
        self.env.run(until=done)
        return self.env.now

    def _arrive(self):
        env, scheduler = self.env, self.scheduler
        for req in self._requests:
            if req.arrival_time > env.now:
                yield env.timeout(req.arrival_time - env.now)
            if scheduler.add_request(req, env.now):
                self._notify()
            elif self.on_finished:
                self.on_finished(1)
        self._arrivals_done = True
        self._notify()

    def _notify(self) -> None:
        if self._wake is not None and not self._wake.triggered:
            self._wake.succeed()

    def _engine_loop(self):
        env, scheduler, predict = self.env, self.scheduler, self.step_time.predict
        on_finished = self.on_finished
        while True:
            out = scheduler.schedule(env.now)
            if not out.requests:
                if out.preempted:
                    continue  # a request preempted itself; it is readmitted at once
                if scheduler.num_waiting:
                    raise RuntimeError(
                        "the scheduler admitted nothing with an idle engine and requests waiting"
                    )
                if self._arrivals_done and not scheduler.has_unfinished_requests():
                    return
                self._wake = env.event()
                yield self._wake
                self._wake = None
                continue
            yield env.timeout(predict(out))
            finished = scheduler.update(out, None, env.now)
            if finished and on_finished:
                on_finished(len(finished))
