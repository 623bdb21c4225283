"""Case-study experiments: every config composes and runs on a tiny slice; a tiny sweep ends in a study report
(regenerable with workbench-report); the config search runs on a tiny grid; the case-studies notebook runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from hydra import compose, initialize_config_dir
from nbclient import NotebookClient
from omegaconf import OmegaConf
from servebench.workbench.claims import in_range, trend_verdict
from servebench.workbench.cli import CONF_DIR, report_main
from servebench.workbench.experiment import run_experiment

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (REPO / "conf/experiment").glob("*.yaml"))


def workbench(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "workbench", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_runs_on_a_tiny_slice(tmp_path, name):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"+experiment={name}", "workload.num_requests=20"])
    assert cfg.study.name == name and cfg.study.claims
    summary = run_experiment(OmegaConf.to_container(cfg, resolve=True), tmp_path)
    assert summary["num_requests"] == min(20, summary["num_requests"]) and summary["num_finished"] > 0


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory) -> tuple[Path, Path]:
    """tune_kv_preemption with two runs of 40 requests: (sweep folder, study report folder)."""
    root = tmp_path_factory.mktemp("study")
    sweep, report = root / "outputs/tune_kv_preemption/t0", root / "report"
    res = workbench("+experiment=tune_kv_preemption", "workload.num_requests=40",
                    "cache.gpu_memory_utilization=0.5,0.9", "scheduler.preemption_mode=recompute",
                    f"hydra.sweep.dir={sweep}", f"study.report_dir={report}")
    assert res.returncode == 0, res.stderr
    return sweep, report


def test_study_report_has_verdicts_plots_and_the_regenerating_command(tiny_sweep):
    sweep, report = tiny_sweep
    text = (report / "report.md").read_text()
    assert ("`workbench +experiment=tune_kv_preemption study.report_dir=reports/tune_kv_preemption`"
            in text.split("## Setup")[0])
    assert "## Guide vs simulated" in text and "| less KV cache, more preemptions |" in text
    rows = json.loads((report / "claims.json").read_text())
    assert {r["claim"] for r in rows} == {"less KV cache, more preemptions", "less KV cache, less throughput"}
    assert all(r["verdict"] for r in rows)
    assert (report / "claim_1.png").stat().st_size > 0
    assert (report / "report.html").read_text().count("data:image/png;base64,") == 2
    (report / "report.md").unlink()
    report_main([str(sweep)])  # rebuilds the sweep report and, from the runs' config, the study report
    assert (report / "report.md").is_file() and (sweep / "sweep_report.html").is_file()


def test_config_search_on_a_tiny_grid(tmp_path):
    grid = ["parallel.tensor_parallel_size=choice(4,8)", "deployment.num_replicas=choice(1,2)",
            "scheduler.max_num_seqs=choice(64)", "scheduler.max_num_batched_tokens=choice(4096)",
            "scheduler.enable_chunked_prefill=choice(true)", "cache.enable_prefix_caching=choice(true)"]
    res = workbench("-m", "+experiment=case1_search", "hydra/sweeper/sampler=grid",
                    "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=1", "hydra.launcher.n_jobs=1", *grid,
                    "workload.num_requests=30", "workload.request_rate=0.5",
                    f"hydra.sweep.dir={tmp_path / 'sweep'}", f"study.report_dir={tmp_path / 'report'}")
    assert res.returncode == 0, res.stderr
    runs = [json.loads((tmp_path / f"sweep/{i}/summary.json").read_text()) for i in range(4)]
    gpus = sorted(r["num_gpus"] for r in runs)
    assert gpus == [4, 8, 8, 16]
    rows = json.loads((tmp_path / "report/claims.json").read_text())
    cheapest = next(r for r in rows if r["condition"] == "cheapest")
    assert cheapest["simulated"].startswith("4 GPUs") and cheapest["verdict"] == "holds"


def test_verdict_words():
    assert in_range(0.4, 0.3, 0.5) == "holds"
    assert in_range(0.1, 0.3, 0.5) == "same direction, smaller than claimed"
    assert in_range(-0.2, 0.3, 0.5) == "does not hold"
    assert in_range(-0.02, -0.05, None) == "holds"
    assert trend_verdict("k", [1, 2, 3], [1.0, 2.0, 3.0], 0.01) == "holds"
    assert trend_verdict("k", [1, 2, 3], [1.0, 2.0, 2.0], 0.01) == "holds up to k=2, flat beyond"
    assert trend_verdict("k", [1, 2, 3], [1.0, 3.0, 2.0], 0.01) == "holds only up to k=2, then reverses"
    assert trend_verdict("k", [1, 2], [2.0, 1.0], 0.01) == "does not hold"


def test_case_studies_notebook_executes(tiny_sweep):
    sweep, _ = tiny_sweep
    env = {**os.environ, "PYTHONPATH": str(REPO), "CASE_STUDIES_DIR": str(sweep.parents[1])}
    nb = nbformat.read(REPO / "notebooks/case_studies.ipynb", as_version=4)
    client = NotebookClient(nb, timeout=120, resources={"metadata": {"path": str(REPO / "notebooks")}})
    client.execute(env=env)
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "tune_kv_preemption" in outputs
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_an_experiment_writes_its_report_into_its_sweep_folder_unless_asked(tmp_path):
    committed = REPO / "reports/tune_kv_preemption/report.md"
    before = committed.stat().st_mtime_ns
    res = workbench("+experiment=tune_kv_preemption", "workload.num_requests=20",
                    "cache.gpu_memory_utilization=0.9", "scheduler.preemption_mode=recompute",
                    f"hydra.sweep.dir={tmp_path}")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "report.md").is_file() and committed.stat().st_mtime_ns == before
