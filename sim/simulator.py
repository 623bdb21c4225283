"""The shared scheduler in virtual time: an arrival process and engine-loop processes on one SimPy clock."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import simpy
from servebench.engine.core.graphs import padded_graph_batch
from servebench.engine.core.request import Request
from servebench.engine.core.scheduler import Scheduler
from servebench.engine.core.scheduler_output import SchedulerOutput


class StepTimeModel(Protocol):
    def predict(self, out: SchedulerOutput) -> float: ...


@dataclass(slots=True, eq=False)
class Engine:
    """One engine loop: a scheduler, its step-time model and, under pipeline parallelism, the stages it
    shares with the other virtual engines of its replica (None: the step runs as one unit)."""

    scheduler: Scheduler
    step_time: StepTimeModel
    stages: list[simpy.Resource] | None = None
    wake: simpy.Event | None = None

    def notify(self) -> None:
        if self.wake is not None and not self.wake.triggered:
            self.wake.succeed()


class Simulation:
    """Replays `requests` (sorted by arrival) through `scheduler`, a step at a time.

    Each step: schedule, predict its duration, advance the clock, update. With
    nothing runnable the engine loop sleeps until the next arrival. Output
    tokens are placeholders; lengths come from each request's max_tokens.
    Subclasses (sim.cluster) run several engines and override `route`.
    `graph_sizes`: the CUDA-graph batches the engine captures (engine.core.graphs); a decode-only step records
    the one it pads to, as the engine's runner does. None: eager.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        step_time: StepTimeModel,
        requests: Iterable[Request],
        on_finished: Callable[[int], None] | None = None,
        graph_sizes: list[int] | None = None,
    ) -> None:
        self.env = simpy.Environment()
        self.engines = [Engine(scheduler, step_time)]
        self.on_finished = on_finished
        self.graph_sizes = graph_sizes or []
        self._requests: Iterator[Request] = iter(requests)
        self._arrivals_done = False

    @property
    def scheduler(self) -> Scheduler:
        return self.engines[0].scheduler

    def run(self) -> float:
        """Run until every request has finished; returns the simulated end time in seconds."""
        env = self.env
        env.process(self._arrive())
        loops = [env.process(self._engine_loop(engine)) for engine in self.engines]
        # The heap holds every prompt's token list: each full garbage collection walks millions of ids,
        # ~10 % of a long run, while the loop makes no reference cycles worth collecting (same peak RSS).
        collecting = gc.isenabled()
        gc.disable()
        try:
            env.run(until=env.all_of(loops))
        finally:
            if collecting:
                gc.enable()
        return env.now

    def route(self, req: Request) -> Engine:
        """The engine that serves `req`."""
        return self.engines[0]

    def _arrive(self) -> Iterator[simpy.Event]:
        env = self.env
        for req in self._requests:
            if req.arrival_time > env.now:
                yield env.timeout(req.arrival_time - env.now)
            engine = self.route(req)
            if engine.scheduler.add_request(req, env.now):
                engine.notify()
            elif self.on_finished:
                self.on_finished(1)
        self._arrivals_done = True
        for engine in self.engines:
            engine.notify()

    def _engine_loop(self, engine: Engine) -> Iterator[simpy.Event]:
        env, scheduler, predict, stages = self.env, engine.scheduler, engine.step_time.predict, engine.stages
        on_finished, graph_sizes = self.on_finished, self.graph_sizes
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
                engine.wake = env.event()
                yield engine.wake
                engine.wake = None
                continue
            if graph_sizes and out.total_num_scheduled_tokens == len(out.requests):  # one token each
                out.graph_batch = padded_graph_batch(graph_sizes, len(out.requests))
            out.device_s = step_s = predict(out)
            if stages is None:
                yield env.timeout(step_s)
            else:
                yield from self._through_stages(stages, step_s)
            finished = scheduler.update(out, None, env.now)
            if finished and on_finished:
                on_finished(len(finished))

    def _through_stages(self, stages: list[simpy.Resource], duration: float) -> Iterator[simpy.Event]:
        """One micro-batch through the pipeline: each stage holds it for duration / P, then hands it on
        (the step time already holds the P - 1 activation sends, so they are spread over the stages).
        A stage busy with another virtual engine's batch makes this one wait: that, and stages idle
        for want of batches, are the pipeline's bubbles."""
        per_stage = duration / len(stages)
        for stage in stages:
            with stage.request() as turn:
                yield turn
                yield self.env.timeout(per_stage)
