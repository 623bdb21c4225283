"""Kernels against their torch references, and the references against HF transformers.

Triton decides at import whether kernels run in its CPU interpreter, so the `test_triton_*` cases only run
with TRITON_INTERPRET=1 in the environment: test_interpreter_suite re-runs them in a subprocess that sets it,
on machines without CUDA (run them directly with `TRITON_INTERPRET=1 pytest tests/test_kernels.py -k triton`);
bf16 and fp8 cases run there with three interpreter ops given the GPU's semantics (interpreter_gpu_casts).
With CUDA, the `test_gpu_*` cases (marker gpu) run the kernels natively on real shapes, and a small Llama
layer stack through the fused paths against the unfused references.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from servebench.engine.config import ModelConfig
from servebench.engine.models.llama import AttentionMetadata, LlamaModel
from servebench.kernels import attention, ops
from servebench.kernels import quant_layout as ql
from servebench.kernels import reference as ref
from servebench.kernels.attention import TileConfig, default_num_splits
from servebench.kernels.dispatch import INTERPRET
from servebench.kernels.fp8 import quantize_fp8, scaled_mm_supported
from servebench.kernels.linear import SPLITS, TUNERS, SplitK
from servebench.kernels.rotary import build_cos_sin_cache

interp = pytest.mark.skipif(not INTERPRET, reason="runs in test_interpreter_suite (TRITON_INTERPRET=1)")


@pytest.fixture(autouse=True)
def interpreter_gpu_casts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton's interpreter keeps bf16 as raw uint16 bits: its tl.dot multiplies the bit patterns and its
    fp32 -> bf16 casts truncate (bf16 is unsupported there: triton-lang/triton#11584); its fp32 -> fp8 casts
    drop the carry of a rounding that crosses a power of two (124.3 becomes 64, not 128). Give those ops
    the GPU's semantics (bf16 operands exact in fp32, round to nearest even): bf16 and fp8 kernels run on
    CPU."""
    if not INTERPRET:
        return
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    cast, dot, fp_to_fp = builder.cast_impl, builder.create_dot, builder.create_fp_to_fp

    def torch_cast(src, dst: torch.dtype, bits: np.dtype, dst_type: tl.dtype) -> interpreter.TensorHandle:
        rounded = torch.from_numpy(np.array(src.data, dtype=np.float32)).to(dst)
        return interpreter.TensorHandle(rounded.view(torch.uint8 if bits == np.uint8 else torch.int16)
                                        .numpy().view(bits), dst_type)

    def cast_rtne(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return torch_cast(src, torch.bfloat16, np.uint16, tl.bfloat16)
        return cast(self, src, dst_type)

    def fp_to_fp_rtne(self, src, dst_type, rounding_mode):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.float8e4nv:
            return torch_cast(src, torch.float8_e4m3fn, np.uint8, tl.float8e4nv)
        return fp_to_fp(self, src, dst_type, rounding_mode)

    def dot_fp32(self, a, b, *args):
        a, b = (cast(self, t, tl.float32) if t.dtype.scalar == tl.bfloat16 else t for t in (a, b))
        return dot(self, a, b, *args)

    monkeypatch.setattr(builder, "cast_impl", cast_rtne)
    monkeypatch.setattr(builder, "create_fp_to_fp", fp_to_fp_rtne)
    monkeypatch.setattr(builder, "create_dot", dot_fp32)


def force_split_k(monkeypatch: pytest.MonkeyPatch, splits: int) -> None:
    """Let the split-K autotuner run one config only (a single config is never tuned, nor cached)."""
    config = triton.Config({"BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": splits}, num_warps=4, num_stages=4)
    monkeypatch.setattr(TUNERS["split"], "configs", [config])


def gpu(test: Callable) -> Callable:
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test))


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}
ROPE_SCALINGS = [None, {"rope_type": "linear", "factor": 4.0}, LLAMA3_SCALING,
                 {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}]


def make_batch(seqs: list[tuple[int, int]], num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
               dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> dict:
    """Paged-attention inputs for sequences given as (query_len, seq_len), blocks scattered over the cache;
    table entries past a sequence's blocks point far outside it, so reading one crashes."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-seq_len // block_size) for _, seq_len in seqs]
    num_blocks = sum(blocks_per_seq) + 3
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.full((len(seqs), max(blocks_per_seq) + 2), 2**24)
    used = 0
    for i, n in enumerate(blocks_per_seq):
        tables[i, :n] = perm[used:used + n]
        used += n

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    q_lens = [q_len for q_len, _ in seqs]
    return dict(
        q=randn(sum(q_lens), num_heads, head_dim),
        k_cache=randn(num_blocks, block_size, num_kv_heads, head_dim),
        v_cache=randn(num_blocks, block_size, num_kv_heads, head_dim),
        block_tables=tables.to(device=device, dtype=torch.int32),
        seq_lens=torch.tensor([s for _, s in seqs], dtype=torch.int32, device=device),
        query_start_loc=torch.tensor([0, *q_lens], device=device).cumsum(0).to(torch.int32),
        scale=head_dim ** -0.5, max_query_len=max(q_lens), max_seq_len=max(s for _, s in seqs),
    )


def reference_attention(batch: dict) -> torch.Tensor:
    keys = ("q", "k_cache", "v_cache", "block_tables", "seq_lens", "query_start_loc", "scale")
    return ref.paged_attention(*(batch[k] for k in keys))


def check_attention(batch: dict, atol: float, **kwargs) -> None:
    out = ops.paged_attention(**batch, **kwargs)
    assert out.dtype == batch["q"].dtype
    torch.testing.assert_close(out.float(), reference_attention(batch).float(), atol=atol, rtol=0)


# --- references against HF transformers and the CPU dispatch (run in-process) ---

@pytest.mark.parametrize("rope_scaling", ROPE_SCALINGS, ids=["default", "linear", "llama3", "yarn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cos_sin_cache_matches_hf(rope_scaling: dict | None, dtype: torch.dtype) -> None:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=1024, num_attention_heads=8, head_dim=128,
                         max_position_embeddings=131072, rope_theta=500000.0, rope_scaling=rope_scaling)
    positions = torch.arange(0, 131072, 997)
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1, dtype=dtype), positions[None])
    cache = build_cos_sin_cache(128, 131072, 500000.0, rope_scaling, dtype)[positions]
    assert torch.equal(cache, torch.cat((cos[0, :, :64], sin[0, :, :64]), dim=-1))


def test_partial_rotary_cache_matches_hf() -> None:
    from transformers import StableLmConfig
    from transformers.models.stablelm.modeling_stablelm import StableLmRotaryEmbedding

    config = StableLmConfig(hidden_size=1024, num_attention_heads=8, rope_theta=10000.0,
                            partial_rotary_factor=0.25)
    positions = torch.arange(0, 4096, 7)
    cos, sin = StableLmRotaryEmbedding(config)(torch.zeros(1), positions[None])
    cache = build_cos_sin_cache(128, 4096, 10000.0, {"partial_rotary_factor": 0.25})[positions]
    assert torch.equal(cache, torch.cat((cos[0, :, :16], sin[0, :, :16]), dim=-1))


def test_unknown_rope_type_is_rejected() -> None:
    with pytest.raises(ValueError, match="rope_type='longrope'"):
        build_cos_sin_cache(128, 16, 10000.0, {"rope_type": "longrope"})


def test_reference_rotary_and_norm_match_hf_bf16() -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    torch.manual_seed(0)
    num_tokens, heads, head_dim = 9, 4, 64
    cache = build_cos_sin_cache(head_dim, 256, 10000.0, LLAMA3_SCALING, torch.bfloat16)
    positions = torch.randint(0, 256, (num_tokens,))
    q, k = torch.randn(2, num_tokens, heads * head_dim, dtype=torch.bfloat16)
    cos, sin = (torch.cat((h, h), dim=-1)[None] for h in cache[positions].chunk(2, dim=-1))
    q_hf, k_hf = apply_rotary_pos_emb(q.view(1, num_tokens, heads, head_dim).transpose(1, 2),
                                      k.view(1, num_tokens, heads, head_dim).transpose(1, 2), cos, sin)
    ref.apply_rotary(positions, q, k, cache, head_dim)
    assert torch.equal(q.view(num_tokens, heads, head_dim), q_hf[0].transpose(0, 1))
    assert torch.equal(k.view(num_tokens, heads, head_dim), k_hf[0].transpose(0, 1))

    norm = LlamaRMSNorm(256, eps=1e-5).to(torch.bfloat16)
    norm.weight.data.normal_()
    x, residual = torch.randn(2, num_tokens, 256, dtype=torch.bfloat16)
    out, new_residual = ref.rms_norm(x, norm.weight, 1e-5, residual)
    assert torch.equal(new_residual, x + residual) and torch.equal(out, norm(x + residual))


def test_reference_attention_matches_sdpa() -> None:
    # A prefill chunk of 5 tokens after a 12-token cached prefix, GQA 4:2.
    batch = make_batch([(5, 17)], num_heads=4, num_kv_heads=2, head_dim=16, block_size=4, dtype=torch.float32)
    blocks = batch["block_tables"][0, :5].long()
    k = batch["k_cache"][blocks].flatten(0, 1)[:17].transpose(0, 1)
    v = batch["v_cache"][blocks].flatten(0, 1)[:17].transpose(0, 1)
    mask = torch.ones(5, 17, dtype=torch.bool).tril(diagonal=12)
    q = batch["q"].transpose(0, 1)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(reference_attention(batch), expected.transpose(0, 1))


def test_auto_runs_reference_on_cpu_and_rejects_bad_impl() -> None:
    x, w = torch.randn(3, 8), torch.ones(8)
    assert torch.equal(ops.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6))
    with pytest.raises(ValueError, match="impl must be one of"):
        ops.silu_and_mul(x, impl="cuda")
    with pytest.raises(ValueError, match="impl must be one of"):
        ops.store_kv(x, x, x, x, torch.zeros(3, dtype=torch.int32), impl="compile")


@pytest.mark.skipif(INTERPRET, reason="the interpreter makes impl='triton' valid on CPU")
def test_triton_on_cpu_without_interpreter_names_the_fix() -> None:
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        ops.silu_and_mul(torch.randn(2, 8), impl="triton")


def test_default_num_splits() -> None:
    assert default_num_splits(num_seqs=256, num_kv_heads=32, max_seq_len=8192) == 1  # batch fills the GPU
    assert default_num_splits(num_seqs=1, num_kv_heads=32, max_seq_len=8192) == 16
    assert default_num_splits(num_seqs=1, num_kv_heads=8, max_seq_len=300) == 1  # short context
    assert default_num_splits(num_seqs=3, num_kv_heads=8, max_seq_len=4096) == 16  # a power of two


@pytest.mark.skipif(INTERPRET, reason="already inside the interpreter run")
@pytest.mark.skipif(torch.cuda.is_available(), reason="the gpu tests run the kernels natively")
def test_interpreter_suite() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "test_triton_"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


# --- Triton kernels in the CPU interpreter ---

DTYPES = [(torch.float32, 1e-5), (torch.float16, 2e-3)]
ATTENTION_CASES = {  # name: (sequences as (query_len, seq_len), num_heads, num_kv_heads, block_size)
    "prefill": ([(20, 20), (37, 37), (2, 2)], 2, 2, 16),
    "prefill_with_prefix": ([(16, 50), (5, 21), (40, 41)], 4, 2, 16),
    "decode": ([(1, 37), (1, 1), (1, 100), (1, 16)], 4, 4, 16),
    "mixed_gqa3": ([(1, 70), (23, 23), (1, 5), (9, 40), (1, 33)], 6, 2, 8),
    "mixed_block32": ([(3, 90), (1, 64), (30, 30)], 8, 2, 32),
}


@interp
@pytest.mark.parametrize("case", ATTENTION_CASES)
@pytest.mark.parametrize("dtype,atol", DTYPES, ids=["fp32", "fp16"])
def test_triton_paged_attention(case: str, dtype: torch.dtype, atol: float) -> None:
    seqs, heads, kv_heads, block_size = ATTENTION_CASES[case]
    check_attention(make_batch(seqs, heads, kv_heads, 32, block_size, dtype), atol, impl="triton")


@interp
@pytest.mark.parametrize("dtype,atol", DTYPES, ids=["fp32", "fp16"])
def test_triton_paged_attention_split_k(dtype: torch.dtype, atol: float) -> None:
    # Contexts shorter than num_splits tiles leave some splits empty; a prefill sequence shares the batch.
    batch = make_batch([(1, 300), (1, 3), (12, 60), (1, 129)], 4, 2, 32, 16, dtype)
    check_attention(batch, atol, impl="triton", num_splits=8)


@interp
@pytest.mark.parametrize("dtype,atol", DTYPES, ids=["fp32", "fp16"])
def test_triton_paged_attention_small_tiles(dtype: torch.dtype, atol: float,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # Several query tiles per sequence, and key tiles both fully visible and straddling the diagonal.
    small = TileConfig(block_m=16, tile_n=16, num_warps=4, num_stages=1)
    monkeypatch.setattr(attention, "PREFILL_TILE", small)
    monkeypatch.setattr(attention, "DECODE_TILE", small)
    batch = make_batch([(37, 60), (1, 45), (16, 16), (17, 17)], 4, 2, 32, 16, dtype)
    check_attention(batch, atol, impl="triton")


@interp
def test_triton_paged_attention_strided_q_and_empty_sequence() -> None:
    # q sliced from a fused qkv projection; a sequence with no query tokens (a padded batch slot) is skipped.
    batch = make_batch([(4, 10), (0, 0), (1, 20)], 4, 2, 32, 16, torch.float32)
    qkv = torch.randn(5, 8, 32)
    qkv[:, :4] = batch["q"]
    batch["q"] = qkv[:, :4]
    check_attention(batch, 1e-5, impl="triton")


@interp
@pytest.mark.parametrize("num_splits", [None, 4])
def test_triton_paged_attention_padded_as_a_mixed_cuda_graph(num_splits: int | None) -> None:
    # A mixed graph's launch: more query rows than tokens (rows past the last sequence belong to none),
    # empty sequences after the real ones, max_query_len the padded token count: the real rows unchanged.
    real = make_batch([(1, 40), (9, 9), (1, 3), (5, 30)], 4, 2, 32, 16, torch.float32)
    padded = dict(real)
    n, extra_seqs, extra_rows = real["q"].shape[0], 3, 13
    padded["q"] = torch.cat([real["q"], torch.randn(extra_rows, 4, 32)])
    padded["seq_lens"] = torch.cat([real["seq_lens"], torch.zeros(extra_seqs, dtype=torch.int32)])
    padded["query_start_loc"] = torch.cat([real["query_start_loc"],
                                           torch.full((extra_seqs,), n, dtype=torch.int32)])
    padded["block_tables"] = torch.cat([real["block_tables"], real["block_tables"][:extra_seqs]])
    padded["max_query_len"] = n + extra_rows
    out = ops.paged_attention(**padded, impl="triton", num_splits=num_splits)
    torch.testing.assert_close(out[:n], reference_attention(real), atol=1e-5, rtol=0)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_store_kv(dtype: torch.dtype) -> None:
    num_blocks, block_size, kv_heads, head_dim = 6, 16, 3, 32
    k_cache, v_cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim).to(dtype)
    key, value = torch.randn(2, 10, kv_heads, head_dim).to(dtype)
    slots = torch.randperm(num_blocks * block_size)[:10]
    slots[[2, 7]] = -1  # padding tokens
    caches = [(k_cache.clone(), v_cache.clone()) for _ in range(2)]
    ops.store_kv(key, value, *caches[0], slots, impl="triton")
    ref.store_kv(key, value, *caches[1], slots)
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_rms_norm(dtype: torch.dtype) -> None:
    x, residual = torch.randn(2, 5, 3, 200).to(dtype)
    weight = torch.randn(200).to(dtype)
    tol = dict(atol=1e-5, rtol=2e-3)  # fp32 sums in another order: one fp16 ulp
    out = ops.rms_norm(x, weight, 1e-6, impl="triton")
    torch.testing.assert_close(out, ref.rms_norm(x, weight, 1e-6), **tol)
    out, new_residual = ops.rms_norm(x, weight, 1e-6, residual, impl="triton")
    expected, expected_residual = ref.rms_norm(x, weight, 1e-6, residual)
    torch.testing.assert_close(out, expected, **tol)
    assert torch.equal(new_residual, expected_residual)


@interp
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("rot_factor", [1.0, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_rotary(is_neox: bool, rot_factor: float, dtype: torch.dtype) -> None:
    num_tokens, heads, kv_heads, head_dim = 7, 4, 2, 32
    cache = build_cos_sin_cache(head_dim, 64, 10000.0, {"partial_rotary_factor": rot_factor}, dtype)
    positions = torch.randint(0, 64, (num_tokens,))
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim).to(dtype)
    expected_qkv = qkv.clone()
    q_end, k_end = heads * head_dim, (heads + kv_heads) * head_dim
    q, k = qkv[:, :q_end].view(num_tokens, heads, head_dim), qkv[:, q_end:k_end]  # both layouts
    ops.apply_rotary(positions, q, k, cache, head_dim, is_neox, impl="triton")
    expected_q, expected_k = expected_qkv[:, :q_end], expected_qkv[:, q_end:k_end]
    ref.apply_rotary(positions, expected_q, expected_k, cache, head_dim, is_neox)
    torch.testing.assert_close(qkv, expected_qkv)


@interp
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("rot_factor", [1.0, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_rotary_store_kv(is_neox: bool, rot_factor: float, dtype: torch.dtype) -> None:
    # q, k, v are views of one fused qkv projection; two padding tokens (slot -1) rotate but write nothing.
    num_tokens, heads, kv_heads, head_dim, num_blocks, block_size = 7, 4, 2, 32, 3, 4
    cache = build_cos_sin_cache(head_dim, 64, 10000.0, {"partial_rotary_factor": rot_factor}, dtype)
    positions = torch.randint(0, 64, (num_tokens,))
    slots = torch.randperm(num_blocks * block_size)[:num_tokens]
    slots[[1, 5]] = -1
    qkv = torch.randn(num_tokens, heads + 2 * kv_heads, head_dim).to(dtype)
    caches = torch.randn(2, num_blocks, block_size, kv_heads, head_dim).to(dtype)
    expected_qkv, expected_caches = qkv.clone(), caches.clone()
    got_q, got_k = ops.rotary_store_kv(positions, *qkv.split([heads, kv_heads, kv_heads], dim=1), cache,
                                           *caches, slots, is_neox, impl="triton")
    ref.rotary_store_kv(positions, *expected_qkv.split([heads, kv_heads, kv_heads], dim=1), cache,
                        *expected_caches, slots, is_neox)
    assert got_q.data_ptr() == qkv.data_ptr() and got_k.data_ptr() == qkv[:, heads].data_ptr()
    torch.testing.assert_close(qkv, expected_qkv)
    torch.testing.assert_close(caches, expected_caches)
    # What the kernel wrote to the cache is exactly the k it left in place.
    written = slots >= 0
    blocks, offsets = slots[written] // block_size, slots[written] % block_size
    assert torch.equal(caches[0][blocks, offsets], qkv[written, heads:heads + kv_heads])


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_silu_and_mul(dtype: torch.dtype) -> None:
    x = torch.randn(3, 4, 2 * 1100).to(dtype)  # more than one column block
    torch.testing.assert_close(ops.silu_and_mul(x, impl="triton"), ref.silu_and_mul(x))


@interp
@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_skinny_linear(rows: int, bias: bool, dtype: torch.dtype) -> None:
    # N and K off the tile sizes, so both edges are masked; half precision in, fp32 accumulation.
    x, w = torch.randn(rows, 300).to(dtype), (torch.randn(40, 300) / 300**0.5).to(dtype)
    b = torch.randn(40).to(dtype) if bias else None
    expected = F.linear(x.float(), w.float(), None if b is None else b.float())
    torch.testing.assert_close(ops.linear(x, w, b, impl="triton").float(), expected, atol=2e-2, rtol=1e-2)


@interp
@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_skinny_linear_swiglu(rows: int, dtype: torch.dtype) -> None:
    # I = 40 gate rows over 32-wide output slabs (the second masked), K = 300 (a masked tile): the fused
    # SwiGLU rounds as the unfused ops do, so it equals them up to the projection's summation order.
    x, w = torch.randn(rows, 300).to(dtype), (torch.randn(80, 300) / 300**0.5).to(dtype)
    fused = ops.linear(x, w, impl="triton", swiglu=True)
    assert fused.shape == (rows, 40) and fused.dtype == dtype
    unfused = ops.silu_and_mul(ops.linear(x, w, impl="triton"), impl="triton")
    torch.testing.assert_close(fused, unfused, atol=2e-2, rtol=1e-2)
    expected = ref.silu_and_mul(F.linear(x.float(), w.float()))
    torch.testing.assert_close(fused.float(), expected, atol=3e-2, rtol=2e-2)


def qkv_rotary_case(rows: int, dtype: torch.dtype, device: str, heads: tuple[int, int, int], hidden: int,
                    bias: bool) -> tuple:
    """x, weight, bias, cos/sin cache, positions, slots (rows 1, 4, ...: padding) and zeroed k/v caches
    (views of one tensor, as the model runner's) for a qkv projection of heads (num q, num kv, head_dim)."""
    nq, nkv, hd = heads
    n = (nq + 2 * nkv) * hd
    x = torch.randn(rows, hidden, device=device).to(dtype)
    w = (torch.randn(n, hidden, device=device) / hidden**0.5).to(dtype)
    b = torch.randn(n, device=device).to(dtype) if bias else None
    cos_sin = build_cos_sin_cache(hd, 512, 10000.0, None, dtype).to(device)
    positions = torch.randint(0, 512, (rows,), device=device)
    slots = torch.randperm(4 * 16, device=device)[:rows]
    slots[1::3] = -1
    caches = torch.zeros(2, 4, 16, nkv, hd, device=device, dtype=dtype)
    return x, w, b, cos_sin, positions, slots, caches


@interp
@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_linear_rotary_store_kv(rows: int, bias: bool, dtype: torch.dtype) -> None:
    # 4 q heads and 2 kv heads of 64 dims (32 pairs a head: two 16-pair program halves each), Qwen2's bias:
    # the fused epilogue rounds as the projection and rotary_store_kv do, so it equals them up to the last
    # bit of the projection's sums (numpy's matmul under the interpreter sums column sets differently).
    x, w, b, cos_sin, positions, slots, caches = qkv_rotary_case(rows, dtype, "cpu", (4, 2, 64), 96, bias)
    fused_caches, unfused_caches = caches.clone(), caches.clone()
    rope = ops.RotaryStoreKV(positions, cos_sin, *fused_caches, slots, 4, 2, 64)
    fused = ops.linear_rotary_store_kv(x, w, b, rope, impl="triton")
    unfused = ops.linear(x, w, b, impl="triton")
    q, k, v = unfused.view(rows, 8, 64).split([4, 2, 2], dim=1)
    ops.rotary_store_kv(positions, q, k, v, cos_sin, *unfused_caches, slots, impl="triton")
    assert fused.shape == (rows, 8 * 64)
    torch.testing.assert_close(fused, unfused, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(fused_caches, unfused_caches, atol=1e-2, rtol=1e-2)
    assert fused_caches.abs().sum() > 0


def test_linear_rotary_store_kv_falls_back_on_cpu() -> None:
    # The CPU engine's path: F.linear, then the reference rotary and KV write.
    x, w, b, cos_sin, positions, slots, caches = qkv_rotary_case(3, torch.float32, "cpu", (4, 2, 64), 96,
                                                                 bias=True)
    expected_caches = caches.clone()
    qkv = ops.linear_rotary_store_kv(x, w, b, ops.RotaryStoreKV(positions, cos_sin, *caches, slots,
                                                                        4, 2, 64))
    expected = F.linear(x, w, b)
    q, k, v = expected.view(3, 8, 64).split([4, 2, 2], dim=1)
    ref.rotary_store_kv(positions, q, k, v, cos_sin, *expected_caches, slots)
    assert torch.equal(qkv, expected) and torch.equal(caches, expected_caches)


def test_linear_swiglu_falls_back_to_unfused_ops() -> None:
    # The CPU engine's path, prefill-sized batches and fp32: F.linear then silu_and_mul.
    for x in (torch.randn(3, 8).bfloat16(), torch.randn(40, 8).bfloat16(), torch.randn(2, 8)):
        w = torch.randn(6, 8).to(x.dtype)
        assert torch.equal(ops.linear(x, w, swiglu=True), ref.silu_and_mul(F.linear(x, w)))


def test_linear_keeps_cublas_for_many_rows_and_fp32() -> None:
    x, w = torch.randn(17, 8), torch.randn(4, 8)
    assert torch.equal(ops.linear(x, w), F.linear(x, w))


def test_fused_linear_and_norm_references_on_cpu() -> None:
    # The torch paths (the CPU engine's) of the fused ops: unfused semantics, plain tensors out.
    x, w = torch.randn(3, 8).bfloat16(), torch.randn(4, 8).bfloat16()
    assert torch.equal(ops.linear(x, w, split_k=True), F.linear(x, w))
    partials, residual, weight = torch.randn(4, 3, 8), torch.randn(3, 8).bfloat16(), torch.randn(8).bfloat16()
    split = SplitK(partials, torch.bfloat16, torch.Size((3, 8)))
    expected = ref.rms_norm(partials.sum(0).bfloat16(), weight, 1e-6, residual)
    for got, want in zip(ops.rms_norm(split, weight, 1e-6, residual), expected):
        assert torch.equal(got, want)


@interp
@pytest.mark.parametrize("splits", SPLITS)
@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_split_k_linear_into_rms_norm(dtype: torch.dtype, rows: int, splits: int,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # K = 300: 3 tiles of 128, the last masked, split 2 + 1; N = 40: a masked column slab.
    force_split_k(monkeypatch, splits)
    n, k = 40, 300
    x = torch.randn(rows, k).to(dtype)
    w = (torch.randn(n, k) / k**0.5).to(dtype)
    norm_w, residual = torch.randn(n).to(dtype), torch.randn(rows, n).to(dtype)
    out = ops.linear(x, w, impl="triton", split_k=True)
    assert isinstance(out, SplitK) and out.partials.shape == (splits, rows, n)
    assert out.dtype == dtype and out.shape == (rows, n)
    # Each split holds the product over its own whole K tiles.
    inp = x.float()
    span = triton.cdiv(triton.cdiv(k, 128), splits) * 128
    for s in range(splits):
        lo, hi = min(s * span, k), min((s + 1) * span, k)
        expected = inp[:, lo:hi] @ w[:, lo:hi].float().T
        torch.testing.assert_close(out.partials[s], expected, atol=1e-4, rtol=1e-4)
    # The norm's reduction equals the unsplit kernel's output, exactly with one split.
    plain = ops.linear(x, w, impl="triton")
    got = ops.rms_norm(out, norm_w, 1e-6, residual, impl="triton")
    expected = ops.rms_norm(plain, norm_w, 1e-6, residual, impl="triton")
    if splits == 1:
        assert torch.equal(out.reduce(), plain)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
    else:
        torch.testing.assert_close(out.reduce(), plain)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
    for a, b in zip(got, ops.rms_norm(out, norm_w, 1e-6, residual, impl="torch")):
        torch.testing.assert_close(a, b)
    assert ops.rms_norm(out, norm_w, 1e-6, impl="triton").shape == (rows, n)


@interp
def test_triton_split_k_falls_back_to_a_tensor() -> None:
    # Prefill-sized batches, fp32 models and layers with a bias return a plain tensor.
    w, b = torch.randn(8, 16).half(), torch.randn(8).half()
    cases = [(torch.randn(17, 16).half(), None), (torch.randn(2, 16), None), (torch.randn(2, 16).half(), b)]
    for x, bias in cases:
        out = ops.linear(x, w.to(x.dtype), bias, impl="triton", split_k=True)
        expected = F.linear(x.float(), w.float(), None if bias is None else bias.float())
        assert isinstance(out, torch.Tensor) and out.dtype == x.dtype
        torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=1e-2)



# --- quantized: int4 (AWQ, GPTQ) and fp8 weights, the fp8 KV cache ---


def fp8_caches(num_blocks: int, block_size: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    return torch.zeros(2, num_blocks, block_size, kv_heads, head_dim, dtype=torch.float8_e4m3fn)


def bytes_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def autoawq_pack(intweight: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's WQLinear_GEMM.from_linear packing loop of intweight [K, N], as written there."""
    qweight = torch.zeros(intweight.shape[0], intweight.shape[1] // 8, dtype=torch.int32)
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    for col in range(intweight.shape[1] // 8):
        for i in range(8):
            qweight[:, col] |= intweight[:, col * 8 + order_map[i]] << (i * 4)
    return qweight


def autogptq_pack(intweight: torch.Tensor) -> torch.Tensor:
    """AutoGPTQ's QuantLinear.pack loop over rows of intweight [K, N] (4 bits), as written there."""
    qweight = torch.zeros(intweight.shape[0] // 8, intweight.shape[1], dtype=torch.int32)
    i = row = 0
    while row < qweight.shape[0]:
        for j in range(i, i + 8):
            qweight[row] |= intweight[j] << (4 * (j - i))
        i += 8
        row += 1
    return qweight


@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
def test_int4_packing_round_trips_and_matches_the_quantizers(sym: bool) -> None:
    torch.manual_seed(0)
    weight = torch.randn(48, 128) * 0.1  # N = 48 outputs, K = 128 inputs, 4 groups of 32
    q, zeros, scales = ql.quantize_int4(weight, 32, sym=sym)
    assert q.shape == (128, 48) and zeros.shape == scales.shape == (4, 48) and scales.dtype == torch.float16
    assert 0 <= q.min() and q.max() <= 15 and 0 <= zeros.min() and zeros.max() <= 15
    qweight, qzeros = ql.pack_awq(q, zeros)
    assert torch.equal(qweight, autoawq_pack(q)) and torch.equal(qzeros, autoawq_pack(zeros))
    assert all(torch.equal(a, b) for a, b in zip(ql.unpack_awq(qweight, qzeros), (q, zeros)))
    for offset in (1, 0):  # the older GPTQ format (qzeros hold z - 1), gptq_v2 and our runtime layout
        qweight, qzeros = ql.pack_gptq(q, zeros, offset)
        assert torch.equal(qweight, autogptq_pack(q))
        assert all(torch.equal(a, b) for a, b in zip(ql.unpack_gptq(qweight, qzeros, offset), (q, zeros)))
        w = ql.dequantize_int4(qweight, qzeros, scales, offset)
        expected = (q - zeros.repeat_interleave(32, 0)).float() * scales.float().repeat_interleave(32, 0)
        assert torch.equal(w, expected)
    # Round to nearest: within half a step of its group's scale, but for the values at a group's ends,
    # which the rounded zero point (or sym's 8 steps down, 7 up) can clip by one step.
    error = (w - weight.t()).abs() / scales.float().repeat_interleave(32, 0)
    assert error.max() <= 1.0 + 1e-4 and (error > 0.5 + 1e-4).float().mean() < 0.05


def test_gptq_zero_point_zero_reads_back_as_sixteen() -> None:
    # The older format's known limit: z = 0 is stored as -1 & 0xF = 15 and read as 16 (as vLLM reads it).
    q, zeros = torch.zeros(32, 8, dtype=torch.int32), torch.zeros(1, 8, dtype=torch.int32)
    assert (ql.unpack_gptq(*ql.pack_gptq(q, zeros))[1] == 16).all()


def test_int4_and_fp8_linear_run_their_references_on_cpu() -> None:
    torch.manual_seed(0)
    weight, x, bias = torch.randn(48, 64) * 0.1, torch.randn(3, 2, 64), torch.randn(48)
    q, zeros, scales = ql.quantize_int4(weight, 32, scale_dtype=torch.float32)
    qweight, qzeros = ql.pack_gptq(q, zeros, 0)
    w = ql.dequantize_int4(qweight, qzeros, scales, 0)
    assert torch.equal(ops.int4_linear(x, qweight, qzeros, scales, bias), F.linear(x, w.t(), bias))
    wq, w_scale = ql.quantize_fp8(weight)
    assert wq.dtype == torch.float8_e4m3fn and w_scale.shape == (48, 1)
    dequantized = wq.float() * w_scale
    assert torch.equal(ops.fp8_linear(x, wq, w_scale, bias), F.linear(x, dequantized, bias))
    # e4m3 keeps 3 mantissa bits: each weight within 2^-4 of itself (relative), the smallest of a row
    # within half the row's subnormal step.
    assert ((dequantized - weight).abs() <= weight.abs() / 16 + w_scale * 2**-10).all()


@interp
@pytest.mark.parametrize("rows", [1, 5, 16, 40])  # decode candidates up to 16 rows, prefill ones above
@pytest.mark.parametrize("group,offset", [(32, 1), (64, 0), (128, 0)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_int4_linear(rows: int, group: int, offset: int, dtype: torch.dtype) -> None:
    # N = 40: a masked column tile; K = 256: several K tiles per group and several groups.
    torch.manual_seed(rows)
    weight = torch.randn(40, 256) * 0.1
    q, zeros, scales = ql.quantize_int4(weight, group, sym=offset == 1, scale_dtype=dtype)
    qweight, qzeros = ql.pack_gptq(q, zeros, offset)
    x, bias = torch.randn(rows, 256).to(dtype), torch.randn(40).to(dtype)
    for b in (None, bias):
        out = ops.int4_linear(x, qweight, qzeros, scales, b, offset, impl="triton")
        assert out.shape == (rows, 40) and out.dtype == dtype
        w = ql.dequantize_int4(qweight, qzeros, scales, offset).to(dtype).float()
        expected = F.linear(x.float(), w.t(), None if b is None else b.float())
        torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=1e-2)


@interp
def test_triton_int4_linear_refuses_a_group_off_the_k_tile() -> None:
    q, zeros, scales = ql.quantize_int4(torch.randn(8, 48), 16)
    with pytest.raises(ValueError, match="group size 16 is not a multiple of 32"):
        ops.int4_linear(torch.randn(1, 48).half(), *ql.pack_gptq(q, zeros, 0), scales, impl="triton")


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_quantize_fp8(dtype: torch.dtype) -> None:
    # Values that round up across a power of two, a row of zeros (the scale's floor) and a wide row.
    torch.manual_seed(0)
    x = (torch.randn(5, 300) * 3).to(dtype)
    x[2] = 0
    q, scale = quantize_fp8(x, impl="triton")
    expected_q, expected_scale = ql.quantize_fp8(x)
    assert torch.equal(scale, expected_scale) and bytes_equal(q, expected_q)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_store_kv_fp8(dtype: torch.dtype) -> None:
    # Scales of one and a power of two (exact division on any device); values past e4m3's 448 saturate.
    key, value = (torch.randn(2, 10, 3, 32) * 4).to(dtype)
    key[0, 0, 0] = 1000.0
    slots = torch.randperm(6 * 16)[:10]
    slots[[2, 7]] = -1
    for k_scale, v_scale in ((1.0, 1.0), (0.5, 4.0)):
        caches = [fp8_caches(6, 16, 3, 32) for _ in range(2)]
        ops.store_kv(key, value, *caches[0], slots, impl="triton", k_scale=k_scale, v_scale=v_scale)
        ref.store_kv(key, value, *caches[1], slots, k_scale, v_scale)
        assert bytes_equal(caches[0], caches[1])
        stored = caches[0][0].flatten(0, 1)[slots[0]].float() * k_scale
        assert stored[0, 0] == 448 * k_scale
        torch.testing.assert_close(stored[1:], key[0, 1:].float(), atol=0, rtol=2**-4)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_rotary_store_kv_fp8(dtype: torch.dtype) -> None:
    cos_sin = build_cos_sin_cache(32, 64, 10000.0, None, dtype)
    positions = torch.randint(0, 64, (9,))
    slots = torch.randperm(4 * 16)[:9]
    slots[3] = -1
    qkv = torch.randn(9, 8, 32).to(dtype)  # 4 q heads, 2 k heads, 2 v heads
    expected_qkv = qkv.clone()
    caches, expected_caches = fp8_caches(4, 16, 2, 32), fp8_caches(4, 16, 2, 32)
    ops.rotary_store_kv(positions, *qkv.split([4, 2, 2], dim=1), cos_sin, *caches, slots, impl="triton",
                        k_scale=0.5, v_scale=2.0)
    ref.rotary_store_kv(positions, *expected_qkv.split([4, 2, 2], dim=1), cos_sin, *expected_caches, slots,
                        k_scale=0.5, v_scale=2.0)
    torch.testing.assert_close(qkv, expected_qkv, atol=1e-3, rtol=1e-3)
    # Rotated keys may differ in their last bit (fp16), which moves an e4m3 rounding at most one step.
    torch.testing.assert_close(caches.float(), expected_caches.float(), atol=0, rtol=2**-3)


@interp
@pytest.mark.parametrize("rows", [1, 5])
def test_triton_linear_rotary_store_kv_fp8(rows: int) -> None:
    # The fused qkv projection's epilogue writes an fp8 cache as kernels.kv_write does.
    x, w, b, cos_sin, positions, slots, _ = qkv_rotary_case(rows, torch.bfloat16, "cpu", (4, 2, 64), 96,
                                                            bias=False)
    fused_caches, unfused_caches = fp8_caches(4, 16, 2, 64), fp8_caches(4, 16, 2, 64)
    rope = ops.RotaryStoreKV(positions, cos_sin, *fused_caches, slots, 4, 2, 64, k_scale=0.5, v_scale=2.0)
    assert rope.fusable(x)
    fused = ops.linear_rotary_store_kv(x, w, b, rope, impl="triton")
    unfused = ops.linear(x, w, b, impl="triton")
    rope_unfused = ops.RotaryStoreKV(positions, cos_sin, *unfused_caches, slots, 4, 2, 64, 0.5, 2.0)
    rope_unfused.store(unfused, impl="triton")
    torch.testing.assert_close(fused, unfused, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(fused_caches.float(), unfused_caches.float(), atol=0, rtol=2**-3)
    assert fused_caches.float().abs().sum() > 0


def fp8_attention_batch(seqs: list[tuple[int, int]], dtype: torch.dtype, k_scale: float,
                        v_scale: float) -> tuple[dict, dict]:
    """An attention batch with fp8 caches holding its keys / k_scale and values / v_scale, and the same batch
    with the caches dequantized (what the fp8 kernels must compute with)."""
    batch = make_batch(seqs, 4, 2, 32, 16, dtype, seed=1)
    quantized = dict(batch, k_cache=ql.quantize_kv(batch["k_cache"] * 3, ql.FP8, k_scale),
                     v_cache=ql.quantize_kv(batch["v_cache"], ql.FP8, v_scale))
    dequantized = dict(batch, k_cache=ql.dequantize_kv(quantized["k_cache"], k_scale, dtype),
                       v_cache=ql.dequantize_kv(quantized["v_cache"], v_scale, dtype))
    return quantized, dequantized


def test_reference_attention_fp8_is_attention_over_the_dequantized_cache() -> None:
    quantized, dequantized = fp8_attention_batch([(5, 40), (1, 17)], torch.bfloat16, 0.5, 2.0)
    keys = ("q", "k_cache", "v_cache", "block_tables", "seq_lens", "query_start_loc", "scale")
    got = ref.paged_attention(*(quantized[k] for k in keys), k_scale=0.5, v_scale=2.0)
    assert torch.equal(got, reference_attention(dequantized))


@interp
@pytest.mark.parametrize("num_splits", [None, 4])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_triton_paged_attention_fp8(num_splits: int | None, dtype: torch.dtype, atol: float) -> None:
    quantized, dequantized = fp8_attention_batch([(1, 70), (23, 23), (1, 5), (9, 40)], dtype, 0.5, 2.0)
    out = ops.paged_attention(**quantized, impl="triton", num_splits=num_splits, k_scale=0.5, v_scale=2.0)
    torch.testing.assert_close(out.float(), reference_attention(dequantized).float(), atol=atol, rtol=0)


@interp
def test_triton_paged_attention_refuses_mismatched_caches() -> None:
    batch = make_batch([(1, 20)], 4, 2, 32, 16, torch.float16)
    batch["v_cache"] = batch["v_cache"].to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="need one dtype"):
        ops.paged_attention(**batch, impl="triton")


# --- multi-LoRA: each row's adapter added to a projection (SGMV shrink and expand) ---

def lora_case(slots: list[int], num_tables: int, rank: int, slices: tuple[int, ...], k: int,
              dtype: torch.dtype, device: str = "cpu") -> tuple:
    """y, x, lora_a, lora_b and the LoRAIndices of rows whose adapter slots are `slots` (0: none), for a
    projection of k inputs and sum(slices) outputs made of those slices."""
    gen = torch.Generator().manual_seed(len(slots) + rank)
    n = sum(slices)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    y, x = randn(len(slots), n), randn(len(slots), k)
    lora_a = randn(num_tables, len(slices) * rank, k, scale=k ** -0.5)
    lora_b = randn(num_tables, n, rank, scale=rank ** -0.5)
    token_slots = torch.tensor(slots)
    counts = torch.bincount(token_slots, minlength=num_tables + 1)
    indices = ops.LoRAIndices(
        torch.argsort(token_slots, stable=True).to(device=device, dtype=torch.int32),
        torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(device=device, dtype=torch.int32),
        int(counts[1:].max()))
    starts = tuple(itertools.accumulate(slices[:-1], initial=0))
    return y, x, lora_a, lora_b, indices, starts


def per_row_lora(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                 slots: list[int], starts: tuple[int, ...]) -> torch.Tensor:
    """The update row by row, in fp64: y[t] + concat over slices s of (x[t] A_s^T) B_s^T."""
    out, rank, bounds = y.double().clone(), lora_b.shape[-1], [*starts, y.shape[-1]]
    for t, slot in enumerate(slots):
        if slot:
            a, b = lora_a[slot - 1].double(), lora_b[slot - 1].double()
            for s, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
                out[t, lo:hi] += (x[t].double() @ a[s * rank:(s + 1) * rank].T) @ b[lo:hi].T
    return out


LORA_CASES = {  # name: (slot of each row, adapter tables, rank, slices, K)
    "decode_qkv": ([2, 0, 1, 2, 3], 3, 16, (64, 32, 32), 300),  # split-K shrink; a slot with no rows
    "prefill_gate_up": ([1] * 30 + [0] * 7 + [2] * 45, 2, 32, (96, 96), 130),  # 64-row blocks, two of slot 2
    "down": ([0, 1, 0, 1], 1, 16, (72,), 200),
}


@pytest.mark.parametrize("case", LORA_CASES)
def test_lora_reference_is_the_per_row_update(case: str) -> None:
    slots, tables, rank, slices, k = LORA_CASES[case]
    y, x, lora_a, lora_b, indices, starts = lora_case(slots, tables, rank, slices, k, torch.float32)
    expected = per_row_lora(y, x, lora_a, lora_b, slots, starts)
    ops.add_lora(y, x, lora_a, lora_b, indices, starts)
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)


def test_lora_rows_without_an_adapter_are_left_as_they_are() -> None:
    y, x, lora_a, lora_b, indices, starts = lora_case([0, 0, 0], 2, 16, (40,), 64, torch.float32)
    before = y.clone()
    ops.add_lora(y, x, lora_a, lora_b, indices, starts)
    assert indices.max_rows == 0 and torch.equal(y, before)


@interp
@pytest.mark.parametrize("case", LORA_CASES)
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float16, 2e-2)], ids=["fp32", "fp16"])
def test_triton_add_lora(case: str, dtype: torch.dtype, atol: float) -> None:
    slots, tables, rank, slices, k = LORA_CASES[case]
    y, x, lora_a, lora_b, indices, starts = lora_case(slots, tables, rank, slices, k, dtype)
    expected = y.clone()
    ref.add_lora(expected, x, lora_a, lora_b, indices.sorted_rows, indices.slot_starts, starts)
    ops.add_lora(y, x, lora_a, lora_b, indices, starts, impl="triton")
    torch.testing.assert_close(y, expected, atol=atol, rtol=atol)


# --- real shapes on the GPU ---

MODELS = {"llama2_7b": (32, 32, 128), "qwen3_0.6b": (16, 8, 128)}  # num_heads, num_kv_heads, head_dim


GPU_ATTENTION_CASES = [  # dtype, atol, block_size, num_splits (None: default_num_splits)
    (torch.bfloat16, 2e-2, 16, None), (torch.bfloat16, 2e-2, 64, 8), (torch.float16, 2e-2, 16, 8),
    (torch.float16, 2e-2, 32, None), (torch.float32, 1e-3, 16, None),
]


@gpu
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("dtype,atol,block_size,num_splits", GPU_ATTENTION_CASES)
def test_gpu_paged_attention_mixed(model: str, dtype: torch.dtype, atol: float, block_size: int,
                                   num_splits: int | None) -> None:
    seqs = [(1, 1500), (1, 17), (300, 300), (1, 4000), (250, 2300), (1, 129), (77, 77)]
    batch = make_batch(seqs, *MODELS[model], block_size, dtype, device="cuda")
    check_attention(batch, atol, num_splits=num_splits)


@gpu
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_long_decode_uses_split_k(model: str, dtype: torch.dtype) -> None:
    batch = make_batch([(1, 8000), (1, 3001)], *MODELS[model], 16, dtype, device="cuda")
    assert default_num_splits(2, MODELS[model][1], batch["max_seq_len"]) > 1
    check_attention(batch, 2e-2)


@gpu
def test_gpu_decode_replays_in_cuda_graph() -> None:
    # Captured once, replayed with other context lengths (the block tables cover the longest): no host sync.
    batch = make_batch([(1, 1000)] * 4, *MODELS["qwen3_0.6b"], 16, torch.bfloat16, device="cuda")
    ops.paged_attention(**batch)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.paged_attention(**batch)
    batch["seq_lens"].copy_(torch.tensor([1, 500, 999, 64]))
    graph.replay()
    torch.testing.assert_close(out.float(), reference_attention(batch).float(), atol=2e-2, rtol=0)


@gpu
@pytest.mark.parametrize("impl", ["triton", "compile"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_elementwise(impl: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x, residual = torch.randn(2, 300, 4096, device="cuda", dtype=dtype)
    weight = torch.randn(4096, device="cuda", dtype=dtype)
    out, new_residual = ops.rms_norm(x, weight, 1e-6, residual, impl=impl)
    expected, expected_residual = ref.rms_norm(x, weight, 1e-6, residual)
    torch.testing.assert_close(out, expected, atol=5e-2, rtol=1e-2)
    torch.testing.assert_close(new_residual, expected_residual)
    gate_up = torch.randn(300, 2 * 11008, device="cuda", dtype=dtype)
    torch.testing.assert_close(ops.silu_and_mul(gate_up, impl=impl), ref.silu_and_mul(gate_up),
                               atol=2e-2, rtol=1e-2)
    cache = build_cos_sin_cache(128, 8192, 500000.0, LLAMA3_SCALING, dtype).cuda()
    positions = torch.randint(0, 8192, (300,), device="cuda")
    qkv = torch.randn(300, (32 + 2 * 8) * 128, device="cuda", dtype=dtype)
    expected_qkv = qkv.clone()
    ops.apply_rotary(positions, qkv[:, :4096], qkv[:, 4096:5120], cache, 128, impl=impl)
    ref.apply_rotary(positions, expected_qkv[:, :4096], expected_qkv[:, 4096:5120], cache, 128)
    torch.testing.assert_close(qkv, expected_qkv, atol=2e-2, rtol=1e-2)


@gpu
@pytest.mark.parametrize("rows", [1, 8, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_skinny_linear(rows: int, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    for n, k in [(12288, 4096), (4096, 11008), (151936, 1024)]:
        x, w = torch.randn(rows, k, device="cuda", dtype=dtype), torch.randn(n, k, device="cuda", dtype=dtype)
        expected = x.float() @ w.float().T
        torch.testing.assert_close(ops.linear(x, w).float(), expected, atol=0.5, rtol=2e-2)


@gpu
@pytest.mark.parametrize("rows", [1, 9, 300])  # decode groups (split-K shrink) and a prefill
@pytest.mark.parametrize("rank", [16, 64])
def test_gpu_add_lora(rows: int, rank: int) -> None:
    # Llama-2-7B's q/k/v (three slices), gate/up (two) and down projections, bf16, four adapter slots.
    slots = [(3 * t + 1) % 5 for t in range(rows)]  # every slot, and rows without an adapter
    for slices, k in [((4096,) * 3, 4096), ((11008,) * 2, 4096), ((4096,), 11008)]:
        y, x, lora_a, lora_b, indices, starts = lora_case(slots, 4, rank, slices, k, torch.bfloat16, "cuda")
        expected = y.clone()
        ref.add_lora(expected, x, lora_a, lora_b, indices.sorted_rows, indices.slot_starts, starts)
        ops.add_lora(y, x, lora_a, lora_b, indices, starts)
        torch.testing.assert_close(y.float(), expected.float(), atol=3e-2, rtol=2e-2)


@gpu
@pytest.mark.parametrize("rows", [1, 8, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_skinny_linear_swiglu(rows: int, dtype: torch.dtype) -> None:
    # Llama-2-7B's and Qwen3-0.6B's gate_up_proj: the fused SwiGLU against the unfused kernels.
    torch.manual_seed(0)
    for n, k in [(22016, 4096), (6144, 1024)]:
        x = torch.randn(rows, k, device="cuda", dtype=dtype)
        w = torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5
        unfused = ops.silu_and_mul(ops.linear(x, w))
        torch.testing.assert_close(ops.linear(x, w, swiglu=True), unfused, atol=2e-2, rtol=2e-2)


@gpu
@pytest.mark.parametrize("rows", [1, 8, 16])
@pytest.mark.parametrize("heads", [(32, 32, 128), (32, 8, 128), (16, 8, 64)],
                         ids=["llama2", "llama3", "head_dim64"])
def test_gpu_linear_rotary_store_kv(rows: int, heads: tuple[int, int, int]) -> None:
    # The fused qkv projection + rotary + KV write against the unfused kernels, on real shapes.
    torch.manual_seed(0)
    x, w, b, cos_sin, positions, slots, caches = qkv_rotary_case(rows, torch.bfloat16, "cuda", heads, 4096,
                                                                 bias=False)
    fused_caches, unfused_caches = caches.clone(), caches.clone()
    rope = ops.RotaryStoreKV(positions, cos_sin, *fused_caches, slots, *heads)
    fused = ops.linear_rotary_store_kv(x, w, b, rope)
    unfused = ops.linear(x, w, b)
    nq, nkv, hd = heads
    q, k, v = unfused.view(rows, -1, hd).split([nq, nkv, nkv], dim=1)
    ops.rotary_store_kv(positions, q, k, v, cos_sin, *unfused_caches, slots)
    torch.testing.assert_close(fused, unfused, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(fused_caches, unfused_caches, atol=2e-2, rtol=2e-2)


@gpu
def test_gpu_store_kv() -> None:
    k_cache, v_cache = torch.randn(2, 64, 16, 8, 128, device="cuda", dtype=torch.bfloat16)
    key, value = torch.randn(2, 500, 8, 128, device="cuda", dtype=torch.bfloat16)
    slots = torch.randperm(64 * 16, device="cuda")[:500]
    slots[::7] = -1
    caches = [(k_cache.clone(), v_cache.clone()) for _ in range(2)]
    ops.store_kv(key, value, *caches[0], slots)
    ref.store_kv(key, value, *caches[1], slots)
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])



@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_rotary_store_kv(dtype: torch.dtype) -> None:
    # Llama 3's 32 / 8 heads over a fused qkv projection, 500 tokens, every 7th a padding token.
    cache = build_cos_sin_cache(128, 8192, 500000.0, LLAMA3_SCALING, dtype).cuda()
    positions = torch.randint(0, 8192, (500,), device="cuda")
    slots = torch.randperm(64 * 16, device="cuda")[:500]
    slots[::7] = -1
    qkv = torch.randn(500, 48, 128, device="cuda", dtype=dtype)
    caches = torch.randn(2, 64, 16, 8, 128, device="cuda", dtype=dtype)
    expected_qkv, expected_caches = qkv.clone(), caches.clone()
    ops.rotary_store_kv(positions, *qkv.split([32, 8, 8], dim=1), cache, *caches, slots)
    ref.rotary_store_kv(positions, *expected_qkv.split([32, 8, 8], dim=1), cache, *expected_caches, slots)
    torch.testing.assert_close(qkv, expected_qkv, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(caches, expected_caches, atol=2e-2, rtol=1e-2)
    written = slots >= 0
    assert torch.equal(caches[0].flatten(0, 1)[slots[written]], qkv[written, 32:40])

@gpu
@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_split_k_linear_into_rms_norm(rows: int, dtype: torch.dtype) -> None:
    # Llama-2-7B's o_proj and down_proj, each split count against the unsplit kernel.
    torch.manual_seed(0)
    norm_w = torch.randn(4096, device="cuda", dtype=dtype)
    residual = torch.randn(rows, 4096, device="cuda", dtype=dtype)
    for k in (4096, 11008):
        x = torch.randn(rows, k, device="cuda", dtype=dtype)
        w = torch.randn(4096, k, device="cuda", dtype=dtype) / k**0.5
        plain = ops.linear(x, w)
        expected = ref.rms_norm(plain, norm_w, 1e-6, residual)
        tuned = ops.linear(x, w, split_k=True)
        assert isinstance(tuned, SplitK) and tuned.partials.shape[0] in SPLITS
        for splits in SPLITS:
            with pytest.MonkeyPatch.context() as mp:
                force_split_k(mp, splits)
                out = ops.linear(x, w, split_k=True)
            assert out.partials.shape == (splits, rows, 4096)
            torch.testing.assert_close(out.reduce(), plain, atol=2e-2, rtol=2e-2)
            for got, want in zip(ops.rms_norm(out, norm_w, 1e-6, residual), expected):
                torch.testing.assert_close(got, want, atol=5e-2, rtol=2e-2)


def tiny_llama(tmp_path: Path) -> ModelConfig:
    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 256,
              "intermediate_size": 688, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "max_position_embeddings": 256}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return ModelConfig.from_dir(tmp_path)


def reference_layers(model: LlamaModel, ids: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                     meta: AttentionMetadata, caches: torch.Tensor) -> torch.Tensor:
    """LlamaModel.forward unfused, on the torch references (separate rotary, KV write, SwiGLU and sums),
    with its own caches [layers, 2, blocks, block_size, kv heads, head_dim]."""
    h, residual = model.embed_tokens(ids), None
    n = ids.shape[0]
    for layer, (k_cache, v_cache) in zip(model.layers, caches):
        attn, mlp = layer.self_attn, layer.mlp
        norm = layer.input_layernorm
        h, residual = ((ref.rms_norm(h, norm.weight, norm.eps), h) if residual is None
                       else ref.rms_norm(h, norm.weight, norm.eps, residual))
        q, k, v = F.linear(h, attn.qkv_proj.weight).split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        ref.apply_rotary(positions, q, k, cos_sin, attn.head_dim)
        ref.store_kv(k.view(n, -1, attn.head_dim), v.view(n, -1, attn.head_dim), k_cache, v_cache,
                     meta.slot_mapping)
        o = ref.paged_attention(q.view(n, -1, attn.head_dim), k_cache, v_cache, meta.block_tables,
                                meta.seq_lens, meta.query_start_loc, attn.scale)
        h = F.linear(o.reshape(n, -1), attn.o_proj.weight)
        norm = layer.post_attention_layernorm
        h, residual = ref.rms_norm(h, norm.weight, norm.eps, residual)
        h = F.linear(ref.silu_and_mul(F.linear(h, mlp.gate_up_proj.weight)), mlp.down_proj.weight)
    return ref.rms_norm(h, model.norm.weight, model.norm.eps, residual)[0]


@gpu
@pytest.mark.parametrize("splits", [None, max(SPLITS)], ids=["tuned", "split-max"])
@pytest.mark.parametrize("batch", [1, 16])
def test_gpu_llama_layers_fused_match_reference(batch: int, splits: int | None, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # A 20-token prefill per sequence (cuBLAS), then one decode step (split-K o_proj and down_proj, reduced
    # in the norms) in a CUDA graph; rotary + KV write fused in both.
    if splits is not None:
        force_split_k(monkeypatch, splits)
    torch.manual_seed(0)
    cfg, prompt, block_size = tiny_llama(tmp_path), 20, 16
    model = LlamaModel(cfg).to(device="cuda", dtype=torch.bfloat16)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data.normal_(1.0, 0.2)
    cos_sin = build_cos_sin_cache(cfg.head_dim, 256, cfg.rope_theta, None, torch.bfloat16).cuda()
    blocks = 2  # per sequence: prompt + 1 token
    cache_shape = (batch * blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    fused = torch.zeros(cfg.num_layers, 2, *cache_shape, device="cuda", dtype=torch.bfloat16)
    unfused = fused.clone()
    for layer, (k_cache, v_cache) in zip(model.layers, fused):
        layer.self_attn.k_cache, layer.self_attn.v_cache = k_cache, v_cache
    tables = torch.arange(batch * blocks, device="cuda", dtype=torch.int32).view(batch, blocks)

    def step(start: int, length: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        pos = torch.arange(start, start + length, device="cuda").repeat(batch)
        seq = torch.arange(batch, device="cuda").repeat_interleave(length)
        slots = (tables[seq, pos // block_size] * block_size + pos % block_size).int()
        meta = AttentionMetadata(
            slot_mapping=slots, block_tables=tables,
            seq_lens=torch.full((batch,), start + length, device="cuda", dtype=torch.int32),
            query_start_loc=torch.arange(0, batch * length + 1, length, device="cuda", dtype=torch.int32),
            max_query_len=length, max_seq_len=start + length)
        ids = torch.randint(0, cfg.vocab_size, (batch * length,), device="cuda")
        return ids, pos, meta

    with torch.inference_mode():
        ids, pos, meta = step(0, prompt)
        expected = reference_layers(model, ids, pos, cos_sin, meta, unfused)
        torch.testing.assert_close(model(ids, pos, cos_sin, meta), expected, atol=5e-2, rtol=5e-2)
        ids, pos, meta = step(prompt, 1)
        x = torch.randn(batch, cfg.num_heads * cfg.head_dim, device="cuda", dtype=torch.bfloat16)
        assert isinstance(model.layers[0].self_attn.o_proj(x), SplitK)
        model(ids, pos, cos_sin, meta)  # tunes the kernels outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(ids, pos, cos_sin, meta)
        graph.replay()
        expected = reference_layers(model, ids, pos, cos_sin, meta, unfused)
    torch.testing.assert_close(out, expected, atol=5e-2, rtol=5e-2)
    assert (out.float() - expected.float()).abs().mean() < 5e-3
    torch.testing.assert_close(fused, unfused, atol=5e-2, rtol=5e-2)


@gpu
@pytest.mark.parametrize("rows", [1, 16, 17, 300])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_int4_linear(rows: int, dtype: torch.dtype) -> None:
    # Llama-2-7B's down_proj (K = 11008: 86 groups of 128) and gate_up_proj, AWQ's group size 128.
    torch.manual_seed(0)
    for n, k in ((4096, 11008), (22016, 4096)):
        q, zeros, scales = ql.quantize_int4(torch.randn(n, k, device="cuda") * 0.02, 128, scale_dtype=dtype)
        qweight, qzeros = ql.pack_gptq(q, zeros, 0)
        x = torch.randn(rows, k, device="cuda", dtype=dtype)
        out = ops.int4_linear(x, qweight, qzeros, scales)
        expected = ref.int4_linear(x, qweight, qzeros, scales, None, 0)
        torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)


def w8a8(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """What fp8_linear's W8A8 path computes: per-token e4m3 activations times the e4m3 weight, in fp32."""
    xq, x_scale = ql.quantize_fp8(x)
    return ((xq.float() * x_scale) @ (weight.float() * weight_scale).t()).to(x.dtype)


@gpu
@pytest.mark.parametrize("rows", [1, 16, 300])
def test_gpu_fp8_linear_w8a8(rows: int) -> None:
    torch.manual_seed(0)
    if not scaled_mm_supported(torch.empty(1, device="cuda", dtype=torch.bfloat16), torch.empty(16, 16)):
        pytest.skip("no fp8 tensor cores (compute capability < 8.9)")
    weight, bias = torch.randn(4096, 4096, device="cuda") * 0.02, torch.randn(4096, device="cuda")
    wq, w_scale = ql.quantize_fp8(weight)
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
    out = ops.fp8_linear(x, wq, w_scale, bias.bfloat16())
    torch.testing.assert_close(out, w8a8(x, wq, w_scale) + bias.bfloat16(), atol=3e-2, rtol=2e-2)
    # Against the unquantized layer: fp8's 3 mantissa bits on both operands.
    exact = F.linear(x.float(), weight, bias)
    assert (out.float() - exact).norm() / exact.norm() < 0.05
    q, scale = quantize_fp8(x)
    expected_q, expected_scale = ql.quantize_fp8(x)
    torch.testing.assert_close(scale, expected_scale)
    torch.testing.assert_close(q.float(), expected_q.float(), atol=0, rtol=2**-3)  # division rounding


@gpu
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("num_splits", [None, 8])
def test_gpu_paged_attention_fp8(model: str, num_splits: int | None) -> None:
    seqs = [(1, 1500), (1, 17), (300, 300), (1, 4000), (77, 77)]
    batch = make_batch(seqs, *MODELS[model], 16, torch.bfloat16, device="cuda")
    quantized = dict(batch, k_cache=ql.quantize_kv(batch["k_cache"], ql.FP8, 0.5),
                     v_cache=ql.quantize_kv(batch["v_cache"], ql.FP8, 1.0))
    dequantized = dict(batch, k_cache=ql.dequantize_kv(quantized["k_cache"], 0.5, torch.bfloat16),
                       v_cache=ql.dequantize_kv(quantized["v_cache"], 1.0, torch.bfloat16))
    out = ops.paged_attention(**quantized, num_splits=num_splits, k_scale=0.5)
    torch.testing.assert_close(out.float(), reference_attention(dequantized).float(), atol=2e-2, rtol=0)
    key, value = torch.randn(2, 500, MODELS[model][1], MODELS[model][2], device="cuda", dtype=torch.bfloat16)
    slots = torch.randperm(quantized["k_cache"].shape[0] * 16, device="cuda")[:500]
    caches = [(quantized["k_cache"].clone(), quantized["v_cache"].clone()) for _ in range(2)]
    ops.store_kv(key, value, *caches[0], slots, k_scale=0.5)
    ref.store_kv(key, value, *caches[1], slots, 0.5)
    for a, b in zip(caches[0], caches[1]):
        torch.testing.assert_close(a.float(), b.float(), atol=0, rtol=2**-3)  # division rounding
