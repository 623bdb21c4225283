"""Hydra callbacks: a multirun ends in one comparison table and plot for the sweep folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class SweepReport(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from workbench.report import write_sweep_report

        sweep_dir = Path(config.hydra.sweep.dir)
        if any(sweep_dir.glob("*/summary.json")):
            print(f"sweep report: {write_sweep_report(sweep_dir)}")
