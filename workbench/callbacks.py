"""Hydra callbacks: a multirun ends in one comparison table and plot for the sweep folder, and in the
study report when the experiment defines a `study`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


class SweepReport(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from servebench.workbench.report import write_sweep_report

        sweep_dir = Path(config.hydra.sweep.dir)
        if not any(sweep_dir.glob("*/summary.json")):
            return
        print(f"sweep report: {write_sweep_report(sweep_dir)}")
        if config.get("study"):
            from servebench.workbench.study import write_study_report

            study = OmegaConf.to_container(config.study, resolve=True)
            print(f"study report: {write_study_report(sweep_dir, study)}")
