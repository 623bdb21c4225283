"""Step-time terms of deployment features, added on top of whichever step-time model runs.

Quantization, LoRA and the vision encoder change a step's time by amounts that do not depend on how the
base model prices the rest (roofline, Vidur profiles, measured profiles), so each is a callable
`term(out) -> seconds` and `WithTerms` sums them onto the base prediction. Without any feature on, the
base model is used as it is (no wrapper, no cost per step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from servebench.engine.core.scheduler_output import SchedulerOutput
from servebench.sim.simulator import StepTimeModel

Term = Callable[[SchedulerOutput], float]


class WithTerms:
    def __init__(self, base: StepTimeModel, terms: Sequence[Term]) -> None:
        self.base = base
        self.sources = getattr(base, "sources", {})
        self._predict = base.predict
        self._terms = tuple(terms)

    def predict(self, out: SchedulerOutput) -> float:
        t = self._predict(out)
        for term in self._terms:
            t += term(out)
        return t


def with_terms(base: StepTimeModel, terms: Sequence[Term]) -> StepTimeModel:
    return WithTerms(base, terms) if terms else base
