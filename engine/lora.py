"""LoRA adapters as vLLM takes them: `LoRARequest(name, int_id, path)` names a PEFT adapter folder
(adapter_config.json and adapter_model.safetensors), checked against the model when the engine first sees it
and read into host tensors when the scheduler's LoRA slots load it from disk (engine.lora_manager).

PEFT's format: `r`, `lora_alpha` (and `use_rslora`) in adapter_config.json, scaling alpha / r (rsLoRA:
alpha / sqrt(r)); per adapted projection, tensors
`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` [r, in] and `...lora_B.weight` [out, r],
so that the adapted layer computes W + scaling B A. The engine adapts
q/k/v/o and gate/up/down projections (PEFT's `target_modules`, any subset, any layers); anything else in the
folder (biases, DoRA, per-module ranks, embeddings, modules_to_save) is refused with one line naming it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from servebench.engine.config import ModelConfig

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PEFT_DEFAULT_ALPHA = 8  # LoraConfig's lora_alpha when a config leaves it out
# The projections an adapter may target, and the decoder-layer module that holds each.
TARGET_MODULES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                  "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
TENSOR_NAME = re.compile(
    r"(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")
# PEFT options the engine does not run, and the value that means "not used".
UNSUPPORTED = (("use_dora", False), ("bias", "none"), ("fan_in_fan_out", False), ("modules_to_save", None),
               ("rank_pattern", {}), ("alpha_pattern", {}))

LoRAWeights = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, module) -> (A, scaling B)


@dataclass(frozen=True, slots=True)
class LoRARequest:
    """vLLM's: an adapter's name (what the server lists and requests name), its id (>= 1; one id, one
    adapter) and its folder."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"LoRA adapter {self.lora_name!r}: lora_int_id must be an integer >= 1 (0 is "
                             f"the base model), got {self.lora_int_id!r}")


@dataclass(frozen=True, slots=True)
class AdapterConfig:
    rank: int
    scaling: float  # lora_alpha / r, or / sqrt(r) with use_rslora


def module_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each projection an adapter may target."""
    h, inter = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, inter),
            "up_proj": (h, inter), "down_proj": (inter, h)}


def check_adapter(request: LoRARequest, cfg: ModelConfig, max_rank: int) -> AdapterConfig:
    """The adapter's config, after checking it and its tensors' names and shapes (the file's header only)
    against the model and `max_lora_rank`: a ValueError naming the file and what is wrong otherwise."""
    path = Path(request.lora_path)
    if not (path / CONFIG_FILE).is_file():
        raise ValueError(f"LoRA adapter {request.lora_name!r}: {path} is not a PEFT adapter folder (no "
                         f"{CONFIG_FILE})")
    config = read_config(path / CONFIG_FILE, max_rank)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise ValueError(f"LoRA adapter {request.lora_name!r}: {path} has no {WEIGHTS_FILE} (only "
                         "safetensors adapters are supported)")
    try:
        with safe_open(weights, framework="pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{weights}: not a readable safetensors file ({e})") from None
    expected_shapes = module_shapes(cfg)
    for name, shape in shapes.items():
        _, module, ab = parse_tensor_name(name, weights, cfg.num_layers)
        n_in, n_out = expected_shapes[module]
        expected = (config.rank, n_in) if ab == "A" else (n_out, config.rank)
        if shape != expected:
            raise ValueError(f"{weights}: tensor {name} has shape {shape}, expected {expected} (r="
                             f"{config.rank} of {CONFIG_FILE}, this model's {module}: an adapter of another "
                             "model?)")
    _check_pairs(list(shapes), weights)
    return config


def read_config(file: Path, max_rank: int) -> AdapterConfig:
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    rank, alpha = raw.get("r"), raw.get("lora_alpha", PEFT_DEFAULT_ALPHA)
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{file}: r={rank!r} must be a positive integer")
    if rank > max_rank:
        raise ValueError(f"{file}: r={rank} exceeds max_lora_rank={max_rank}; raise max_lora_rank")
    if not isinstance(alpha, int | float):
        raise ValueError(f"{file}: lora_alpha={alpha!r} must be a number")
    for key, unused in UNSUPPORTED:
        if raw.get(key, unused) not in (unused, None, {}, []):
            raise ValueError(f"{file}: {key}={raw[key]!r} is not supported (the engine serves plain LoRA)")
    targets = raw.get("target_modules")
    if isinstance(targets, list):  # a string is "all-linear" or a regex: the tensors' names are checked
        for target in targets:
            if str(target).rsplit(".", 1)[-1] not in TARGET_MODULES:
                raise ValueError(f"{file}: target_modules has {target!r}, which the engine cannot adapt; "
                                 f"supported: {', '.join(TARGET_MODULES)}")
    scaling = alpha / (math.sqrt(rank) if raw.get("use_rslora") else rank)
    return AdapterConfig(rank, scaling)


def parse_tensor_name(name: str, file: Path, num_layers: int) -> tuple[int, str, str]:
    """(layer, projection, "A" or "B") of a PEFT tensor name, or a ValueError naming it."""
    m = TENSOR_NAME.fullmatch(name)
    if m is None or TARGET_MODULES.get(m[3]) != m[2] or int(m[1]) >= num_layers:
        raise ValueError(f"{file}: tensor {name} is not the lora_A or lora_B weight of a q/k/v/o or gate/up/"
                         f"down projection of one of the model's {num_layers} decoder layers")
    return int(m[1]), m[3], m[4]


def _check_pairs(names: list[str], file: Path) -> None:
    """Every lora_A with its lora_B and the other way round."""
    halves = {re.sub(r"lora_[AB]", "lora_?", n) for n in names}
    for half in halves:
        for ab in ("A", "B"):
            if half.replace("lora_?", f"lora_{ab}") not in names:
                raise ValueError(f"{file}: {half.replace('lora_?', 'lora_A')} and its lora_B come in pairs; "
                                 f"lora_{ab} is missing")


def read_adapter(request: LoRARequest, config: AdapterConfig, num_layers: int) -> LoRAWeights:
    """The adapter's tensors (checked by check_adapter when it was registered), B already scaled."""
    file = Path(request.lora_path) / WEIGHTS_FILE
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    with safe_open(file, framework="pt") as f:
        for name in f.keys():
            layer, module, ab = parse_tensor_name(name, file, num_layers)
            pairs.setdefault((layer, module), {})[ab] = f.get_tensor(name)
    return {key: (t["A"], t["B"] * config.scaling) for key, t in pairs.items()}
