"""Quantized serving on the CPU engine (fp32, the torch reference kernels): AWQ and GPTQ checkpoints written
by our own quantizer and packers, FP8 weights quantized at load, the FP8 KV cache.

The model is the tiny Llama trained for a few seconds until it has memorized its corpus (tiny_model.
train_tiny_model): a random model's top two logits are often a rounding apart, so no quantization keeps its
greedy tokens; a trained model's margins are what quantized serving is judged on.

Tolerances, each set at 3 to 4x what this model measures (in brackets):
- A quantized checkpoint computes exactly its dequantized weights: its log-probs equal those of the same model
  with each weight replaced by (q - z) * s (fp8: q * s), unquantized, to 1e-5 [0].
- Against the fp32 model, the mean KL divergence of the next-token distributions over every prompt position
  (175), and the share of positions whose top token agrees:
  int4, group 32, round to nearest (AWQ and GPTQ alike): each weight off by up to half a step of its group's
  range / 15, ~8 % of the weights' rms; KL <= 0.05 nats [0.016 AWQ, 0.015 GPTQ], top-1 >= 95 % [98.9, 100].
  fp8 weights: e4m3's 3 mantissa bits, each weight within 2^-4 of itself; KL <= 0.005 [0.0014], top-1
  >= 98 % [100]. fp8 KV cache (scale 1.0): the same rounding on K and V only; KL <= 0.002 [0.0005], top-1
  >= 98 % [100].
- Greedy, 24 tokens from each of the 6 prompts: where a continuation departs from fp32's, fp32's top two
  tokens there are within NEAR_TIE nats (a near tie, which a logit error of that size flips; the margins
  are mostly 4 to 8 nats elsewhere), and at least 4 of the 6 agree on all 24 tokens [fp8 weights and KV:
  6; AWQ: 5, GPTQ: 4, departing at margins of 0.23 ("1": after BOS, the corpus continues it several ways)
  and 0.34 nats].
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from quantized_checkpoint import fp8_dequantized, quantize_checkpoint
from safetensors.torch import load_file, save_file
from servebench.engine.config import ModelConfig
from servebench.engine.quantization import get_quant_config
from test_engine_correctness import PROMPTS
from tiny_model import build_tiny_model

from servebench import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=24)
NEAR_TIE = 1.0  # nats between fp32's top two tokens
# method: (checkpoint: int4 written by our packers, or the float model), engine kwargs, max mean KL, top-1
CASES = {
    "awq": ("awq", {}, 0.05, 0.95),
    "gptq": ("gptq", {}, 0.05, 0.95),
    "fp8": (None, {"quantization": "fp8"}, 0.005, 0.98),
    "kv_fp8": (None, {"kv_cache_dtype": "fp8"}, 0.002, 0.98),
}


@pytest.fixture(scope="module")
def checkpoints(trained_llama_dir, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """method -> (its checkpoint, the model with the weights it computes with, unquantized)."""
    root = tmp_path_factory.mktemp("quantized")
    out = {m: quantize_checkpoint(trained_llama_dir, root / m, m) for m in ("awq", "gptq")}
    return out | {"fp8": (trained_llama_dir, fp8_dequantized(trained_llama_dir, root / "fp8-dequantized"))}


def llm(model_dir: Path, **kwargs) -> LLM:
    return LLM(model=str(model_dir), dtype="float32", device="cpu", enable_prefix_caching=False, **kwargs)


def prompt_logprobs(engine: LLM) -> torch.Tensor:
    """[positions, vocab] log-probs of the next token at every position of every prompt but the first."""
    vocab = engine.engine.vocab_size
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=1, prompt_logprobs=vocab), use_tqdm=False)
    return torch.tensor([[p[t].logprob for t in range(vocab)] for o in outs for p in o.prompt_logprobs[1:]])


Baseline = tuple[torch.Tensor, list[list[int]], list[list[float]]]


def baseline_run(engine: LLM) -> Baseline:
    """The unquantized model's prompt log-probs, greedy tokens and, at each of them, the lead of the top
    token over the second (nats)."""
    params = SamplingParams(temperature=0.0, max_tokens=GREEDY.max_tokens, logprobs=2)
    outs = engine.generate(PROMPTS, params, use_tqdm=False)
    tops = [[sorted((lp.logprob for lp in p.values()), reverse=True) for p in o.outputs[0].logprobs]
            for o in outs]
    margins = [[a - b for a, b, *_ in position] for position in tops]
    return prompt_logprobs(engine), [o.outputs[0].token_ids for o in outs], margins


def check_near(baseline: Baseline, engine: LLM, max_kl: float, min_top1: float) -> None:
    """The module docstring's criteria for a quantized engine against the unquantized baseline."""
    want_logprobs, want_tokens, margins = baseline
    got = prompt_logprobs(engine)
    kl = (want_logprobs.exp() * (want_logprobs - got)).sum(-1)
    assert kl.mean() <= max_kl, f"mean KL {kl.mean():.4f} nats"
    top1 = (got.argmax(-1) == want_logprobs.argmax(-1)).float().mean()
    assert top1 >= min_top1, f"top-1 agreement {top1:.3f}"
    tokens = [o.outputs[0].token_ids for o in engine.generate(PROMPTS, GREEDY, use_tqdm=False)]
    for got_ids, want_ids, margin in zip(tokens, want_tokens, margins):
        departs = next((i for i, (a, b) in enumerate(zip(got_ids, want_ids)) if a != b), None)
        assert departs is None or margin[departs] < NEAR_TIE, (departs, margin, got_ids, want_ids)
    assert sum(a == b for a, b in zip(tokens, want_tokens)) >= 4, (tokens, want_tokens)


@pytest.fixture(scope="module")
def baseline(trained_llama_dir) -> Baseline:
    return baseline_run(llm(trained_llama_dir))


def quantized_engine(case: str, trained_llama_dir: Path, checkpoints: dict) -> LLM:
    method, kwargs, *_ = CASES[case]
    return llm(checkpoints[method][0] if method else trained_llama_dir, **kwargs)


@pytest.mark.parametrize("method", ["awq", "gptq", "fp8"])
def test_quantized_weights_compute_their_dequantized_values(method: str, checkpoints,
                                                            trained_llama_dir) -> None:
    engine = quantized_engine(method, trained_llama_dir, checkpoints)
    dequantized = llm(checkpoints[method][1])
    torch.testing.assert_close(prompt_logprobs(engine), prompt_logprobs(dequantized), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_quantized_logprobs_and_greedy_tokens_near_full_precision(case: str, checkpoints, trained_llama_dir,
                                                                   baseline) -> None:
    check_near(baseline, quantized_engine(case, trained_llama_dir, checkpoints), *CASES[case][2:])


@pytest.mark.parametrize("arch,method", [("qwen2", "awq"), ("qwen3", "gptq")])
def test_int4_checkpoints_of_other_families(arch: str, method: str, tmp_path) -> None:
    # Qwen2's q/k/v bias beside packed weights, Qwen3's q/k norms and tied embedding. In bf16 (scales and
    # dequantized weights rounded to it at other points) within twice bf16's own error on the dequantized
    # model [measured on Qwen2: 1.4x the largest, 1.1x the mean].
    model = build_tiny_model(tmp_path / arch, arch)
    folder, dequantized = quantize_checkpoint(model, tmp_path / method, method)

    def run(path: Path, dtype: str) -> torch.Tensor:
        return prompt_logprobs(LLM(model=str(path), dtype=dtype, device="cpu"))

    want = run(dequantized, "float32")
    torch.testing.assert_close(run(folder, "float32"), want, atol=1e-5, rtol=0)
    got, bf16 = (run(path, "bfloat16") - want for path in (folder, dequantized))
    assert got.abs().max() <= 2 * bf16.abs().max() and got.abs().mean() <= 2 * bf16.abs().mean()


# 16 blocks of 16 tokens for 6 prompts and their tokens: requests are preempted and swapped out and in.
SWAP = dict(max_model_len=256, num_gpu_blocks_override=16, preemption_mode="swap", swap_space=0.01)


def test_fp8_kv_cache_swaps_out_and_in(trained_llama_dir, baseline) -> None:
    engine = llm(trained_llama_dir, kv_cache_dtype="fp8", **SWAP)
    assert engine.engine.runner.kv_cache.cpu.dtype == torch.float8_e4m3fn
    check_near(baseline, engine, *CASES["kv_fp8"][2:])
    assert engine.engine.stats().num_preemptions > 0


def test_fp8_kv_cache_holds_twice_the_blocks_and_quantized_weights_shrink(trained_llama_dir,
                                                                          checkpoints) -> None:
    budget = 1 << 20
    bf16 = LLM(model=str(trained_llama_dir), dtype="bfloat16", device="cpu", kv_cache_memory_bytes=budget)
    fp8 = LLM(model=str(trained_llama_dir), dtype="bfloat16", device="cpu", kv_cache_memory_bytes=budget,
              kv_cache_dtype="fp8_e4m3")
    assert fp8.engine.runner.kv_cache.num_gpu_blocks == 2 * bf16.engine.runner.kv_cache.num_gpu_blocks
    assert fp8.engine.runner.kv_cache.dtype == torch.float8_e4m3fn
    assert fp8.engine.runner.kv_cache_bytes == bf16.engine.runner.kv_cache_bytes <= budget
    cfg = ModelConfig.from_dir(trained_llama_dir)
    projections = cfg.num_layers * cfg.hidden_size * (
        (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim + cfg.num_heads * cfg.head_dim
        + 3 * cfg.intermediate_size)
    full = llm(trained_llama_dir).engine.runner.weight_bytes
    # fp32 -> 1 byte a weight and a 4-byte scale per output channel; int4: half a byte and, per group of 32,
    # an fp32 scale (the model's dtype) and half a byte of zero point.
    fp8_bytes = llm(trained_llama_dir, quantization="fp8").engine.runner.weight_bytes
    assert full - fp8_bytes == pytest.approx(3 * projections, rel=0.02)
    awq_bytes = llm(checkpoints["awq"][0]).engine.runner.weight_bytes
    assert full - awq_bytes == pytest.approx((4 - 0.5 - 4.5 / 32) * projections)


@pytest.mark.parametrize("quantization", ["fp8", "awq", "gptq"])
def test_dummy_weights_run_quantized(quantization: str, tiny_llama_dir) -> None:
    # No quantization_config in the folder: int4 takes group size 32 from an explicit config only, so the
    # defaults (128) do not fit this model's 64 inputs.
    kwargs = dict(load_format="dummy", quantization=quantization, kv_cache_dtype="fp8")
    if quantization == "fp8":
        out = llm(tiny_llama_dir, **kwargs).generate(PROMPTS[:2], GREEDY, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) >= 1 for o in out)
        return
    with pytest.raises(ValueError, match="64 inputs and .* outputs does not fit group_size=128"):
        llm(tiny_llama_dir, **kwargs)


def test_dummy_int4_with_its_config_runs(tiny_llama_dir, tmp_path) -> None:
    folder = tmp_path / "dummy_awq"
    folder.mkdir()
    for f in tiny_llama_dir.iterdir():
        if f.suffix != ".safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False}
    (folder / "config.json").write_text(json.dumps(cfg))
    engine = llm(folder, load_format="dummy")  # quantization from the folder's config
    assert engine.engine.runner.model.model.layers[0].mlp.down_proj.qweight.dtype == torch.int32
    assert len(engine.generate(PROMPTS[:2], GREEDY, use_tqdm=False)) == 2


def rewrite(folder: Path, drop: str | None = None, **quant_config) -> Path:
    """The checkpoint at folder with the tensors named *drop removed and quantization_config updated."""
    if drop:
        tensors = load_file(folder / "model.safetensors")
        save_file({k: v for k, v in tensors.items() if not k.endswith(drop)}, folder / "model.safetensors")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] |= quant_config
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("method,change,error", [
    ("awq", dict(drop=".qzeros"), r"lacks weights for model\.layers\.0\.mlp\.down_proj\.qzeros"),
    ("gptq", dict(bits=8), r"has bits=8: only 4-bit gptq checkpoints are supported"),
    ("awq", dict(w_bit=3, bits=None), r"has bits=None"),
    ("gptq", dict(desc_act=True), r"has desc_act=true \(act-order\): only GPTQ checkpoints without it"),
    ("gptq", dict(quant_method="bitsandbytes"), r"quant_method='bitsandbytes', which is not supported"),
    ("awq", dict(version="gemv"), r"version='gemv': only AWQ's GEMM layout is supported"),
    ("awq", dict(zero_point=False), r"zero_point=false"),
    ("gptq", dict(group_size=48), r"group_size=48: -1 \(per channel\) or a positive multiple of 32"),
])
def test_bad_checkpoints_are_one_line_errors(method: str, change: dict, error: str, trained_llama_dir,
                                             tmp_path) -> None:
    folder = rewrite(quantize_checkpoint(trained_llama_dir, tmp_path / method, method)[0], **change)
    with pytest.raises(ValueError, match=error) as e:
        llm(folder)
    assert "\n" not in str(e.value)


def test_act_order_g_idx_and_mismatched_names_are_clear_errors(trained_llama_dir, tmp_path) -> None:
    folder = quantize_checkpoint(trained_llama_dir, tmp_path / "gptq", "gptq")[0]
    tensors = load_file(folder / "model.safetensors")
    g_idx = "model.layers.1.self_attn.o_proj.g_idx"
    tensors[g_idx] = tensors[g_idx].flip(0).contiguous()
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"g_idx is not input row // group_size \(act-order\)"):
        llm(folder)
    with pytest.raises(ValueError, match="quantization='awq' but the checkpoint is quantized with 'gptq'"):
        llm(folder, quantization="awq")
    with pytest.raises(ValueError, match="quantization='gptq' needs a GPTQ checkpoint, and .* has no "
                                         "quantization_config"):
        llm(trained_llama_dir, quantization="gptq")
    with pytest.raises(ValueError, match=r"quantization='int8' is not supported: choose fp8, awq, gptq"):
        llm(trained_llama_dir, quantization="int8")
    with pytest.raises(ValueError, match=r"kv_cache_dtype='fp8_e5m2' is not supported: choose auto, fp8"):
        llm(trained_llama_dir, kv_cache_dtype="fp8_e5m2")


def test_older_checkpoints_keep_their_config_beside_config_json(trained_llama_dir, tmp_path) -> None:
    # AutoGPTQ's quantize_config.json names no method: quantization= says which.
    folder = quantize_checkpoint(trained_llama_dir, tmp_path / "gptq", "gptq")[0]
    cfg = json.loads((folder / "config.json").read_text())
    quant = cfg.pop("quantization_config")
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "quantize_config.json").write_text(json.dumps({k: v for k, v in quant.items()
                                                             if k != "quant_method"}))
    model_config = ModelConfig.from_dir(folder)
    with pytest.raises(ValueError, match="names no quant_method: pass quantization='awq' or 'gptq'"):
        get_quant_config(None, model_config)
    assert get_quant_config("gptq", model_config).zero_offset == 1
    assert len(llm(folder, quantization="gptq").generate(PROMPTS[:1], GREEDY, use_tqdm=False)) == 1
