"""The harness: Hydra CLI, workloads, metrics, reports, and run loading for notebooks."""

from workbench.runs import load_run, load_sweep

__all__ = ["load_run", "load_sweep"]
