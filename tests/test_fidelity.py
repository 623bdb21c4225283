"""On the CPU: the profiler's tables, the profile step-time model, and the fidelity benchmark end to end with
a tiny model (engine runs, workbench-calibrate on them, the comparison); the committed comparison reproduces
from its engine run folders."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from servebench.engine.core.scheduler_output import SchedulerOutput
from servebench.engine.profile import GRIDS, profile
from servebench.sim.calibrate import main as calibrate_main
from servebench.sim.specs import ParallelSpec, hardware_spec, model_spec
from servebench.sim.step_time_models import make_step_time_model

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import fidelity  # noqa: E402


def spec(group: str, name: str) -> dict:
    return yaml.safe_load((REPO / "conf" / group / f"{name}.yaml").read_text())


@pytest.fixture(scope="module")
def profile_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("profiles")
    profile("tiny_llama", root / "h200", GRIDS["tiny"], device="cpu", dtype="float32", swap_space=0.01)
    return root


def tiny_model(root: Path):
    m, h = model_spec(spec("model", "tiny_llama")), hardware_spec(spec("hardware", "h200"))
    return make_step_time_model("profile", m, h, ParallelSpec(), 16, engine_profile_root=root)


def test_profiler_writes_tables_with_versions(profile_root):
    folder = profile_root / "h200" / "tiny_llama"
    meta = json.loads((folder / "meta.json").read_text())
    for key in ("card", "torch", "triton", "date", "hf_config", "engine", "source_digest"):
        assert key in meta, key
    steps = (folder / "steps.csv").read_text()
    for kind in ("linear", "prefill", "decode", "mixed", "swap_out", "swap_in"):
        assert f"\n{kind}," in steps, kind
    assert (folder / "cpu.csv").read_text().startswith("batch,period_s,execute_s,overhead_s")


def test_profile_model_interpolates_inside_and_falls_back_outside(profile_root):
    st = tiny_model(profile_root)
    outs = [SchedulerOutput(num_decode_tokens=b, decode_context_tokens=b * 64) for b in range(1, 5)]
    decode = [st.predict(out) for out in outs]
    assert all(t > 0 for t in decode) and st.num_outside == 0
    prefill = SchedulerOutput(num_prefill_tokens=40, prefill_chunks=[(40, 10)], num_decode_tokens=2,
                              decode_context_tokens=100)
    assert st.predict(prefill) > 0 and st.num_outside == 0
    st.predict(SchedulerOutput(num_decode_tokens=64, decode_context_tokens=64 * 64))  # batch beyond the grid
    st.predict(SchedulerOutput(num_decode_tokens=1, decode_context_tokens=10_000))  # context beyond it
    assert st.num_outside == 2
    assert set(st.fit_error) == {"prefill", "decode", "mixed"}


def test_profile_of_another_shape_is_refused_with_the_file(profile_root, tmp_path):
    folder = tmp_path / "h200" / "tiny_llama"
    shutil.copytree(profile_root / "h200" / "tiny_llama", folder)
    meta = json.loads((folder / "meta.json").read_text())
    meta["hf_config"]["hidden_size"] = 128
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"meta.json: hf_config.hidden_size=128"):
        tiny_model(tmp_path)
    with pytest.raises(ValueError, match="no profile for model tiny_llama"):
        tiny_model(tmp_path / "nowhere")


def test_fidelity_tiny_end_to_end_calibrated_and_reproducible(profile_root, tmp_path):
    runs = tmp_path / "runs"
    fidelity.run_gpu(runs, "tiny_llama", "h200", "cpu", tiny=True, budget_s=120,
                     only=["cal_sharegpt_poisson", "ho_kv_pressure"], roles=list(fidelity.ROLES))
    for run in ("cal_sharegpt_poisson/engine", "ho_kv_pressure/engine", "ho_kv_pressure/engine_rerun"):
        assert (runs / run / "summary.json").is_file(), run
    folder = profile_root / "h200" / "tiny_llama"
    calibrate_main([str(runs / "cal_sharegpt_poisson"), "--out", str(folder),
                    "--heldout", str(runs / "ho_kv_pressure")])
    calibration = json.loads((folder / "calibration.json").read_text())
    assert {"fit_error", "heldout_error", "source_digest"} <= set(calibration["meta"])
    fidelity.compare(runs, tmp_path / "a", profile_root, "calibrated")
    fidelity.compare(runs, tmp_path / "b", profile_root, "calibrated")
    first = json.loads((tmp_path / "a" / "fidelity.json").read_text())
    assert first == json.loads((tmp_path / "b" / "fidelity.json").read_text())
    case = first["cases"]["ho_kv_pressure"]
    assert case["step_time_model"] == "calibrated" and case["role"] == "heldout"
    assert case["metrics"]["num_preemptions"]["engine"] > 0
    assert case["metrics"]["p50_e2el_ms"]["engine_spread"] is not None
    assert set(case["metrics"]) == set(fidelity.METRICS)
    report = (tmp_path / "a" / "fidelity.md").read_text()
    assert "## ho_kv_pressure (heldout)" in report
    assert (tmp_path / "a" / "fidelity" / "cal_sharegpt_poisson_cdf.png").is_file()


def test_kendall_tau():
    assert fidelity.kendall_tau([1, 2, 3], [10, 20, 30]) == 1.0
    assert fidelity.kendall_tau([1, 2, 3], [30, 20, 10]) == -1.0
    assert fidelity.kendall_tau([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(4 / 6)


@pytest.mark.slow
@pytest.mark.skipif(not (fidelity.RUNS.is_dir() and (REPO / "reports" / "fidelity.json").is_file()),
                    reason="no committed comparison")
def test_committed_fidelity_json_reproduces_from_the_engine_runs(tmp_path):
    runs = tmp_path / "runs"
    for summary in fidelity.RUNS.glob("*/engine*/summary.json"):
        shutil.copytree(summary.parent, runs / summary.parent.parent.name / summary.parent.name)
    fidelity.compare(runs, tmp_path)
    expected, got = (json.loads(path.read_text()) for path in (REPO / "reports" / "fidelity.json",
                                                              tmp_path / "fidelity.json"))
    for report in (expected, got):  # the stale line names the checkout's code digest, not a figure
        for case in report["cases"].values():
            case.pop("step_time_stale")
    assert got == expected
