"""The config's schema: one dataclass per config group, so a wrong type or an unknown key is a one-line
error naming the key, and `true`/`no`/`1` arrive as real booleans.

Groups built into an engine or simulator object are checked against that object's own dataclass (one
definition of each knob); the harness's own groups (backend, workload, slo) are defined here. Only the
keys present are checked and kept: a missing key keeps the default of the code that reads it. Values
(a policy name, a router) are checked where they are used, by the dataclass's `__post_init__`. Top-level
keys other than SECTIONS (a script's label, an experiment's lookup table) pass through: on the command
line Hydra refuses a key the config does not have, and the CLI one that `+` adds outside SECTIONS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from servebench.engine.core.config import CacheConfig, SchedulerConfig
from servebench.sim.cluster import Deployment
from servebench.sim.lora import LoRA
from servebench.sim.multimodal import Multimodal
from servebench.sim.quantization import Quantization
from servebench.sim.specs import HardwareSpec, ModelSpec, ParallelSpec


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


@dataclass(slots=True)
class SchedulerGroup(SchedulerConfig):
    max_num_batched_tokens: int | None = None  # null: vLLM's default for the chunking mode
    max_model_len: int | None = None  # null: the model's context length


@dataclass(slots=True)
class CacheGroup(CacheConfig):
    kv_cache_dtype: str = "auto"  # bytes per block: the simulator's memory, the engine's cache dtype


@dataclass(slots=True)
class Backend:
    """Every backend's keys: an experiment that sweeps `backend: sim,engine` sets engine keys the
    simulator ignores (it reads enforce_eager, cudagraph_mode and async_scheduling: the loop and graph padding
    it models)."""
    name: str = "sim"
    # sim
    step_time: str = "auto"
    profile_root: str | None = None
    device_time_scale: float = 1.0
    # engine and sim
    enforce_eager: bool = False
    async_scheduling: bool = False
    cudagraph_mode: str = "FULL"  # vLLM's compilation_config.cudagraph_mode (or FULL_DECODE_ONLY)
    # engine
    model_path: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    warmup: bool = True
    # server
    url: str = "http://127.0.0.1:8000"
    model: str | None = None
    api: str = "completions"
    max_concurrency: int | None = None
    api_key: str | None = None


@dataclass(slots=True)
class Slo:
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None


@dataclass(slots=True)
class TraceWorkload:
    """Keys every workload has; traces (azure_*, splitwise, mooncake) have only these."""
    name: str = ""
    path: str | None = None
    num_requests: int | None = None
    duration_s: float | None = None
    time_scale: float = 1.0
    request_rate: float | None = None
    seed: int = 0


@dataclass(slots=True)
class ShareGPTWorkload(TraceWorkload):
    output_len: Any = None  # an int or {dist: ..., ...}: checked by the loader
    cv: float = 1.0


@dataclass(slots=True)
class MTBenchWorkload(TraceWorkload):
    answers_path: str | None = None
    answer_len: int = 256
    cv: float = 1.0


@dataclass(slots=True)
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


@dataclass(slots=True)
class TopLevel:
    report: bool = True
    progress: bool = True
    study: Any = None  # checked by workbench.study
    search: Any = None  # checked by workbench.cli.objective


SECTIONS = ("backend", "workload", *GROUPS, *TopLevel.__dataclass_fields__)  # the top-level keys read


def validate(cfg: dict[str, Any]) -> dict[str, Any]:
    """`cfg` with every group's present keys checked and converted to their types; ConfigError otherwise."""
    out = dict(cfg)
    for group, values in cfg.items():
        if group in TopLevel.__dataclass_fields__:  # other top-level keys: a script's or experiment's own
            out |= _check("", TopLevel, {group: values})
        elif (group in GROUPS or group in ("backend", "workload")) and values is not None:
            if not isinstance(values, dict):
                raise ConfigError(f"{group}: expected a mapping of keys, got {values!r:.60}")
            out[group] = _check(group, _schema(group, values), values)
    return out


def _schema(group: str, values: dict[str, Any]) -> type:
    name = values.get("name")
    if group == "backend" and name not in BACKENDS:
        raise ConfigError(f"backend.name={name!r}: choose one of {', '.join(BACKENDS)}")
    if group == "backend":
        return Backend
    return WORKLOADS.get(name, TraceWorkload) if group == "workload" else GROUPS[group]


def _check(group: str, schema: type, values: dict[str, Any]) -> dict[str, Any]:
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), values)
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(f"{group}." if group else "", schema, values, e)) from None
    typed = OmegaConf.to_container(merged, resolve=True)
    return {k: typed[k] for k in values}


def _one_line(prefix: str, schema: type, values: dict[str, Any], e: OmegaConfBaseException) -> str:
    known = list(schema.__dataclass_fields__)
    unknown = [k for k in values if k not in known]
    if unknown:
        return f"{prefix}{unknown[0]} is not a known key (known: {', '.join(known)})"
    key = str(getattr(e, "full_key", "") or "")
    top = key.split(".")[0]
    if top not in values:  # no key to name: OmegaConf's own words, on one line
        return f"{prefix.rstrip('.') or 'config'}: {' '.join(str(e).split())}"
    return f"{prefix}{key}={values[top]!r}: expected {_type_name(schema.__dataclass_fields__[top].type)}"


TYPE_NAMES = (("bool", "a boolean (true or false)"), ("int", "an integer"), ("float", "a number"),
              ("str", "a string"), ("dict", "a mapping"), ("list", "a list"))


def _type_name(annotation: Any) -> str:
    """`int | None` -> 'an integer or null'."""
    base, *rest = str(annotation).split(" | ")
    words = next((w for name, w in TYPE_NAMES if base.startswith(name)), base)
    return words + (" or null" if "None" in rest else "")
