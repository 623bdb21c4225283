"""SimPy simulator: the shared scheduler driven in virtual time by a step-time model."""

from sim.simulator import Simulation

__all__ = ["Simulation"]
