"""The shared scheduler in virtual time: an arrival process and engine-loop processes on one SimPy clock."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import simpy
from servebench.engine.core.graphs import GraphSizes
from servebench.engine.core.request import Request
from servebench.engine.core.scheduler import Scheduler
from servebench.engine.core.scheduler_output import SchedulerOutput


class StepTimeModel(Protocol):
    def predict(self, out: SchedulerOutput) -> float: ...


class HostModel(Protocol):
    """The engine loop's host work around a step's device time (sim.calibrated.HostTerms)."""

    def pre(self, out: SchedulerOutput, step: int) -> float: ...  # schedule, prepare the inputs

    def post(self, out: SchedulerOutput) -> float: ...  # update, detokenize, outputs, loop

    def launch(self, out: SchedulerOutput) -> float: ...  # inputs and graph launch an idle device waits for


class NoHost:
    """For step-time models that price the host's work inside the step, or leave it out."""

    def pre(self, out: SchedulerOutput, step: int) -> float:
        return 0.0

    def post(self, out: SchedulerOutput) -> float:
        return 0.0

    def launch(self, out: SchedulerOutput) -> float:
        return 0.0


@dataclass(slots=True, eq=False)
class Engine:
    """One engine loop: a scheduler, its step-time model and, under pipeline parallelism, the stages it
    shares with the other virtual engines of its replica (None: the step runs as one unit)."""

    scheduler: Scheduler
    step_time: StepTimeModel
    stages: list[simpy.Resource] | None = None
    wake: simpy.Event | None = None
    host: HostModel = field(default_factory=NoHost)

    def __post_init__(self) -> None:
        self.host = getattr(self.step_time, "host", None) or self.host

    def notify(self) -> None:
        if self.wake is not None and not self.wake.triggered:
            self.wake.succeed()


class Simulation:
    """Replays `requests` (sorted by arrival) through `scheduler`, a step at a time.

    Each step: schedule, predict its duration, advance the clock, update. With
    nothing runnable the engine loop sleeps until the next arrival. Output
    tokens are placeholders; lengths come from each request's max_tokens.
    Subclasses (sim.cluster) run several engines and override `route`.
    `graph_sizes`: the CUDA graphs the engine captures (engine.core.graphs); a step records the one it pads
    to, as the engine's runner does. None: eager. A step-time model with a `host`
    (sim.calibrated) prices the loop's host work apart from the device's, and `async_scheduling` overlaps the
    two as the engine's async loop does; without one, async and sync scheduling give the same timeline.
    `device_time_scale` multiplies the model's device time (the whole step for a model without a host part).
    """

    def __init__(
        self,
        scheduler: Scheduler,
        step_time: StepTimeModel,
        requests: Iterable[Request],
        on_finished: Callable[[int], None] | None = None,
        graph_sizes: GraphSizes | None = None,
        async_scheduling: bool = False,
        device_time_scale: float = 1.0,
    ) -> None:
        if not device_time_scale > 0:
            raise ValueError(f"backend.device_time_scale={device_time_scale}: must be > 0")
        self.device_time_scale = device_time_scale
        self.env = simpy.Environment()
        self.engines = [Engine(scheduler, step_time)]
        self.on_finished = on_finished
        self.graph_sizes = graph_sizes
        self.async_scheduling = async_scheduling
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
        if not self.async_scheduling:
            yield from self._sync_loop(engine)
        elif engine.stages is not None:
            raise ValueError("backend.async_scheduling with pipeline parallelism is not simulated")
        else:
            yield from self._async_loop(engine)

    def _sync_loop(self, engine: Engine) -> Iterator[simpy.Event]:
        """LLMEngine.step, sync: schedule, the host prepares and launches, the device runs, the host takes
        the tokens (the step ends), then updates and collects outputs before the next schedule."""
        env, scheduler, host, stages = self.env, engine.scheduler, engine.host, engine.stages
        while True:
            out = yield from self._schedule(engine, can_idle=True)
            if out is None:
                return
            pre, device = host.pre(out, scheduler.num_steps), self._price(engine, out)
            out.device_s = device = device + host.launch(out)  # the device is idle: it waits for the launch
            if stages is None:
                yield env.timeout(pre + device)
            else:
                if pre:
                    yield env.timeout(pre)
                yield from self._through_stages(stages, device)
            self._finished(scheduler.update(out, None, env.now))
            post = host.post(out)
            if post:  # no event for no host time: most runs price it inside the step, or not at all
                yield env.timeout(post)

    def _async_loop(self, engine: Engine) -> Iterator[simpy.Event]:
        """LLMEngine.step, async: schedule and launch step k+1 (queued on the device behind step k), wait for
        step k's tokens, resolve them; the host's work overlaps the device's and shows where it is longer."""
        env, scheduler, host = self.env, engine.scheduler, engine.host
        in_flight: tuple[SchedulerOutput, float] | None = None  # launched step, when its device work ends
        device_free = 0.0
        while True:
            out = yield from self._schedule(engine, can_idle=in_flight is None)
            if out is None and in_flight is None:
                return
            launched = None
            if out is not None:
                yield env.timeout(host.pre(out, scheduler.num_steps))
                device = self._price(engine, out)
                # Queued behind the step in flight, the launch overlaps it; an idle device waits for it.
                start = max(env.now + host.launch(out), device_free)
                out.device_s = start + device - max(env.now, device_free)  # as the engine's events time it
                device_free = start + device
                launched = (out, device_free)
            if in_flight is not None:
                prev, end = in_flight
                yield env.timeout(max(end - env.now, 0.0))
                self._finished(scheduler.resolve(prev, [0] * len(prev.requests), env.now))
                yield env.timeout(host.post(prev))
            if launched is not None:
                scheduler.advance(out)
            in_flight = launched

    def _schedule(self, engine: Engine, can_idle: bool) -> Iterator[simpy.Event]:
        """The next batch; None when there is none and either nothing is left (can_idle) or a step is still
        in flight (not can_idle). With nothing runnable and can_idle, sleeps until an arrival."""
        env, scheduler = self.env, engine.scheduler
        while True:
            out = scheduler.schedule(env.now)
            if out.requests:
                return out
            if out.preempted:
                continue  # a request preempted itself; it is readmitted at once
            if not can_idle:
                return None
            if scheduler.num_waiting:
                raise RuntimeError("the scheduler admitted nothing with an idle engine and requests waiting")
            if self._arrivals_done and not scheduler.has_unfinished_requests():
                return None
            engine.wake = env.event()
            yield engine.wake
            engine.wake = None

    def _price(self, engine: Engine, out: SchedulerOutput) -> float:
        """The step's device time; the step first pads to its CUDA graph, as the engine does."""
        if self.graph_sizes is not None:
            out.graph_batch, out.graph_tokens = self.graph_sizes.padded(len(out.requests),
                                                                        out.total_num_scheduled_tokens)
        out.device_s = engine.step_time.predict(out) * self.device_time_scale
        return out.device_s

    def _finished(self, finished: list[Request]) -> None:
        if finished and self.on_finished:
            self.on_finished(len(finished))

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
