"""Which step-time model a `backend.step_time` kind names. The one module that knows every model, so that
each model's own module imports only the model it builds on (roofline <- vidur, profile) and none of them
imports another's dependants."""

from __future__ import annotations

from pathlib import Path

from servebench.sim.calibrated import CalibratedStepTime
from servebench.sim.profile_step_time import DEFAULT_PROFILE_ROOT as ENGINE_PROFILES
from servebench.sim.profile_step_time import ProfileStepTime, profile_dir
from servebench.sim.simulator import StepTimeModel
from servebench.sim.specs import HardwareSpec, ModelSpec, ParallelSpec
from servebench.sim.step_time import DEFAULT_PROFILE_ROOT as VIDUR_PROFILES
from servebench.sim.step_time import RooflineStepTime, VidurProfileStepTime


def make_step_time_model(
    kind: str,
    model: ModelSpec,
    hw: HardwareSpec,
    parallel: ParallelSpec,
    block_size: int,
    profile_root: Path | str = VIDUR_PROFILES,
    engine_profile_root: Path | str | None = None,
    mixed_graphs: bool = False,
    max_num_seqs: int = 256,
) -> StepTimeModel:
    """`kind`: 'roofline' (any model/device), 'vidur' (needs Vidur's profiles for the model, device and tp),
    'profile' (the engine's own: `engine_profile_root`/<hardware>/<model>[_tp<N>], default data/profiles) or
    'calibrated' (sim.calibrated: the calibration.json workbench-calibrate wrote in that folder, on runs
    whose steps that prefill did (`mixed_graphs`, cudagraph_mode FULL) or did not replay CUDA graphs; a mixed
    graph holds min(its tokens, `max_num_seqs`) sequences)."""
    if kind == "roofline":
        return RooflineStepTime(model, hw, parallel, block_size)
    if kind == "vidur":
        return VidurProfileStepTime(model, hw, parallel, block_size, profile_root)
    if kind == "profile":
        return ProfileStepTime(model, hw, parallel, block_size, engine_profile_root or ENGINE_PROFILES)
    if kind == "calibrated":
        return CalibratedStepTime(profile_dir(model, hw, parallel, engine_profile_root or ENGINE_PROFILES),
                                  parallel.tensor_parallel_size, mixed_graphs, max_num_seqs)
    raise ValueError(f"unknown step-time model {kind!r}: choose roofline, vidur, profile or calibrated")
