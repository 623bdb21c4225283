"""The calibrated step-time model: fitting recovers known terms from synthetic steps, and the simulator's
engine loop places the host terms as the engine does (async scheduling hides them behind the device)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from servebench.engine.core.graphs import GraphSizes
from servebench.sim.calibrate import (
    FIRST_STEPS,
    fit,
    host_ratios,
    predicted_device,
    step_errors,
    with_shape_columns,
)
from servebench.sim.calibrated import CALIBRATION_FILE, Calibration, DeviceTerms, HostTerms, interpolate
from servebench.workbench.experiment import run_experiment

REPO = Path(__file__).resolve().parents[1]
TRUTH = Calibration(
    DeviceTerms(graph_batches=[1, 2, 4, 8, 16], graph_s=[4e-3, 4.1e-3, 4.3e-3, 4.6e-3, 5.2e-3],
                graph_kv_s=2e-8, graph_tail_s=1e-7, knots=[1, 128, 512, 2048],
                linear_s=[5e-3, 8e-3, 15e-3, 45e-3], attention_s=4e-11, prefill_kv_s=1e-7, chunk_s=5e-5,
                eager_kv_s=3e-8, seq_s=2e-5, swap_s=3e-4),
    HostTerms(pre_s=3e-4, pre_seq_s=1e-5, pre_token_s=1e-7, post_s=2e-4, post_seq_s=5e-6,
              launch_graph_s=2.5e-4, launch_eager_s=1.5e-4))


def synthetic_steps(cal: Calibration, n: int, seed: int, mixed_graphs: bool = False) -> pd.DataFrame:
    """Engine steps priced exactly by `cal`: decode batches in CUDA graphs and mixed steps, eager or
    (`mixed_graphs`, cudagraph_mode FULL) in the mixed graph of their padded token count (which holds
    min(tokens, max_num_seqs) sequences), a tenth of them
    swapping blocks in or out. Every fourth step is an async one queued behind the step before (its
    device window holds no launch); the others are sync."""
    rng = np.random.default_rng(seed)
    sizes = GraphSizes.of(16, 2048, mixed_graphs)
    rows = []
    for i in range(n):
        graph = i % 2 == 0
        b = int(rng.integers(1, 17)) if graph else int(rng.integers(0, 12))
        chunks = [] if graph else [(int(rng.integers(1, 700)), int(rng.integers(0, 2000)))
                                   for _ in range(int(rng.integers(1, 4)))]
        contexts = rng.integers(16, 3000, size=b)
        rows.append({"step": FIRST_STEPS + i, "num_prefill_tokens": sum(m for m, _ in chunks),
                     "num_decode_tokens": b, "num_prefill_chunks": len(chunks),
                     "prefill_attention": sum(m * (c + m / 2) for m, c in chunks),
                     "prefill_context_sum": sum(c for _, c in chunks),
                     "decode_context_sum": int(contexts.sum()),
                     "decode_context_max": int(contexts.max(initial=0)),
                     **dict(zip(("graph_batch", "graph_tokens"),
                                sizes.padded(len(chunks) + b, sum(m for m, _ in chunks) + b))),
                     "swap_in_blocks": int(rng.integers(1, 9)) if i % 20 == 1 else 0,
                     "swap_out_blocks": int(rng.integers(1, 9)) if i % 20 == 2 else 0,
                     "num_running": 1, "num_waiting": 0})
    h = cal.host
    # Runs of several max_num_seqs: a mixed graph's sequences (min(T, max_num_seqs)) then tell seq_s from
    # linear(T), which one max_num_seqs would not.
    steps = pd.DataFrame(rows).assign(run="synthetic", profile=0.0, async_=[i % 4 == 3 for i in range(n)],
                                      max_seqs=rng.choice([8, 16, 64], size=n))
    seqs = steps["num_prefill_chunks"] + steps["num_decode_tokens"]
    steps["host_gap_s"] = (h.post_s + h.post_seq_s * seqs).shift(1).where(~steps["async_"], -1e-3)
    steps = with_shape_columns(steps)
    steps["device_s"] = predicted_device(cal, steps)
    steps["duration_s"] = steps["device_s"] + h.pre_s + h.pre_seq_s * steps["seqs"] + h.pre_token_s * steps[
        "tokens"]
    return steps


def test_fit_recovers_known_terms_from_synthetic_steps():
    cal = fit(synthetic_steps(TRUTH, 3000, seed=0), None, 0.0)
    d, t = cal.device, TRUTH.device
    scalars = ("graph_kv_s", "graph_tail_s", "attention_s", "prefill_kv_s", "chunk_s", "eager_kv_s", "seq_s")
    for name in (*scalars, "swap_s"):
        assert getattr(d, name) == pytest.approx(getattr(t, name), rel=1e-3), name
    assert d.graph_batches == t.graph_batches
    assert d.graph_s == pytest.approx(t.graph_s, rel=1e-4)
    for tokens in (8, 100, 128, 300, 512, 1500, 2000):  # within the tokens the steps had
        assert interpolate(d.knots, d.linear_s, tokens) == pytest.approx(
            interpolate(t.knots, t.linear_s, tokens), rel=1e-4), tokens
    for name in ("pre_s", "pre_seq_s", "pre_token_s", "post_s", "post_seq_s", "launch_graph_s",
                 "launch_eager_s"):
        assert getattr(cal.host, name) == pytest.approx(getattr(TRUTH.host, name), rel=1e-3), name
    held = step_errors(cal, synthetic_steps(TRUTH, 600, seed=1))  # fresh steps: exact
    assert set(held) == {"decode", "prefill", "mixed"} and all(e["p90"] < 1e-6 for e in held.values())


def test_fit_prices_mixed_graph_steps_by_their_padded_tokens():
    """With cudagraph_mode FULL a step that prefills runs every row of its graph through the matmuls: the
    fit reads linear(T) at the padded token counts, and predicts fresh steps exactly."""
    steps = synthetic_steps(TRUTH, 3000, seed=4, mixed_graphs=True)
    padded = steps[steps["graph_tokens"] > 0]
    assert len(padded) > 1000 and (padded["graph_tokens"] > padded["tokens"]).mean() > 0.9
    cal = fit(steps, None, 0.0)
    for tokens in (128, 256, 512, 1024, 2048):  # graph sizes the steps padded to
        assert interpolate(cal.device.knots, cal.device.linear_s, tokens) == pytest.approx(
            interpolate(TRUTH.device.knots, TRUTH.device.linear_s, tokens), rel=1e-4), tokens
    held = step_errors(cal, synthetic_steps(TRUTH, 600, seed=5, mixed_graphs=True))
    assert all(e["p90"] < 1e-6 for e in held.values())


def test_fit_takes_the_swap_cost_from_async_steps_device_time():
    steps = synthetic_steps(TRUTH, 2000, seed=3).assign(async_=True)  # no sync step to read it from
    assert fit(steps, None, 0.0).device.swap_s == pytest.approx(TRUTH.device.swap_s, rel=1e-3)


def test_host_ratios_show_a_run_whose_host_ran_at_another_speed():
    steady = synthetic_steps(TRUTH, 800, seed=6)
    slow = synthetic_steps(TRUTH, 800, seed=7).assign(run="slow")
    slow["duration_s"] += slow["duration_s"] - slow["device_s"]  # the host's work before each step: 2x
    ratios = host_ratios(fit(steady, None, 0.0), pd.concat([steady, slow], ignore_index=True))
    assert ratios["synthetic"] == pytest.approx(1.0, rel=1e-3)
    assert ratios["slow"] == pytest.approx(2.0, rel=1e-3)


def test_fit_drops_stalled_steps():
    steps = synthetic_steps(TRUTH, 2000, seed=2)
    stalled = steps.index[::50]
    steps.loc[stalled, "device_s"] += 0.05  # a GC pause or allocator stall in 2 % of the steps
    cal = fit(steps, None, 0.0)
    assert cal.device.seq_s == pytest.approx(TRUTH.device.seq_s, rel=1e-2)
    assert cal.device.graph_kv_s == pytest.approx(TRUTH.device.graph_kv_s, rel=1e-2)


def sim_run(tmp_path: Path, host: HostTerms, async_scheduling: bool, cudagraph_mode: str = "FULL_DECODE_ONLY",
            max_num_seqs: int | None = None, device_time_scale: float = 1.0) -> dict:
    root = tmp_path / "profiles"
    folder = root / "h200" / "tiny_llama"
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"source_digest": "test", "mixed_graphs": cudagraph_mode == "FULL"}
    Calibration(TRUTH.device, host, meta).save(folder / CALIBRATION_FILE)
    cfg = yaml.safe_load((REPO / "conf" / "config.yaml").read_text())
    cfg = {k: v for k, v in cfg.items() if k not in ("defaults", "hydra")}
    for group, option in (("model", "tiny_llama"), ("hardware", "h200"), ("scheduler", "default"),
                          ("cache", "default"), ("workload", "synthetic")):
        cfg[group] = yaml.safe_load((REPO / "conf" / group / f"{option}.yaml").read_text())
    cfg["workload"] |= {"num_requests": 40, "request_rate": 50.0, "input_len": 64, "output_len": 32}
    if max_num_seqs:
        cfg["scheduler"]["max_num_seqs"] = max_num_seqs
    cfg["backend"] = {"name": "sim", "step_time": "calibrated", "profile_root": str(root),
                      "async_scheduling": async_scheduling, "enforce_eager": False,
                      "cudagraph_mode": cudagraph_mode, "device_time_scale": device_time_scale}
    cfg |= {"report": False, "progress": False}
    return run_experiment(cfg, tmp_path / f"run_{async_scheduling}_{host.pre_s}_{device_time_scale}")


def test_async_scheduling_hides_host_work_behind_the_device(tmp_path):
    slow_host = HostTerms(pre_s=3e-3, pre_seq_s=0.0, pre_token_s=0.0, post_s=2e-3, post_seq_s=0.0)
    sync, overlapped = (sim_run(tmp_path, slow_host, a) for a in (False, True))
    no_host = sim_run(tmp_path, HostTerms(0.0, 0.0, 0.0, 0.0, 0.0), False)
    # sync: every step pays pre + device + post; async: about max(device, pre + post) (device ~4-5 ms)
    assert sync["median_tpot_ms"] > no_host["median_tpot_ms"] + 4.9
    assert overlapped["median_tpot_ms"] < no_host["median_tpot_ms"] + 1.0
    assert overlapped["step_time_stale"] and "measured engine code test" in overlapped["step_time_stale"]
    steps = pd.read_parquet(tmp_path / "run_True_0.003_1.0" / "steps.parquet")
    assert (steps["host_gap_s"].dropna() < 0).mean() > 0.5  # scheduled while the previous step ran


def test_an_idle_device_waits_for_the_launch_a_queued_step_hides_it(tmp_path):
    """Sync: every step's device window holds the launch (the device is idle when the host launches). Async:
    the launch of step k+1 overlaps step k on the device, so it costs nothing while the device is the
    bottleneck."""
    launch = HostTerms(0.0, 0.0, 0.0, 0.0, 0.0, launch_graph_s=2e-3, launch_eager_s=2e-3)
    none = HostTerms(0.0, 0.0, 0.0, 0.0, 0.0)
    sync, sync_none = sim_run(tmp_path / "s", launch, False), sim_run(tmp_path / "s0", none, False)
    queued, queued_none = sim_run(tmp_path / "a", launch, True), sim_run(tmp_path / "a0", none, True)
    # +2 ms a step, and a little more: slower steps gather larger batches
    assert 1.9 < sync["median_tpot_ms"] - sync_none["median_tpot_ms"] < 2.5
    assert queued["median_tpot_ms"] == pytest.approx(queued_none["median_tpot_ms"], rel=0.05)
    steps = pd.read_parquet(tmp_path / "s" / "run_False_0.0_1.0" / "steps.parquet")
    decode = steps[steps["num_prefill_tokens"] == 0]
    assert (decode["device_s"] > 2e-3 + 4e-3).all()  # the launch, then TRUTH's step (>= 4 ms)
    steps = pd.read_parquet(tmp_path / "a" / "run_True_0.0_1.0" / "steps.parquet")
    decode = steps[steps["num_prefill_tokens"] == 0]
    assert (decode["device_s"] < 6e-3).mean() > 0.95  # queued: TRUTH's step alone, no launch


def test_calibrate_names_the_file_of_an_unusable_run(tmp_path, capsys):
    from servebench.sim.calibrate import main
    from servebench.workbench.runs import write_run

    steps = pd.DataFrame({"step": [0], "duration_s": [0.01]})  # recorded before the step shape columns
    write_run(tmp_path / "old", pd.DataFrame({"request_id": ["a"]}), steps, {"backend": "engine"})
    write_run(tmp_path / "sim", pd.DataFrame({"request_id": ["a"]}), steps, {"backend": "sim"})
    for folder, message in (("old", "steps.parquet: no column 'num_prefill_chunks'"),
                            ("sim", "backend='sim'; calibrate on engine runs")):
        with pytest.raises(SystemExit) as e:
            main([str(tmp_path / folder), "--out", str(tmp_path / "cal")])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_calibration_is_of_one_tensor_parallel_size_and_cudagraph_mode(tmp_path):
    from servebench.sim.calibrate import calibrate
    from servebench.sim.calibrated import CalibratedStepTime

    Calibration(TRUTH.device, TRUTH.host, {"tensor_parallel_size": 2}).save(tmp_path / CALIBRATION_FILE)
    with pytest.raises(ValueError, match="fitted on runs of tensor_parallel_size=2, not 1"):
        CalibratedStepTime(tmp_path)
    assert CalibratedStepTime(tmp_path, 2).calibration.device == TRUTH.device
    with pytest.raises(ValueError, match="fitted on runs of mixed_graphs=False, not True"):
        CalibratedStepTime(tmp_path, 2, mixed_graphs=True)
    runs = {"one": ({"tensor_parallel_size": 1}, {}), "two": ({"tensor_parallel_size": 2}, {}),
            "full": ({}, {"cudagraph_mode": "FULL"})}
    for name, (parallel, backend) in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(
            {"backend": "engine", "config": {"parallel": parallel, "backend": backend}}))
    with pytest.raises(ValueError, match="runs and profile of different tensor_parallel_size"):
        calibrate([tmp_path / "one", tmp_path / "two"], tmp_path / "out", [], None)
    with pytest.raises(ValueError, match="runs and profile of different mixed_graphs"):
        calibrate([tmp_path / "one", tmp_path / "full"], tmp_path / "out", [], None)


def test_calibrate_fits_on_runs_alone_when_the_profile_measured_other_graphs(tmp_path, capsys):
    """A profile taken with decode graphs only beside runs of cudagraph_mode FULL: refused, with the way out
    named; --no-profile fits on the runs alone."""
    from servebench.sim.calibrate import main
    from servebench.workbench.runs import write_run

    run = tmp_path / "run"
    steps = synthetic_steps(TRUTH, 400, seed=6, mixed_graphs=True)
    write_run(run, pd.DataFrame({"request_id": ["a"]}), steps.drop(columns=["run", "async_", "profile"]),
              {"backend": "engine", "device": "cuda:0", "config": {"backend": {"cudagraph_mode": "FULL"}}})
    out = tmp_path / "out"
    out.mkdir()
    (out / "steps.csv").write_text("kind,tokens,batch,context,max_context,chunk,chunk_context,median_s\n")
    (out / "meta.json").write_text(json.dumps({"engine": {"cuda_graphs": True}}))
    with pytest.raises(SystemExit):
        main([str(run), "--out", str(out)])
    assert "mixed_graphs" in (err := capsys.readouterr().err) and "--no-profile" in err
    main([str(run), "--out", str(out), "--no-profile"])
    cal = json.loads((out / CALIBRATION_FILE).read_text())
    assert cal["meta"]["mixed_graphs"] is True and cal["meta"]["profile"] is None


def test_the_simulator_pads_steps_to_the_engines_graphs(tmp_path):
    """A decode-only step records its decode graph's batch; a step that prefills, with cudagraph_mode FULL,
    its mixed graph's token count (eager beyond 2048 tokens, and always with FULL_DECODE_ONLY)."""
    sizes = GraphSizes.of(256, 8192, mixed=True)
    assert sizes.padded(9, 9) == (16, 0) and sizes.padded(3, 300) == (0, 384)
    assert sizes.padded(1, 3000) == (0, 0)
    assert sizes.padded(300, 300) == (0, 384)  # a decode batch beyond every decode graph: a mixed graph
    assert GraphSizes.of(256, 8192, mixed=False).padded(3, 300) == (0, 0)
    for mode in ("FULL", "FULL_DECODE_ONLY"):
        cfg_dir = tmp_path / mode
        sim_run(cfg_dir, HostTerms(0.0, 0.0, 0.0, 0.0, 0.0), False, mode)
        steps = pd.read_parquet(next(cfg_dir.glob("run_*")) / "steps.parquet")
        prefills = steps[steps["num_prefill_tokens"] > 0]
        tokens = prefills["num_prefill_tokens"] + prefills["num_decode_tokens"]
        if mode == "FULL":
            assert (prefills["graph_tokens"] >= tokens).all() and (prefills["graph_tokens"] > 0).all()
        else:
            assert (prefills["graph_tokens"] == 0).all()


def test_the_simulator_prices_a_step_as_the_fit_does(tmp_path):
    """The same terms, the same step: the simulator's price of each step it ran equals the fit's formula on
    that step's row of steps.parquet, a mixed graph's sequences (min(its tokens, max_num_seqs)) included."""
    sim_run(tmp_path, HostTerms(0.0, 0.0, 0.0, 0.0, 0.0), False, "FULL", max_num_seqs=8)
    steps = pd.read_parquet(next(tmp_path.glob("run_*")) / "steps.parquet")
    rows = with_shape_columns(steps.assign(run="sim", async_=False, profile=0.0, max_seqs=8))
    mixed = rows[rows["graph_tokens"] > 0]
    assert len(mixed) and (mixed["graph_seqs"] < mixed["graph_tokens"]).any()  # the graph caps sequences
    assert predicted_device(Calibration(TRUTH.device, HostTerms(0.0, 0.0, 0.0, 0.0, 0.0)), rows) == (
        pytest.approx(rows["device_s"].to_numpy(), rel=1e-9))


def test_device_time_scale_is_a_card_that_much_faster(tmp_path):
    """backend.device_time_scale multiplies every step's device time (what-if: a faster card; fidelity.py's
    sensitivity): with no host time, the same first step takes half as long, and a token about half (the
    faster steps meet the same arrivals in smaller batches)."""
    none = HostTerms(0.0, 0.0, 0.0, 0.0, 0.0)
    runs = {scale: sim_run(tmp_path, none, False, device_time_scale=scale) for scale in (1.0, 0.5)}
    first = {scale: pd.read_parquet(tmp_path / f"run_False_0.0_{scale}" / "steps.parquet")["device_s"][0]
             for scale in runs}
    assert first[0.5] == pytest.approx(first[1.0] / 2, rel=1e-9)
    assert 0.35 < runs[0.5]["median_tpot_ms"] / runs[1.0]["median_tpot_ms"] < 0.6
