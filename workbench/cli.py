"""`workbench`: the Hydra entry point. It turns the config into a plain dict and calls `run_experiment`."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from workbench.experiment import ConfigError, run_experiment

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
    return summary.get("output_throughput")


def main() -> None:
    _main()
