"""`workbench`: the Hydra entry point. It turns the config into a plain dict and calls `run_experiment`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from servebench.workbench.experiment import ConfigError, run_experiment

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _main(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = run_experiment(OmegaConf.to_container(cfg, resolve=True), run_dir)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        (run_dir / "error.txt").write_text(f"{e}\n")
        print(f"workbench: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"run folder: {run_dir}")
    return objective(summary, cfg.get("search"))


def objective(summary: dict[str, Any], search: DictConfig | None) -> float:
    """What a sweeper (Optuna) maximizes: `search.metric` of a deployment within `search.max_gpus` that
    meets the SLO for `search.min_attainment` of requests, else 0; without `search`, output throughput."""
    if search is None:
        return summary["output_throughput"]
    from servebench.workbench.study import feasible

    ok = feasible(summary["slo_attainment"], summary["num_gpus"], search.min_attainment, search.max_gpus)
    return float(summary[search.metric]) if ok else 0.0


def main() -> None:
    _main()
