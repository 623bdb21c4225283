"""The harness end to end: the default experiment, the Mooncake prefix-sharing check, bad input."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from servebench.engine.core.recorder import REQUEST_COLUMNS

REPO = Path(__file__).resolve().parents[1]
MOONCAKE = REPO / "data/traces/mooncake_conversation_trace.jsonl"


def workbench(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "workbench", f"hydra.run.dir={run_dir}", "progress=false", *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_default_experiment_writes_a_complete_run_with_report(tmp_path):
    res = workbench(tmp_path)
    assert res.returncode == 0, res.stderr
    for name in ("requests.parquet", "steps.parquet", "summary.json", "report.md", "report.html",
                 "vllm_result.json"):
        assert (tmp_path / name).exists(), name
    # the result on the terminal: vLLM's block, the requests not served and the folder; a sustainable load
    out = res.stdout
    assert "Serving Benchmark Result" in out and "P99 TTFT (ms):" in out
    assert "rejected (prompt over max_model_len=4096 or empty)" in out and "OVERLOADED" not in out
    assert out.rstrip().endswith(f"run folder: {tmp_path}")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["p99_ttft_ms"] < 5000 and not summary["overloaded"]
    vllm = json.loads((tmp_path / "vllm_result.json").read_text())
    assert vllm["completed"] == summary["num_finished"] and vllm["failed"] == summary["num_rejected"]
    assert vllm["duration"] == summary["duration_s"] and vllm["std_ttft_ms"] > 0
    assert summary["config"]["model"]["name"] == "llama2_7b"
    assert summary["config"]["hardware"]["name"] == "a100_80g"
    # the first 20 minutes of the Azure conv trace; prompts over Llama-2's 4096 tokens are rejected
    assert summary["num_requests"] == summary["num_finished"] + summary["num_rejected"]
    assert 5500 < summary["num_requests"] < 7000 and summary["num_rejected"] > 0
    for key in ("p99_ttft_ms", "median_tpot_ms", "mean_itl_ms", "p99_e2el_ms", "output_throughput"):
        assert summary[key] > 0, key
    requests = pd.read_parquet(tmp_path / "requests.parquet")
    assert set(REQUEST_COLUMNS) <= set(requests.columns)
    finished = requests[requests.finish_reason == "length"]
    assert (finished.first_token_s >= finished.arrival_s).all()
    assert (finished.finish_s >= finished.first_token_s).all()


def trace_prefix_reuse(num_requests: int) -> float:
    """The trace's own reuse: prompt tokens whose hash-id prefix an earlier request had (infinite cache)."""
    seen: set[tuple] = set()
    hit = total = 0
    with MOONCAKE.open() as f:
        for _, line in zip(range(num_requests), f):
            row = json.loads(line)
            chain: tuple = ()
            matched = 0
            for i, h in enumerate(row["hash_ids"]):
                chain = (chain, h)
                if chain in seen and matched == i:
                    matched += 1
                seen.add(chain)
            hit += min(matched * 512, row["input_length"] - 1)
            total += row["input_length"]
    return hit / total


@pytest.mark.parametrize("num_requests", [400])
def test_mooncake_prefix_caching_matches_the_traces_own_reuse(tmp_path, num_requests):
    common = (
        "model=llama3_1_8b",
        "hardware=h100_80g",
        "workload=mooncake",
        f"workload.num_requests={num_requests}",
        "report=false",
    )
    # slow arrivals and a cache that holds everything: the simulator must find exactly the trace's reuse
    roomy = ("workload.time_scale=20", "cache.num_gpu_blocks_override=400000")
    runs = {}
    for name, extra in {
        "on": ("cache.enable_prefix_caching=true", *roomy),
        "off": ("cache.enable_prefix_caching=false", *roomy),
        "real_cache": ("cache.enable_prefix_caching=true",),
    }.items():
        res = workbench(tmp_path / name, *common, *extra)
        assert res.returncode == 0, res.stderr
        runs[name] = json.loads((tmp_path / name / "summary.json").read_text())
    reference = trace_prefix_reuse(num_requests)
    assert reference > 0.1
    assert runs["on"]["prefix_cache_hit_rate"] == pytest.approx(reference, rel=0.01)
    assert runs["off"]["prefix_cache_hit_rate"] == 0
    assert runs["off"]["mean_ttft_ms"] > runs["on"]["mean_ttft_ms"]
    # at the trace's real rate, queueing and a finite cache can only lose hits
    assert 0 < runs["real_cache"]["prefix_cache_hit_rate"] <= reference


def test_same_seed_same_result(tmp_path):
    args = ("workload=synthetic", "workload.num_requests=300", "workload.request_rate=20", "report=false")
    for name in ("a", "b"):
        assert workbench(tmp_path / name, *args).returncode == 0
    a = pd.read_parquet(tmp_path / "a/requests.parquet")
    b = pd.read_parquet(tmp_path / "b/requests.parquet")
    pd.testing.assert_frame_equal(a, b)


@pytest.mark.parametrize(
    "override,message",
    [
        # the job refuses these (Hydra's own refusals: test_cli_errors.py)
        ("workload.path=/no/such/trace.csv", "/no/such/trace.csv"),
        ("cache.num_gpu_blocks_override=10", "less than one max_model_len"),
        ("scheduler.preemption_mode=sometimes", "scheduler.preemption_mode"),
        ("scheduler.enable_chunked_prefill=maybe",
         "scheduler.enable_chunked_prefill='maybe': expected a boolean"),
        ("cache.enable_prefix_caching=maybe", "cache.enable_prefix_caching='maybe': expected a boolean"),
        ("model.name=gpt5", "model.name='gpt5' does not rename the model"),
        ("scheduler.max_num_seqs=lots", "scheduler.max_num_seqs='lots': expected an integer"),
        ("progress=sometimes", "progress='sometimes': expected a boolean"),
    ],
)
def test_bad_input_is_one_clear_error_and_no_complete_run(tmp_path, override, message):
    res = workbench(tmp_path, override, "report=false")
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert message in res.stderr
    assert not (tmp_path / "summary.json").exists()


def test_a_rerun_into_a_folder_clears_the_earlier_runs_results(tmp_path):
    args = ("workload=synthetic", "workload.num_requests=20", "report=false")
    assert workbench(tmp_path, *args).returncode == 0
    (tmp_path / "report.md").write_text("an earlier run's report")
    res = workbench(tmp_path, *args, "scheduler.max_num_seqs=oops")  # fails: no result may remain
    assert res.returncode == 2
    assert not [p.name for p in tmp_path.iterdir() if p.name not in (".hydra", "cli.log", "error.txt")]


def test_malformed_trace_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,12,3\n"
        "2023-11-16 18:15:47.0000000,ten,3\n"
    )
    res = workbench(tmp_path / "run", "workload=azure_conv", f"workload.path={bad}", "report=false")
    assert res.returncode == 2
    assert "bad.csv" in res.stderr and "line 3" in res.stderr
    assert not (tmp_path / "run/summary.json").exists()


def test_a_boolean_override_is_a_boolean(tmp_path):
    args = ("workload=synthetic", "workload.num_requests=20", "report=false")
    assert workbench(tmp_path, *args, "scheduler.enable_chunked_prefill=no").returncode == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["scheduler"]["enable_chunked_prefill"] is False
    assert summary["max_num_batched_tokens"] == 4096  # vLLM's default without chunked prefill


def test_rejected_requests_are_counted_and_printed(tmp_path):
    res = workbench(tmp_path, "workload=synthetic", "workload.num_requests=100",
                    "scheduler.max_model_len=512", "report=false")
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 50 < summary["num_rejected"] < 100 and summary["num_truncated"] > 0
    line = next(x for x in res.stdout.splitlines() if x.startswith("not served as asked:"))
    assert f"{summary['num_rejected']} rejected (prompt over max_model_len=512" in line
    assert f"{summary['num_truncated']} cut short" in line


def test_an_overloaded_run_says_so_and_by_how_much(tmp_path):
    res = workbench(tmp_path, "workload=synthetic", "workload.num_requests=400", "workload.request_rate=50",
                    "report=false")
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["overloaded"] and summary["arrival_rate"] > 2 * summary["request_throughput"]
    assert f"requests arrived at {summary['arrival_rate']:.2f}/s and were served at" in res.stdout


def test_ctrl_c_is_one_line_and_leaves_no_complete_run(tmp_path):
    cmd = [sys.executable, "-m", "workbench", f"hydra.run.dir={tmp_path}", "workload=azure_conv",
           "report=false"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / ".hydra").exists() and time.monotonic() < deadline:  # the job has started
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip().splitlines() == [f"workbench: interrupted: {tmp_path} is incomplete (no summary.json)"]
    assert not (tmp_path / "summary.json").exists()


ENGINE = ("backend=engine", "model=tiny_llama", "++backend.dtype=float32", "++backend.warmup=false")


@pytest.mark.parametrize("backend,label", [((), "simulating"), (ENGINE, "engine")], ids=["sim", "engine"])
def test_progress_lines_outside_a_terminal_and_the_same_requests_not_served(tmp_path, backend, label):
    res = subprocess.run(  # a line per request (interval 0) in place of one every few seconds
        [sys.executable, "-c", "import servebench.workbench.terminal as t; t.LINE_EVERY_S = 0; "
         "from servebench.workbench.cli import main; main()", f"hydra.run.dir={tmp_path}", *backend,
         "workload=synthetic", "workload.num_requests=8", "workload.request_rate=null",
         "workload.input_len={dist: uniform, min: 16, max: 130}", "workload.output_len=32",
         "scheduler.max_model_len=100", "report=false"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert f"{label}: 8/8 requests (100%)" in res.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    # the workload's seed draws 4 prompts over 100 tokens and 2 that leave fewer than 32 for the output
    assert (summary["num_rejected"], summary["num_truncated"]) == (4, 2)


@pytest.mark.parametrize("backend", [(), ENGINE], ids=["sim", "engine"])
def test_a_prompt_that_fills_max_model_len_gets_one_token_on_both_backends(tmp_path, backend):
    res = subprocess.run(
        [sys.executable, "-m", "servebench.workbench", f"hydra.run.dir={tmp_path}", *backend,
         "workload=synthetic", "workload.num_requests=3", "workload.request_rate=null",
         "workload.input_len=100", "workload.output_len=8", "scheduler.max_model_len=100", "report=false"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["num_finished"], summary["num_rejected"], summary["num_truncated"]) == (3, 0, 3)
    requests = pd.read_parquet(tmp_path / "requests.parquet")
    assert requests["output_tokens"].tolist() == [1, 1, 1]
