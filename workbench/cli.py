"""The commands. `workbench`: the Hydra entry point. It turns the config into a plain dict, calls
`run_experiment` and prints the result; bad input, Hydra's own refusals of the command line included, is one
line on stderr (exit 2), Ctrl-C one line (exit 130). `workbench-report`: the reports of saved run and sweep
folders."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException
from servebench.workbench.experiment import run_experiment
from servebench.workbench.schema import SECTIONS, ConfigError

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
LABELLED = ("model", "hardware")  # groups whose `name` only labels the preset's numbers


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _main(cfg: DictConfig) -> float | None:
    from servebench.workbench.runs import clear_run
    from servebench.workbench.terminal import result_block

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    clear_run(run_dir)  # before anything can fail: an earlier run's results must not pass for this run's
    try:
        choices = dict(hydra_cfg.runtime.choices)
        check_added_keys(OmegaConf.to_container(hydra_cfg.overrides.task), choices)  # as typed: unresolved
        config = OmegaConf.to_container(cfg, resolve=True)
        check_preset_names(config, choices)
        summary = run_experiment(config, run_dir)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        message = error_line(e)
        (run_dir / "error.txt").write_text(f"{message}\n")
        print(f"workbench: error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.stderr.write(f"\nworkbench: interrupted: {run_dir} is incomplete (no summary.json)\n")
        sys.exit(130)
    print(result_block(summary, run_dir))
    return objective(summary, cfg.get("search"))


def check_added_keys(overrides: list[str], choices: dict[str, Any]) -> None:
    """Hydra refuses a key the config lacks, unless `+` adds it: a top-level key outside the schema's
    sections would then be read by nothing, and the run would go on as if it had not been given."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        top = key.split(".")[0]
        added = override.is_add() or override.is_force_add()
        if added and key not in choices and top not in (*SECTIONS, "hydra"):
            raise ConfigError(f"{override.input_line}: {top} is not a section of the config, so nothing "
                              f"would read it (sections: {', '.join(SECTIONS)})")


def check_preset_names(config: dict[str, Any], choices: dict[str, Any]) -> None:
    """A model or card is chosen by its preset (model=llama3_8b); overriding only `model.name` would run the
    preset's numbers under another name."""
    for group in LABELLED:
        name, preset = (config.get(group) or {}).get("name"), choices.get(group)
        if preset is not None and name != preset:
            raise ConfigError(f"{group}.name={name!r} does not rename the {group}: it stays {preset}'s "
                              f"numbers; choose another preset with {group}=<file in conf/{group}/>")


def objective(summary: dict[str, Any], search: DictConfig | None) -> float:
    """What a sweeper (Optuna) maximizes: `search.metric` of a deployment within `search.max_gpus` that
    meets the SLO for `search.min_attainment` of requests, else 0; without `search`, output throughput."""
    if search is None:
        return summary["output_throughput"]
    from servebench.workbench.claims import feasible

    ok = feasible(summary["slo_attainment"], summary["num_gpus"], search.min_attainment, search.max_gpus)
    return float(summary[search.metric]) if ok else 0.0


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The resolved config that `workbench OVERRIDES...` would run, as a plain dict (notebooks, tests)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=list(overrides)), resolve=True)


def error_line(e: BaseException) -> str:
    """A refused command line or config value in one line: the key or option, and what it may be."""
    if isinstance(e, OverrideParseException):
        return (f"{e.override}: not an override Hydra can parse ({e.message.splitlines()[0]}; the grammar: "
                "https://hydra.cc/docs/advanced/override_grammar/basic/)")
    if isinstance(e, MissingConfigException) and e.options is not None and e.missing_cfg_file:
        group, _, name = e.missing_cfg_file.rpartition("/")
        return f"{group}={name}: no such option; choose one of {', '.join(e.options)}"
    cause = e.__cause__ if isinstance(e, HydraException) else e
    if isinstance(cause, ConfigKeyError | ConfigAttributeError) and cause.full_key \
            and cause.parent_node is not None:
        parent = cause.full_key.rpartition(".")[0]
        keys = ", ".join(str(k) for k in cause.parent_node) or "none"
        return f"{cause.full_key} is not a key of {parent or 'the config'} (keys: {keys})"
    hydra_text = " ".join(str(e).split("\n\n")[0].split()) if isinstance(e, HydraException) else ""
    if isinstance(cause, OmegaConfBaseException):
        first = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        omega = f"{cause.full_key}: {first}" if cause.full_key else first
        return f"{hydra_text}: {omega}" if hydra_text else omega
    return hydra_text or " ".join(str(e).split()) or type(e).__name__


def main() -> None:
    # Hydra prints its own refusals (an unknown key, a missing option, an unparsable override) over several
    # lines and exits 1; HYDRA_FULL_ERROR makes it raise them instead, to be told in one line here. Whoever
    # set HYDRA_FULL_ERROR asked for Hydra's traceback, and gets it.
    wants_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _main()
    except (HydraException, OmegaConfBaseException) as e:
        if wants_traceback:
            raise
        print(f"workbench: error: {error_line(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # outside a job (Hydra composing, a sweep between jobs)
        sys.stderr.write("\nworkbench: interrupted\n")
        sys.exit(130)


def report_main(argv: list[str] | None = None) -> None:
    """`workbench-report FOLDER...`: a run report for a run folder, a sweep report for a folder of runs (and
    the study report, into the study's report_dir, when the runs come from an experiment with a `study`)."""
    from servebench.workbench.report import write_report, write_sweep_report  # matplotlib: only when wanted
    from servebench.workbench.runs import SUMMARY, load_sweep
    from servebench.workbench.study import write_study_report

    parser = argparse.ArgumentParser(prog="workbench-report", description=report_main.__doc__)
    parser.add_argument("folders", nargs="+", type=Path, help="run folders or sweep (multirun) folders")
    for folder in parser.parse_args(argv).folders:
        try:
            print(write_report(folder) if (folder / SUMMARY).is_file() else write_sweep_report(folder))
            if not (folder / SUMMARY).is_file() and load_sweep(folder).attrs["config"].get("study"):
                print(write_study_report(folder))
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"workbench-report: error: {e}")
