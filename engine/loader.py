"""Build a model on its device and fill it from a local HF checkpoint (safetensors) or at random (dummy);
quantized layers then turn what was loaded into what they compute with (engine.quantization)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from servebench.engine.config import ModelConfig
from servebench.engine.models import LlamaForCausalLM
from servebench.engine.parallel import COLUMN_PARALLEL, ROW_PARALLEL, VOCAB_PARALLEL, TensorParallel
from servebench.engine.quantization import get_quant_config, process_weights_after_loading

# HF tensors with no parameter here: rotary tables that some checkpoints still carry.
SKIPPED = re.compile(r"rotary_emb\.inv_freq$")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_position: int,
               load_format: str = "auto", seed: int = 0, quantization: str | None = None,
               tp: TensorParallel | None = None) -> LlamaForCausalLM:
    """`quantization`: EngineArgs' (engine.quantization.get_quant_config); `tp`: the shard to load (None: the
    whole model)."""
    quant = get_quant_config(quantization, cfg, load_format)
    with _default_dtype(dtype), torch.device(device):
        model = LlamaForCausalLM(cfg if tp is None else tp.shard_config(cfg), max_position, quant, tp)
    if load_format == "dummy":
        _init_dummy(model, seed)
    else:
        load_safetensors(model, cfg.path)
    if quant is not None:
        process_weights_after_loading(model)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the float weights' memory, now free, goes to the KV cache
    return model.eval().requires_grad_(False)


def _init_dummy(model: LlamaForCausalLM, seed: int) -> None:
    """Random weights of the checkpoint's scale: N(0, initializer_range), norms at one."""
    gen = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
        else:
            p.data.normal_(0.0, model.config.initializer_range, generator=gen)


def _checkpoint_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{path}: no *.safetensors weights (pass load_format='dummy' for random weights)")
    return files


def load_safetensors(model: LlamaForCausalLM, path: Path) -> None:
    params = dict(model.named_parameters())
    missing = set(params)
    for file in _checkpoint_files(path):
        with safe_open(file, framework="pt", device="cpu") as f:
            for hf_name in f.keys():
                name = _load_tensor(model, params, hf_name, f.get_tensor(hf_name), file)
                missing.discard(name)
    if model.config.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks weights for {', '.join(sorted(missing)[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}")


def _load_tensor(model: LlamaForCausalLM, params: dict[str, torch.nn.Parameter], hf_name: str,
                 tensor: torch.Tensor, file: Path) -> str | None:
    """Copy one HF tensor into its parameter (or its shard of a merged one); returns the parameter name."""
    if SKIPPED.search(hf_name) or (hf_name == "lm_head.weight" and model.config.tie_word_embeddings):
        return None
    parent, _, leaf = hf_name.rpartition(".")
    module_path, _, module = parent.rpartition(".")
    target, start, size = hf_name, 0, None
    if module in model.packed_modules:
        merged, start, size = model.packed_modules[module]
        target = f"{module_path}.{merged}.{leaf}"
    if target not in params:
        raise ValueError(f"{file}: tensor {hf_name} has no place in {model.config.architecture}")
    param = params[target]
    dst = param.data
    # A quantized parameter's output columns lie along its output_dim, pack_factor of them an element
    # (engine.quantization); one with none (GPTQ's g_idx) is the same for every shard.
    out_dim = getattr(param, "output_dim", 0)
    if size is not None and out_dim is not None:
        factor = getattr(param, "pack_factor", 1)
        dst = dst.narrow(out_dim, start // factor, size // factor)
    split = None if model.tp is None else _split_dim(module, param, tensor)
    if split is not None:
        dst, tensor = _shard(model.tp, split, dst, tensor)
    if dst.shape != tensor.shape:
        raise ValueError(
            f"{file}: tensor {hf_name} has shape {tuple(tensor.shape)}, expected {tuple(dst.shape)}")
    dst.copy_(tensor)
    return target


def _split_dim(module: str, param: torch.nn.Parameter, tensor: torch.Tensor) -> int | None:
    """The dimension of an HF tensor the ranks split: a column-parallel layer's outputs (a quantized
    parameter's `output_dim`; None: one over its inputs, GPTQ's g_idx), a row-parallel one's inputs (a 1-d
    tensor of it: g_idx), the vocabulary's rows; None: every rank holds it whole."""
    out = getattr(param, "output_dim", 0)
    if module in COLUMN_PARALLEL:
        return out
    if module in ROW_PARALLEL:
        return 0 if tensor.dim() == 1 else 1 - out
    return 0 if module in VOCAB_PARALLEL else None


def _shard(tp: TensorParallel, dim: int, dst: torch.Tensor, tensor: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's part of a whole HF tensor along `dim`, and where it goes: the last rank's rows of the
    vocabulary may run past its end (they stay zero)."""
    n = dst.shape[dim]
    start = tp.rank * n
    have = max(0, min(n, tensor.shape[dim] - start))
    return dst.narrow(dim, 0, have), tensor.narrow(dim, min(start, tensor.shape[dim]), have)
