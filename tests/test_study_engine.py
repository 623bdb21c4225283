"""backend=engine in study sweeps: each run releases the engine it built (a multirun's engine jobs share one
process under Hydra's basic launcher); a sweep of both backends is reported side by side. CPU, tiny model."""

from __future__ import annotations

import json
import shutil
import weakref
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from servebench.workbench import engine_backend
from servebench.workbench.cli import CONF_DIR
from servebench.workbench.experiment import run_experiment
from servebench.workbench.runs import load_sweep
from servebench.workbench.study import evaluate, write_study_report
from test_case_studies import workbench

TINY_ENGINE = ["model=tiny_llama", "++backend.dtype=float32", "++backend.warmup=false", "workload=synthetic",
               "workload.num_requests=6", "workload.input_len=32", "workload.output_len=8",
               "workload.request_rate=null"]


@pytest.fixture
def engines(monkeypatch) -> list[weakref.ref]:
    """Weak references to the engines the backend builds. Each is put in a reference cycle, as an engine's
    object graph can be: LLMEngine gc.freeze()s itself, so only unfreezing and collecting frees it."""
    refs: list[weakref.ref] = []
    build = engine_backend.build_engine

    def build_and_watch(cfg: dict) -> object:
        engine = build(cfg)
        engine.cycle = engine
        refs.append(weakref.ref(engine))
        return engine

    monkeypatch.setattr(engine_backend, "build_engine", build_and_watch)
    return refs


@pytest.fixture(scope="module")
def engine_cfg() -> dict:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["backend=engine", *TINY_ENGINE, "report=false", "progress=false"])
    return OmegaConf.to_container(cfg, resolve=True)


def test_each_engine_run_releases_its_engine(engines, engine_cfg, tmp_path):
    for i in range(2):  # as Hydra's basic launcher runs a sweep's jobs: one after another in one process
        assert run_experiment(engine_cfg, tmp_path / str(i))["num_finished"] == 6
        assert [ref() for ref in engines] == [None] * (i + 1)


def test_a_failed_engine_run_releases_its_engine(engines, engine_cfg, tmp_path, monkeypatch):
    def fail(cfg: dict, engine: object) -> None:
        raise RuntimeError("replay failed")

    monkeypatch.setattr(engine_backend, "_replay", fail)
    with pytest.raises(RuntimeError, match="replay failed"):  # kept, with its traceback, as the launcher does
        run_experiment(engine_cfg, tmp_path)
    assert engines[0]() is None


@pytest.fixture(scope="module")
def two_backend_sweep(tmp_path_factory) -> tuple[Path, Path]:
    """tune_kv_preemption_engine on the tiny model: 2 KV sizes x (sim, engine). (sweep, report folder)"""
    root = tmp_path_factory.mktemp("two_backends")
    res = workbench("+experiment=tune_kv_preemption_engine", *TINY_ENGINE,
                    "cache.gpu_memory_utilization=0.5,0.9", f"hydra.sweep.dir={root / 'sweep'}",
                    f"study.report_dir={root / 'report'}")
    assert res.returncode == 0, res.stderr
    return root / "sweep", root / "report"


def test_both_backends_side_by_side(two_backend_sweep):
    sweep, report = two_backend_sweep
    text = (report / "report.md").read_text()
    assert ("| claim | condition | guide | simulated | verdict (sim) | engine | verdict (engine) |\n"
            "| --- | --- | --- | --- | --- | --- | --- |\n| less KV cache, more preemptions | "
            "cache.gpu_memory_utilization 0.5 -> 0.9 | decreasing |") in text
    assert "## Guide vs simulated vs engine" in text and "Engine: 2 of the 4 runs" in text
    assert "on cpu (torch " in text.split("## Guide")[0]
    assert "  - sim: " in text and "  - engine: " in text
    rows = json.loads((report / "claims.json").read_text())
    assert [r["claim"] for r in rows] == ["less KV cache, more preemptions", "less KV cache, less throughput"]
    for r in rows:
        assert list(r) == ["claim", "condition", "guide", "simulated", "verdict", "engine", "engine_verdict"]
        assert r["verdict"] and r["engine_verdict"] and "not run" not in (r["simulated"], r["engine"])
    df = load_sweep(sweep)
    _, figures = evaluate(df, df.attrs["config"]["study"], sweep)
    legend = [t.get_text() for t in figures[0].axes[0].get_legend().get_texts()]
    assert legend == ["backend=sim", "backend=engine"]


def test_a_condition_without_engine_runs_says_not_run(two_backend_sweep, tmp_path):
    sweep = shutil.copytree(two_backend_sweep[0], tmp_path / "sweep")
    for summary in sweep.glob("*/summary.json"):  # drop the engine's run at 0.9
        s = json.loads(summary.read_text())
        if s["backend"] == "engine" and s["config"]["cache"]["gpu_memory_utilization"] == 0.9:
            summary.unlink()
    study = {"name": "t", "claims": [{"claim": "throughput", "kind": "value", "metric": "output_throughput",
                                      "guide": 1.0, "better": "higher"}]}
    write_study_report(sweep, study, tmp_path / "report")
    rows = {r["condition"]: r for r in json.loads((tmp_path / "report/claims.json").read_text())}
    assert rows["cache.gpu_memory_utilization=0.9"]["engine"] == "not run"
    assert rows["cache.gpu_memory_utilization=0.9"]["verdict"] == "holds"
    assert rows["cache.gpu_memory_utilization=0.5"]["engine_verdict"] == "holds"


def test_quantized_engine_runs_report_their_bytes(tmp_path):
    # tiny_llama's 64 inputs need a group size under AWQ's 128; on the CPU the KV cache has as many blocks as
    # max_num_seqs requests of max_model_len need, whatever its dtype: the fp8 one takes half the bytes.
    def run(*overrides: str) -> dict:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("config", overrides=["backend=engine", *TINY_ENGINE, "report=false",
                                               "progress=false", *overrides])
        return run_experiment(OmegaConf.to_container(cfg, resolve=True), tmp_path / "_".join(overrides))

    plain = run()
    quantized = run("quantization=awq", "quantization.group_size=32", "cache.kv_cache_dtype=fp8")
    assert (plain["quantization"], plain["kv_cache_dtype"]) == ("none", "auto")
    assert (quantized["quantization"], quantized["kv_cache_dtype"]) == ("awq", "fp8")
    assert quantized["num_finished"] == 6
    assert quantized["weight_gib"] < plain["weight_gib"]
    assert quantized["num_gpu_blocks"] == plain["num_gpu_blocks"]
    assert quantized["kv_cache_gib"] == pytest.approx(plain["kv_cache_gib"] / 4)  # fp32 -> 1 byte
    with pytest.raises(ValueError, match=r"quantization\.method='fp8': a server runs as it was started"):
        run("backend=server", "quantization=fp8")
