"""The config's schema: one dataclass per config group, so a wrong type or an unknown key is a one-line
error naming the key, and `true`/`no`/`1` arrive as real booleans.

Groups built into an engine or simulator object are checked against that object's own dataclass (one
definition of each knob); the harness's own groups (backend, workload, slo) are defined here. Only the
keys present are checked and kept: a missing key keeps the default of the code that reads it. Values
(a policy name, a router) are checked where they are used, by the dataclass's `__post_init__`. Top-level
keys other than TopLevel's (a script's label, an experiment's lookup table) pass through: on the command
line Hydra already refuses a key the config does not have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from servebench.engine.core.config import CacheConfig, SchedulerConfig
from servebench.sim.cluster import Deployment
from servebench.sim.lora import LoRA
from servebench.sim.multimodal import Multimodal
from servebench.sim.quantization import Quantization
from servebench.sim.specs import HardwareSpec, ModelSpec, ParallelSpec

# OmegaConf reads the annotations at runtime: Optional[...] rather than `X | None` in this module.
# ruff: noqa: UP007, UP045


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


@dataclass
class SchedulerGroup(SchedulerConfig):
    max_num_batched_tokens: Optional[int] = None  # null: vLLM's default for the chunking mode
    max_model_len: Optional[int] = None  # null: the model's context length


@dataclass
class CacheGroup(CacheConfig):
    kv_cache_dtype: str = "auto"  # read by the simulator only (bytes per block)


@dataclass
class Backend:
    """Every backend's keys: an experiment that sweeps `backend: sim,engine` sets engine keys the
    simulator ignores."""
    name: str = "sim"
    # sim
    step_time: str = "auto"
    profile_root: Optional[str] = None
    # engine
    model_path: Optional[str] = None
    dtype: str = "auto"
    enforce_eager: bool = False
    async_scheduling: bool = False
    device: str = "auto"
    seed: int = 0
    warmup: bool = True
    # server
    url: str = "http://127.0.0.1:8000"
    model: Optional[str] = None
    api: str = "completions"
    max_concurrency: Optional[int] = None
    api_key: Optional[str] = None


@dataclass
class Slo:
    ttft_ms: Optional[float] = None
    tpot_ms: Optional[float] = None
    e2el_ms: Optional[float] = None


@dataclass
class TraceWorkload:
    """Keys every workload has; traces (azure_*, splitwise, mooncake) have only these."""
    name: str = ""
    path: Optional[str] = None
    num_requests: Optional[int] = None
    duration_s: Optional[float] = None
    time_scale: float = 1.0
    request_rate: Optional[float] = None
    seed: int = 0


@dataclass
class ShareGPTWorkload(TraceWorkload):
    output_len: Any = None  # an int or {dist: ..., ...}: checked by the loader
    cv: float = 1.0


@dataclass
class MTBenchWorkload(TraceWorkload):
    answers_path: Optional[str] = None
    answer_len: int = 256
    cv: float = 1.0


@dataclass
class SyntheticWorkload(ShareGPTWorkload):
    input_len: Any = None


WORKLOADS: dict[str, type] = {
    "sharegpt": ShareGPTWorkload, "mt_bench": MTBenchWorkload, "synthetic": SyntheticWorkload,
}
BACKENDS = ("sim", "engine", "server")
GROUPS: dict[str, type] = {
    "model": ModelSpec, "hardware": HardwareSpec, "parallel": ParallelSpec, "scheduler": SchedulerGroup,
    "cache": CacheGroup, "slo": Slo, "deployment": Deployment, "quantization": Quantization, "lora": LoRA,
    "multimodal": Multimodal,
}


@dataclass
class TopLevel:
    report: bool = True
    progress: bool = True
    study: Any = None  # checked by workbench.study
    search: Any = None  # checked by workbench.cli.objective


def validate(cfg: dict[str, Any]) -> dict[str, Any]:
    """`cfg` with every group's present keys checked and converted to their types; ConfigError otherwise."""
    out = dict(cfg)
    for group, values in cfg.items():
        if group in ("backend", "workload"):
            out[group] = _check(group, _schema_by_name(group, values), values)
        elif group in GROUPS and values is not None:
            out[group] = _check(group, GROUPS[group], values)
        elif group in TopLevel.__dataclass_fields__:  # other top-level keys: a script's or experiment's own
            out |= _check("", TopLevel, {group: values})
    return out


def _schema_by_name(group: str, values: Any) -> type:
    if not isinstance(values, dict):
        raise ConfigError(f"{group}: expected a mapping of keys, got {values!r:.60}")
    name = values.get("name")
    if group == "backend":
        if name not in BACKENDS:
            raise ConfigError(f"backend.name={name!r}: choose one of {', '.join(BACKENDS)}")
        return Backend
    return WORKLOADS.get(name, TraceWorkload)


def _check(group: str, schema: type, values: Any) -> Any:
    prefix = f"{group}." if group else ""
    if not isinstance(values, dict):
        raise ConfigError(f"{group}: expected a mapping of keys, got {values!r:.60}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), values)
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(prefix, schema, values, e)) from None
    typed = OmegaConf.to_container(merged, resolve=True)
    return {k: typed[k] for k in values}


def _one_line(prefix: str, schema: type, values: dict[str, Any], e: OmegaConfBaseException) -> str:
    key = str(getattr(e, "full_key", "") or "")
    top = key.split(".")[0]
    known = list(schema.__dataclass_fields__)
    if top not in values or top not in known:
        unknown = top if top in values else sorted(set(values) - set(known))[0]
        return f"{prefix}{unknown} is not a known key (known: {', '.join(known)})"
    hint = _type_name(schema.__dataclass_fields__[top].type)
    value = values[top]
    return f"{prefix}{key}={value!r}: expected {hint}"


def _type_name(annotation: Any) -> str:
    text = str(annotation)
    for name, words in (("bool", "a boolean (true or false)"), ("int", "an integer"),
                        ("float", "a number"), ("str", "a string")):
        if name in text:
            return words + (" or null" if "Optional" in text or "None" in text else "")
    return text
