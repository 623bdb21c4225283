"""Metrics on hand-made tables, run folders (write/load/sweep), reports and the quickstart notebook."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import yaml
from nbclient import NotebookClient
from servebench.workbench.cli import report_main
from servebench.workbench.metrics import summarize
from servebench.workbench.report import write_report, write_sweep_report
from servebench.workbench.runs import load_run, load_sweep, write_run

import servebench

REPO_ROOT = Path(__file__).resolve().parents[1]


def hand_tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Four requests: a finished (length), a finished one-token (stop), a rejected and an aborted one."""
    nan = math.nan
    requests = pd.DataFrame({
        "request_id": ["a", "b", "c", "d"],
        "arrival_s": [0.0, 1.0, 2.0, 3.0],
        "first_scheduled_s": [0.1, 1.5, nan, 3.0],
        "first_token_s": [0.2, 2.0, nan, nan],
        "finish_s": [1.2, 2.0, 2.0, 4.0],
        "prompt_tokens": [100, 200, 50, 80],
        "output_tokens": [11, 1, 0, 0],
        "cached_tokens": [0, 100, 0, 16],
        "num_preemptions": [0, 2, 0, 1],
        "finish_reason": ["length", "stop", "rejected", "abort"],
    })
    steps = pd.DataFrame({
        "step": [0, 1, 2], "start_s": [0.0, 1.0, 2.0], "duration_s": [1.0, 1.0, 2.0],
        "num_prefill_tokens": [100, 0, 200], "num_decode_tokens": [0, 1, 1], "num_running": [1, 1, 2],
        "num_waiting": [0, 1, 0], "kv_usage": [0.1, 0.2, 0.4], "num_preempted": [0, 0, 1],
        "prefix_hit_tokens": [0, 0, 100],
    })
    return requests, steps


def test_summary_of_hand_made_tables():
    requests, steps = hand_tables()
    s = summarize(requests, steps, itl_s=[0.1, 0.1, 0.2], slo={"ttft_ms": 500, "tpot_ms": None})
    # finished: a (ttft 200 ms, e2el 1200 ms, tpot 1000/10 = 100 ms) and b (ttft 1000 ms, e2el 1000, no tpot)
    expected = {
        "num_requests": 4, "num_finished": 2, "num_rejected": 1, "num_aborted": 1,
        "duration_s": 4.0,  # first arrival 0 -> last finish 4
        "request_throughput": 0.5, "input_throughput": 300 / 4, "output_throughput": 12 / 4,
        "total_token_throughput": 312 / 4,
        "goodput": 0.25,  # only a meets ttft <= 500 ms
        "mean_ttft_ms": 600.0, "median_ttft_ms": 600.0, "p90_ttft_ms": 920.0, "p99_ttft_ms": 992.0,
        "mean_tpot_ms": 100.0, "p99_tpot_ms": 100.0,
        "mean_e2el_ms": 1100.0, "p99_e2el_ms": 1198.0,
        "mean_itl_ms": 400 / 3, "median_itl_ms": 100.0, "p99_itl_ms": 198.0,
        "num_preemptions": 3,
        "prefix_cache_hit_rate": 116 / 380,  # over scheduled requests a, b, d
        "mean_kv_usage": (0.1 + 0.2 + 0.8) / 4,  # weighted by step duration
        "max_kv_usage": 0.4,
    }
    for key, value in expected.items():
        assert s[key] == pytest.approx(value), key
    assert all(f"{stat}_{m}" in s for stat in ("mean", "median", "p90", "p99")
               for m in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"))


def test_goodput_checks_every_given_slo_and_counts_one_token_requests_as_meeting_tpot():
    requests, steps = hand_tables()
    assert summarize(requests, steps, slo={"tpot_ms": 50})["goodput"] == pytest.approx(0.25)  # b only
    both = summarize(requests, steps, slo={"e2el_ms": 1100, "ttft_ms": 2000})
    assert both["goodput"] == pytest.approx(0.25)  # a misses e2el
    assert math.isnan(summarize(requests, steps, slo={"ttft_ms": None})["goodput"])
    assert math.isnan(summarize(requests, steps)["goodput"])
    with pytest.raises(ValueError, match="slo.ttft: unknown SLO"):
        summarize(requests, steps, slo={"ttft": 1})


def test_given_duration_is_used_for_throughputs():
    requests, steps = hand_tables()
    assert summarize(requests, steps, duration_s=8.0)["request_throughput"] == pytest.approx(0.25)


def test_empty_tables_give_nan_metrics():
    requests, steps = hand_tables()
    for s in (summarize(requests.iloc[:0], steps.iloc[:0]), summarize(pd.DataFrame(), None),
              summarize(requests[requests.finish_reason == "rejected"], None, itl_s=[])):
        assert s["num_finished"] == 0
        assert math.isnan(s["mean_ttft_ms"]) and math.isnan(s["p99_tpot_ms"]) and math.isnan(s["mean_itl_ms"])
        assert math.isnan(s["mean_kv_usage"]) and math.isnan(s["output_throughput"])


def test_missing_column_is_named():
    requests, steps = hand_tables()
    with pytest.raises(ValueError, match=r"requests table: missing column\(s\) \['cached_tokens'\]"):
        summarize(requests.drop(columns="cached_tokens"), steps)


def write_hand_run(folder: Path, config: dict | None = None, itl_s=None) -> dict:
    requests, steps = hand_tables()
    summary = summarize(requests, steps, itl_s) | {"backend": "sim", "config": config or {"seed": 0}}
    write_run(folder, requests, steps, summary, itl_s)
    return summary


def test_write_run_and_load_run_round_trip(tmp_path):
    summary = write_hand_run(tmp_path / "run", {"workload": {"name": "synthetic"}}, itl_s=[0.1, 0.2])
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "itl.npy", "requests.parquet", "steps.parquet", "summary.json"]  # no temporary files left
    assert "NaN" not in (tmp_path / "run/summary.json").read_text()  # strict JSON: NaN stored as null
    run = servebench.load_run(tmp_path / "run")
    requests, steps = hand_tables()
    pd.testing.assert_frame_equal(run.requests, requests, check_dtype=False)
    pd.testing.assert_frame_equal(run.steps, steps, check_dtype=False)
    assert run.config == {"workload": {"name": "synthetic"}} and "config" not in run.summary
    assert math.isnan(run.summary["goodput"]) and run.summary["backend"] == "sim"
    assert run.summary["mean_ttft_ms"] == summary["mean_ttft_ms"]
    np.testing.assert_allclose(run.itl_s, [0.1, 0.2])
    write_hand_run(tmp_path / "run")  # rewriting without ITL removes the old samples
    assert load_run(tmp_path / "run").itl_s is None


def test_load_run_rejects_an_incomplete_folder(tmp_path):
    write_hand_run(tmp_path)
    (tmp_path / "summary.json").unlink()
    with pytest.raises(FileNotFoundError, match="not a complete run folder"):
        load_run(tmp_path)


def make_multirun(root: Path, values: list[int]) -> None:
    """A Hydra multirun folder: one job per value of scheduler.max_num_seqs."""
    for job, value in enumerate(values):
        folder = root / str(job)
        write_hand_run(folder, {"scheduler": {"max_num_seqs": value, "policy": "fcfs"}})
        (folder / ".hydra").mkdir()
        overrides = [f"scheduler.max_num_seqs={value}", "+workload.seed=3"]
        (folder / ".hydra/overrides.yaml").write_text(yaml.safe_dump(overrides))
    (root / "multirun.yaml").write_text("{}")


def test_load_sweep_reads_hydra_overrides_in_job_order(tmp_path):
    make_multirun(tmp_path, [8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192])
    df = load_sweep(tmp_path)
    assert df["run"].tolist()[:3] == ["0", "1", "2"] and df["run"].iloc[-1] == "10"
    assert df["scheduler.max_num_seqs"].tolist()[:3] == [8, 16, 32]
    assert df.attrs["params"] == ["scheduler.max_num_seqs"]  # +workload.seed=3 is the same in every job
    assert load_sweep(tmp_path / "3").attrs["params"] == ["scheduler.max_num_seqs", "workload.seed"]
    assert (df["num_finished"] == 2).all() and "config" not in df


def test_load_sweep_without_hydra_uses_the_config_keys_that_differ(tmp_path):
    for i, policy in enumerate(["fcfs", "priority"]):
        write_hand_run(tmp_path / f"run_{i}", {"scheduler": {"queue_policy": policy, "max_num_seqs": 64}})
    df = load_sweep(tmp_path)
    assert df.attrs["params"] == ["scheduler.queue_policy"]
    assert df["scheduler.queue_policy"].tolist() == ["fcfs", "priority"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no complete run folders"):
        load_sweep(tmp_path / "empty")


def test_run_report_files_and_content(tmp_path):
    write_hand_run(tmp_path, {"workload": {"name": "synthetic", "num_requests": 4}})
    md = write_report(tmp_path)
    assert md == tmp_path / "report.md"
    for name in ("report.md", "report.html", "latency_cdf.png", "timeline.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    text = md.read_text()
    assert "| p99_ttft_ms | 992 |" in text and "![Latency CDFs](latency_cdf.png)" in text
    assert "num_requests: 4" in text  # the resolved config
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "<td>p99_ttft_ms</td>" in page
    assert not list(tmp_path.glob(".*.tmp"))


def test_report_of_a_long_run_is_fast(tmp_path):
    n = 100_000
    rng = np.random.default_rng(0)
    requests, _ = hand_tables()
    steps = pd.DataFrame({
        "step": np.arange(n), "start_s": np.arange(n) * 0.02, "duration_s": 0.02,
        "num_prefill_tokens": rng.integers(0, 8192, n), "num_decode_tokens": rng.integers(0, 256, n),
        "num_running": rng.integers(0, 256, n), "num_waiting": rng.integers(0, 50, n),
        "kv_usage": rng.random(n),
        "num_preempted": 0, "prefix_hit_tokens": 0,
    })
    write_run(tmp_path, requests, steps, summarize(requests, steps))
    start = time.perf_counter()
    write_report(tmp_path)
    assert time.perf_counter() - start < 10


def test_report_with_no_finished_requests(tmp_path):
    requests, steps = hand_tables()
    requests = requests[requests.finish_reason == "rejected"]
    write_run(tmp_path, requests, steps.iloc[:0], summarize(requests, steps.iloc[:0]))
    assert "| mean_ttft_ms | n/a |" in write_report(tmp_path).read_text()


def test_sweep_report_and_cli(tmp_path, capsys):
    make_multirun(tmp_path / "sweep", [64, 128])
    md = write_sweep_report(tmp_path / "sweep")
    assert (tmp_path / "sweep/sweep.png").stat().st_size > 0
    lines = md.read_text().splitlines()
    assert lines[4].startswith("| run | scheduler.max_num_seqs | request_throughput |")
    assert lines[7].startswith("| 1 | 128 | 0.5 |")
    report_main([str(tmp_path / "sweep"), str(tmp_path / "sweep/0")])
    assert capsys.readouterr().out.split() == [str(md), str(tmp_path / "sweep/0/report.md")]
    with pytest.raises(SystemExit, match="workbench-report: error: .*no such folder"):
        report_main([str(tmp_path / "nope")])


@pytest.mark.parametrize("given_run", [False, True])
def test_quickstart_notebook_executes(tmp_path, given_run):
    # TMPDIR: the demo run folder lands in pytest's tmp_path
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TMPDIR": str(tmp_path)}
    env.pop("RUN_DIR", None)
    if given_run:
        write_hand_run(tmp_path / "run")
        env["RUN_DIR"] = str(tmp_path / "run")
    nb = nbformat.read(REPO_ROOT / "notebooks/quickstart.ipynb", as_version=4)
    client = NotebookClient(nb, timeout=120, resources={"metadata": {"path": str(REPO_ROOT / "notebooks")}})
    client.execute(env=env)
    printed = nb.cells[1].outputs[0]["text"].strip()
    assert (printed == str(tmp_path / "run")) == given_run
    assert "p99_ttft_ms" in nb.cells[3].outputs[0]["data"]["text/plain"]  # the metrics table


def test_load_says_whether_the_queue_kept_growing():
    n = 200  # one arrival a second; the deployment starts one request every 2 s: half are left waiting
    arrival = np.arange(n, dtype=float)
    requests = pd.DataFrame({
        "request_id": [str(i) for i in range(n)], "arrival_s": arrival, "first_scheduled_s": 2 * arrival,
        "first_token_s": 2 * arrival + 0.1, "finish_s": 2 * arrival + 1, "prompt_tokens": 10,
        "output_tokens": 2, "cached_tokens": 0, "num_preemptions": 0, "finish_reason": "length",
    })
    s = summarize(requests)
    assert s["overloaded"] and s["arrival_rate"] == pytest.approx(1.0)
    assert s["queue_at_last_arrival"] == 100 and s["request_throughput"] == pytest.approx(0.5, rel=0.01)
    keeping_up = summarize(requests.assign(first_scheduled_s=arrival, first_token_s=arrival + 0.1,
                                           finish_s=arrival + 1))
    assert not keeping_up["overloaded"] and keeping_up["queue_at_last_arrival"] == 0


def test_vllm_result_has_vllm_bench_serve_names():
    from servebench.workbench.vllm_compat import vllm_result

    requests, steps = hand_tables()
    summary = summarize(requests, steps, itl_s=[0.1, 0.3], slo={"ttft_ms": 500})
    out = vllm_result(summary | {"config": {"model": {"name": "m"}}}, requests, [0.1, 0.3])
    assert out["completed"] == 2 and out["failed"] == 2 and out["duration"] == 4.0
    assert out["total_input_tokens"] == 300 and out["total_output_tokens"] == 12
    assert out["request_goodput"] == 0.25 and out["model_id"] == "m"
    assert out["std_itl_ms"] == pytest.approx(100.0) and out["p99_ttft_ms"] == pytest.approx(992.0)
    assert out["max_concurrent_requests"] == 2  # a (0-1.2 s) and b (1-2 s)
    assert out["errors"] == ["", "", "finish_reason=rejected", "finish_reason=abort"]


@pytest.mark.parametrize(("ms", "unit"), [(950.0, "ms"), (9_999.0, "ms"), (52_000.0, "s"),
                                         (3_314_647.9, "min")])
def test_latency_units_fit_the_values(ms, unit):
    from servebench.workbench.figures import time_unit

    assert time_unit(ms)[1] == unit


def test_figure_titles_name_what_was_run():
    from servebench.workbench.report import run_title

    config = {"model": {"name": "llama2_70b"}, "hardware": {"name": "a100_80g"},
              "parallel": {"tensor_parallel_size": 4}, "workload": {"name": "azure_conv", "request_rate": 8},
              "backend": {"name": "sim"}}
    title = run_title(config, {"num_requests": 4000, "step_time_model": "vidur"})
    assert title == "llama2_70b on 4 x a100_80g (TP 4); azure_conv (4,000 requests, 8 req/s); sim (vidur)"
    assert "varied req/s" in run_title(config, varied=("workload.request_rate",))
