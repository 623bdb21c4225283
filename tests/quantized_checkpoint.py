"""Quantized copies of a tiny model directory, made by our own quantizer and packers (kernels.quant_layout):
what AutoAWQ and AutoGPTQ write (their safetensors names and layouts, quantization_config in config.json),
and beside it the same model with each quantized weight replaced by its dequantized value, in float32 (what
the quantized engine must compute, unquantized)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from servebench.kernels import quant_layout as ql

# The decoder layers' projections: what AWQ and GPTQ quantize (and the engine's quantization="fp8").
PROJECTION = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")


def _copy_model_dir(src: Path, dst: Path, tensors: dict[str, torch.Tensor], **config: object) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, dst / f.name)
    cfg = json.loads((src / "config.json").read_text()) | config
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, dst / "model.safetensors")
    return dst


def quantize_checkpoint(src: Path, dst: Path, method: str, group_size: int = 32,
                        **quant_config: object) -> tuple[Path, Path]:
    """(an awq or gptq checkpoint of src at dst, src with dequantized weights at dst-dequantized).
    quant_config: extra or overriding quantization_config keys (bits, desc_act, ...)."""
    tensors = load_file(src / "model.safetensors")
    quantized, dequantized = {}, {}
    for name, w in tensors.items():
        if not PROJECTION.match(name):
            quantized[name] = dequantized[name] = w
            continue
        base = name.removesuffix(".weight")
        q, zeros, scales = ql.quantize_int4(w, group_size, sym=method == "gptq", scale_dtype=torch.float16)
        if method == "awq":
            qweight, qzeros = ql.pack_awq(q, zeros)
        else:
            qweight, qzeros = ql.pack_gptq(q, zeros, zero_offset=1)
            quantized[f"{base}.g_idx"] = torch.arange(w.shape[1], dtype=torch.int32) // group_size
        quantized |= {f"{base}.qweight": qweight, f"{base}.qzeros": qzeros, f"{base}.scales": scales}
        dequantized[name] = ql.dequantize_int4(*ql.pack_gptq(q, zeros, 0), scales, 0).t()
    config = {"quant_method": method, "bits": 4, "group_size": group_size}
    config |= {"zero_point": True, "version": "gemm"} if method == "awq" else {"desc_act": False, "sym": True}
    config |= quant_config
    return (_copy_model_dir(src, dst, quantized, quantization_config=config),
            _copy_model_dir(src, dst.with_name(dst.name + "-dequantized"), dequantized))


def fp8_dequantized(src: Path, dst: Path) -> Path:
    """src with each projection replaced by what quantization="fp8" computes with (weight-only)."""
    tensors = load_file(src / "model.safetensors")
    for name, w in tensors.items():
        if PROJECTION.match(name):
            q, scale = ql.quantize_fp8(w)
            tensors[name] = q.float() * scale
    return _copy_model_dir(src, dst, tensors)
