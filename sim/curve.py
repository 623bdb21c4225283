"""A measured cost as a function of one integer (tokens, batch size, message size): the profile tables of
the Vidur and engine-profile step-time models are read through it."""

from __future__ import annotations

import numpy as np


class Curve:
    """y(x) tabulated at every integer x up to the last profiled point; beyond it, a straight line with
    the slope of the table's upper half (fixed costs stay fixed, the throughput-bound part scales)."""

    __slots__ = ("_y", "_x_max", "_slope")

    def __init__(self, xs: np.ndarray, ys: np.ndarray) -> None:
        order = np.argsort(xs)
        xs, ys = np.asarray(xs, float)[order], np.asarray(ys, float)[order]
        self._x_max = int(xs[-1])
        # a list, not an array: predict() runs per simulated step, and indexing a list of floats is cheaper
        self._y = np.interp(np.arange(self._x_max + 1), xs, ys).tolist()
        self._slope = upper_half_slope(self._y)

    def __call__(self, x: int) -> float:
        if x <= self._x_max:
            return self._y[x]
        return self._y[-1] + self._slope * (x - self._x_max)


def upper_half_slope(y: list[float]) -> float:
    """The slope from the middle of `y` to its end, never negative: the rate at which a cost grows once its
    fixed part is paid, for extrapolating past the last profiled point."""
    mid = len(y) // 2
    return max((y[-1] - y[mid]) / max(len(y) - 1 - mid, 1), 0.0)
