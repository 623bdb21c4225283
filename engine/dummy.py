"""A local model folder from a config alone: config.json and a word-level tokenizer over the whole vocabulary;
and random LoRA adapters for a model, in PEFT's format.

With `load_format="dummy"` the engine fills the weights at random, so benchmarks and the workbench's
engine backend run any model shape without a checkpoint or a hub (and any number of adapters).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
import yaml
from safetensors.torch import save_file
from servebench.engine.config import ModelConfig
from servebench.engine.lora import CONFIG_FILE, TARGET_MODULES, WEIGHTS_FILE, module_shapes
from tokenizers import Tokenizer, models, pre_tokenizers

MODEL_CONF = Path(__file__).resolve().parents[1] / "conf" / "model"


def write_dummy_model_dir(config: dict, path: Path) -> Path:
    """config.json plus a tokenizer in which every id decodes (`<tN>`), bos/eos as the config says."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    vocab = {f"<t{i}>": i for i in range(config["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<t0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bos, eos = f"<t{config['bos_token_id']}>", f"<t{config['eos_token_id']}>"
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)
    fast.save_pretrained(path)
    return path


def hf_config(spec: dict) -> dict:
    """A Hugging Face config.json for a workbench `model` group (conf/model/*.yaml)."""
    cfg = {
        "architectures": [spec.get("architecture", "LlamaForCausalLM")],
        "hidden_size": spec["hidden_size"], "intermediate_size": spec["intermediate_size"],
        "num_hidden_layers": spec["num_layers"], "num_attention_heads": spec["num_attention_heads"],
        "num_key_value_heads": spec["num_key_value_heads"], "vocab_size": spec["vocab_size"],
        "max_position_embeddings": spec["max_model_len"], "rms_norm_eps": spec.get("rms_norm_eps", 1e-5),
        "rope_theta": spec.get("rope_theta", 10000.0), "hidden_act": "silu",
        "tie_word_embeddings": spec.get("tie_word_embeddings", False), "torch_dtype": "bfloat16",
        "bos_token_id": 1, "eos_token_id": 2,
    }
    if spec.get("head_dim"):
        cfg["head_dim"] = spec["head_dim"]
    cfg["model_type"] = {"Qwen3ForCausalLM": "qwen3", "Qwen2ForCausalLM": "qwen2",
                         "MistralForCausalLM": "mistral"}.get(cfg["architectures"][0], "llama")
    return cfg


def resolve_model(model: str, tmp: Path) -> tuple[str, Path]:
    """(name, HF folder): an existing folder, or a conf/model/<name>.yaml shape written as a dummy folder
    under `tmp` (its weights are drawn at random with `load_format="dummy"`)."""
    path = Path(model)
    if (path / "config.json").is_file():
        return path.name, path
    conf = MODEL_CONF / f"{model}.yaml"
    if not conf.is_file():
        known = ", ".join(sorted(p.stem for p in MODEL_CONF.glob("*.yaml")))
        raise ValueError(f"model {model!r}: no config.json there, nor one of the model shapes: {known}")
    spec = yaml.safe_load(conf.read_text())
    return spec["name"], write_dummy_model_dir(hf_config(spec), tmp / spec["name"])


def write_dummy_adapter(path: Path, cfg: ModelConfig, rank: int, seed: int = 0,
                        targets: tuple[str, ...] = tuple(TARGET_MODULES), layers: range | None = None,
                        alpha: float | None = None, use_rslora: bool = False) -> Path:
    """A PEFT LoRA adapter folder for the model of `cfg`: A and B drawn from N(0, initializer_range) in the
    model's dtype, on the `targets` projections of `layers` (None: all); lora_alpha 2 x rank unless given."""
    gen = torch.Generator().manual_seed(seed)
    shapes, std = module_shapes(cfg), cfg.initializer_range
    tensors = {}
    for layer in layers if layers is not None else range(cfg.num_layers):
        for module in targets:
            n_in, n_out = shapes[module]
            prefix = f"base_model.model.model.layers.{layer}.{TARGET_MODULES[module]}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, n_in, generator=gen) * std).to(cfg.dtype)
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(n_out, rank, generator=gen) * std).to(cfg.dtype)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / WEIGHTS_FILE))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha if alpha is not None else 2 * rank,
              "target_modules": list(targets), "use_rslora": use_rslora, "bias": "none",
              "base_model_name_or_path": str(cfg.path)}
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return path
