"""Micro-benchmarks of kernels/ on one CUDA GPU, against the rooflines of that card as measured here.

    python benchmarks/kernels_bench.py [--sections check,decode,prefill,mixed,store_kv,elementwise,sweep]

Per model shape (Llama-2-7B, Qwen3-0.6B; bf16, block_size 16) it first checks the kernels against
kernels.reference on real shapes (exit code 1 on a mismatch), then times each kernel with
triton.testing.do_bench (median, L2 flushed) and prints GB/s and TFLOP/s against the card's copy bandwidth
and bf16 GEMM rate, measured at the start (benchmarks/card.py) and printed first.
Baselines: torch SDPA on contiguous K/V (attention), the torch reference and torch.compile (element-wise
ops; the faster of Triton and compile is printed as the kernels.dispatch.CUDA_BACKEND line to use). Writes
$OUT/kernels_bench.csv when OUT is set. The default sections take about 2 minutes on an H100; `sweep` (not
in the default, about 1-2 minutes more) times alternative attention tiles for kernels.attention.DECODE_TILE
and PREFILL_TILE.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from card import card
from servebench.kernels import attention, ops, reference
from servebench.kernels.attention import TileConfig
from servebench.kernels.rotary import build_cos_sin_cache
from triton.testing import do_bench

DEVICE = "cuda"
DTYPE = torch.bfloat16
BLOCK_SIZE = 16
MODELS = {  # num_heads, num_kv_heads, head_dim, hidden_size, intermediate_size
    "llama2_7b": (32, 32, 128, 4096, 11008),
    "qwen3_0.6b": (16, 8, 128, 1024, 3072),
}
DECODE_BATCHES, DECODE_CONTEXTS = (1, 8, 64, 256), (512, 2048, 8192)
SDPA_MAX_BYTES = 4 << 30  # the contiguous-KV baseline runs only where its copy of K/V stays this small
SWEEP_DECODE = [TileConfig(16, 32, 4, 2), TileConfig(16, 64, 4, 2), TileConfig(16, 64, 4, 3),
                TileConfig(16, 64, 8, 3), TileConfig(16, 128, 4, 2), TileConfig(16, 128, 8, 2)]
SWEEP_PREFILL = [TileConfig(128, 64, 8, 2), TileConfig(128, 64, 8, 3), TileConfig(128, 128, 8, 2),
                 TileConfig(64, 64, 4, 2), TileConfig(64, 128, 4, 3), TileConfig(128, 32, 4, 3)]
ELEMENTWISE_IMPLS = ("triton", "torch", "compile")
ROWS: list[dict] = []  # the CSV
TOTALS: dict[str, dict[str, float]] = {}  # element-wise op -> impl -> summed median ms


def bench(fn: Callable[[], object]) -> float:
    return do_bench(fn, warmup=10, rep=40, return_mode="median")


def record(section: str, kernel: str, model: str, impl: str, shape: str, ms: float, nbytes: float = 0.0,
           flops: float = 0.0, config: str = "") -> None:
    bw, fl = nbytes / ms * 1e3, flops / ms * 1e3
    peak_bw, peak_flops = card().copy_bytes_per_s, card().gemm_flops_per_s
    ROWS.append(dict(section=section, kernel=kernel, model=model, impl=impl, shape=shape, config=config,
                     ms=round(ms, 5), gbps=round(bw / 1e9, 1), tflops=round(fl / 1e12, 2),
                     pct_peak_bw=round(100 * bw / peak_bw, 1),
                     pct_peak_flops=round(100 * fl / peak_flops, 1)))
    roof = f"{bw / 1e9:7.0f} GB/s ({100 * bw / peak_bw:5.1f}%)" if nbytes else ""
    roof += f"  {fl / 1e12:6.1f} TFLOP/s ({100 * fl / peak_flops:5.1f}%)" if flops else ""
    print(f"  {kernel:15s} {model:10s} {impl:7s} {shape:22s} {config:16s} {ms * 1e3:9.1f} us  {roof}")


class PagedCache:
    """One model's paged KV cache, with batches carved out of it as shuffled blocks."""

    def __init__(self, model: str, num_tokens: int) -> None:
        self.model = model
        self.heads, self.kv_heads, self.head_dim, self.hidden, self.inter = MODELS[model]
        shape = (num_tokens // BLOCK_SIZE, BLOCK_SIZE, self.kv_heads, self.head_dim)
        self.k = torch.empty(shape, dtype=DTYPE, device=DEVICE).normal_()
        self.v = torch.empty(shape, dtype=DTYPE, device=DEVICE).normal_()

    def batch(self, seqs: list[tuple[int, int]]) -> dict:
        """paged_attention kwargs for sequences given as (query_len, seq_len)."""
        blocks = [-(-seq_len // BLOCK_SIZE) for _, seq_len in seqs]
        ids = torch.randperm(self.k.shape[0], device=DEVICE)[: sum(blocks)].int()
        tables = torch.zeros(len(seqs), max(blocks), dtype=torch.int32, device=DEVICE)
        for i, row in enumerate(ids.split(blocks)):
            tables[i, : len(row)] = row
        q_lens, seq_lens = [q for q, _ in seqs], [s for _, s in seqs]
        return dict(q=torch.randn(sum(q_lens), self.heads, self.head_dim, dtype=DTYPE, device=DEVICE),
                    k_cache=self.k, v_cache=self.v, block_tables=tables,
                    seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
                    query_start_loc=torch.tensor([0, *q_lens], device=DEVICE).cumsum(0).int(),
                    scale=self.head_dim ** -0.5, max_query_len=max(q_lens), max_seq_len=max(seq_lens))

    def bytes_and_flops(self, seqs: list[tuple[int, int]]) -> tuple[float, float]:
        elt = torch.finfo(DTYPE).bits // 8
        kv = sum(s for _, s in seqs) * self.kv_heads * self.head_dim * 2 * elt
        qo = sum(q for q, _ in seqs) * self.heads * self.head_dim * 2 * elt
        visible = sum(q * (s - q) + q * (q + 1) // 2 for q, s in seqs)  # keys seen, summed over query rows
        return kv + qo, 4 * self.heads * self.head_dim * visible


def sdpa_baseline(cache: PagedCache, seqs: list[tuple[int, int]]) -> Callable[[], object] | None:
    """SDPA on contiguous K/V of equal-length sequences (no paging): what a dense kernel achieves."""
    (q_len, seq_len), batch = seqs[0], len(seqs)
    kv_bytes = 2 * batch * seq_len * cache.kv_heads * cache.head_dim * 2
    if any(s != seqs[0] for s in seqs) or kv_bytes > SDPA_MAX_BYTES or q_len not in (1, seq_len):
        return None
    q = torch.randn(batch, cache.heads, q_len, cache.head_dim, dtype=DTYPE, device=DEVICE)
    k, v = torch.randn(2, batch, cache.kv_heads, seq_len, cache.head_dim, dtype=DTYPE, device=DEVICE)
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=q_len > 1, enable_gqa=True)


def time_attention(section: str, cache: PagedCache, seqs: list[tuple[int, int]], shape: str,
                   config: str = "", baseline: bool = True) -> float:
    batch = cache.batch(seqs)
    nbytes, flops = cache.bytes_and_flops(seqs)
    ms = bench(lambda: ops.paged_attention(**batch))
    splits = attention.default_num_splits(len(seqs), cache.kv_heads, batch["max_seq_len"])
    config = config or f"splits={splits}"
    record(section, "paged_attention", cache.model, "triton", shape, ms, nbytes, flops, config)
    sdpa = sdpa_baseline(cache, seqs) if baseline else None
    if sdpa is not None:
        ms_sdpa = bench(sdpa)
        record(section, "paged_attention", cache.model, "sdpa", shape, ms_sdpa, nbytes, flops, "contiguous")
    return ms


def check(cache: PagedCache) -> bool:
    print(f"{cache.model}: correctness on real shapes ({DTYPE}, vs kernels.reference)")
    errors = []

    def report(name: str, got: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
        err = (got.float() - expected.float()).abs().max().item()
        errors.append(err > atol)
        print(f"  {name:36s} max abs err {err:.2e}  {'FAIL' if err > atol else 'ok'}")

    keys = ("q", "k_cache", "v_cache", "block_tables", "seq_lens", "query_start_loc", "scale")
    mixed = [(1, 1500), (1, 17), (300, 300), (1, 8000), (250, 2300), (1, 129), (77, 77)]
    split_k = [(1, 8000), (1, 3001)]
    for name, seqs in (("attention, mixed batch", mixed), ("attention, split-K decode", split_k)):
        batch = cache.batch(seqs)
        expected = reference.paged_attention(*(batch[k] for k in keys))
        report(name, ops.paged_attention(**batch), expected, 2e-2)
    for op, fn in _elementwise_cases(cache, 4096):
        for impl in ("triton", "compile"):
            report(f"{op} ({impl})", fn(impl), fn("torch"), 5e-2)
    return not any(errors)


def decode(cache: PagedCache) -> None:
    print(f"{cache.model}: decode attention (one query token per sequence)")
    for b in DECODE_BATCHES:
        for ctx in DECODE_CONTEXTS:
            time_attention("decode", cache, [(1, ctx)] * b, f"batch={b} ctx={ctx}")


def prefill(cache: PagedCache) -> None:
    print(f"{cache.model}: prefill attention (causal; and a chunk after a cached prefix)")
    cases = (([(1024, 1024)], "1 x 1k"), ([(4096, 4096)], "1 x 4k"), ([(1024, 1024)] * 8, "8 x 1k"),
             ([(1024, 4096)], "1k chunk, 3k prefix"))
    for seqs, shape in cases:
        time_attention("prefill", cache, seqs, shape)


def mixed(cache: PagedCache) -> None:
    print(f"{cache.model}: mixed step (64 decodes at 2k context + a 512-token chunk after a 1.5k prefix)")
    time_attention("mixed", cache, [(1, 2048)] * 64 + [(512, 2048)], "64 dec + 1 chunk", baseline=False)
    time_attention("mixed", cache, [(1, 2048)] * 64, "64 dec alone", baseline=False)
    time_attention("mixed", cache, [(512, 2048)], "1 chunk alone", baseline=False)


def sweep(cache: PagedCache) -> None:
    print(f"{cache.model}: tile sweep (defaults: DECODE_TILE, PREFILL_TILE in kernels/attention.py)")
    decode_cases = (([(1, 8192)] * 8, "decode 8 x 8k"), ([(1, 2048)] * 64, "decode 64 x 2k"))
    prefill_cases = (([(4096, 4096)], "prefill 4k"), ([(1024, 4096)], "1k chunk, 3k prefix"))
    searches = (("DECODE_TILE", SWEEP_DECODE, decode_cases), ("PREFILL_TILE", SWEEP_PREFILL, prefill_cases))
    for name, tiles, cases in searches:
        default = getattr(attention, name)
        for seqs, shape in cases:
            times = {tile: _time_tile(cache, name, tile, seqs, shape) for tile in tiles}
            print(f"  -> best {name} for {shape}: {min(times, key=times.get)}")
        setattr(attention, name, default)


def _time_tile(cache: PagedCache, name: str, tile: TileConfig, seqs: list[tuple[int, int]],
               shape: str) -> float:
    setattr(attention, name, tile)
    config = f"m{tile.block_m} n{tile.tile_n} w{tile.num_warps} s{tile.num_stages}"
    try:
        return time_attention("sweep", cache, seqs, shape, config, baseline=False)
    except Exception as e:  # a tile that does not fit this GPU's shared memory: skip it
        print(f"  {config}: {type(e).__name__}: {str(e)[:80]}")
        return float("inf")


def store_kv(cache: PagedCache) -> None:
    print(f"{cache.model}: store_kv (read new K/V, write them into the paged cache)")
    for n in (256, 8192):
        key, value = torch.randn(2, n, cache.kv_heads, cache.head_dim, dtype=DTYPE, device=DEVICE)
        slots = torch.randperm(cache.k.shape[0] * BLOCK_SIZE, device=DEVICE)[:n]
        nbytes = 4 * key.numel() * key.element_size()  # read key and value, write them
        for impl in ("triton", "torch"):
            ms = bench(partial(ops.store_kv, key, value, cache.k, cache.v, slots, impl=impl))
            record("store_kv", "store_kv", cache.model, impl, f"tokens={n}", ms, nbytes)


def elementwise(cache: PagedCache) -> None:
    print(f"{cache.model}: element-wise ops ({', '.join(ELEMENTWISE_IMPLS)})")
    for n in (64, 1024, 8192):
        for op, fn in _elementwise_cases(cache, n):
            nbytes = _elementwise_bytes(cache, op, n)
            for impl in ELEMENTWISE_IMPLS:
                ms = bench(lambda fn=fn, impl=impl: fn(impl))
                record("elementwise", op, cache.model, impl, f"tokens={n}", ms, nbytes)
                TOTALS.setdefault(op, dict.fromkeys(ELEMENTWISE_IMPLS, 0.0))[impl] += ms


def _elementwise_cases(cache: PagedCache, n: int) -> list[tuple[str, Callable[[str], torch.Tensor]]]:
    """(op, fn(impl) -> output) on n tokens of the model's shapes."""
    x, res = torch.randn(2, n, cache.hidden, dtype=DTYPE, device=DEVICE)
    w = torch.randn(cache.hidden, dtype=DTYPE, device=DEVICE)
    gate_up = torch.randn(n, 2 * cache.inter, dtype=DTYPE, device=DEVICE)
    q_dim, kv_dim = cache.heads * cache.head_dim, cache.kv_heads * cache.head_dim
    qkv = torch.randn(n, q_dim + 2 * kv_dim, dtype=DTYPE, device=DEVICE)
    cos_sin = build_cos_sin_cache(cache.head_dim, 32768, 10000.0, None, DTYPE).to(DEVICE)
    pos = torch.randint(0, 32768, (n,), device=DEVICE)

    def rotary(impl: str) -> torch.Tensor:  # on a fresh copy, so that every impl rotates the same input
        out = qkv.clone()
        q, k = out[:, :q_dim], out[:, q_dim:q_dim + kv_dim]
        ops.apply_rotary(pos, q, k, cos_sin, cache.head_dim, impl=impl)
        return out

    return [("rms_norm", lambda impl: ops.rms_norm(x, w, 1e-6, res, impl=impl)[0]),
            ("silu_and_mul", lambda impl: ops.silu_and_mul(gate_up, impl=impl)),
            ("apply_rotary", rotary)]


def _elementwise_bytes(cache: PagedCache, op: str, n: int) -> float:
    elt = torch.finfo(DTYPE).bits // 8
    qkv = (cache.heads + 2 * cache.kv_heads) * cache.head_dim
    qk = (cache.heads + cache.kv_heads) * cache.head_dim
    per_token = {"rms_norm": 4 * cache.hidden,  # read x and residual, write out and the new residual
                 "silu_and_mul": 3 * cache.inter,
                 "apply_rotary": 2 * qkv + 2 * qk}  # the copy of qkv, then q and k rotated in place
    return n * per_token[op] * elt


SECTIONS: dict[str, Callable[[PagedCache], object]] = {
    "check": check, "decode": decode, "prefill": prefill, "mixed": mixed, "store_kv": store_kv,
    "elementwise": elementwise, "sweep": sweep,
}
DEFAULT_SECTIONS = "check,decode,prefill,mixed,store_kv,elementwise"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default=DEFAULT_SECTIONS, help=f"subset of {','.join(SECTIONS)}")
    sections = parser.parse_args().sections.split(",")
    if unknown := [s for s in sections if s not in SECTIONS]:
        sys.exit(f"--sections: unknown {unknown}; choose from {', '.join(SECTIONS)}")
    if not torch.cuda.is_available():
        sys.exit("kernels_bench.py needs a CUDA GPU")
    print(f"{card()}, torch {torch.__version__}, triton {triton.__version__}")
    ok = True
    for model in MODELS:
        tokens = max(DECODE_BATCHES) * max(DECODE_CONTEXTS) if "decode" in sections else 512 * 1024
        cache = PagedCache(model, tokens)
        for name in sections:
            ok &= SECTIONS[name](cache) is not False
        del cache
        torch.cuda.empty_cache()
    if TOTALS:
        winners = {op: min(("triton", "compile"), key=totals.get) for op, totals in TOTALS.items()}
        summed = {op: {impl: round(ms, 4) for impl, ms in totals.items()} for op, totals in TOTALS.items()}
        print(f"element-wise summed medians (ms): {summed}\n-> kernels/dispatch.py CUDA_BACKEND = {winners}")
    if os.environ.get("OUT") and ROWS:
        path = Path(os.environ["OUT"]) / "kernels_bench.csv"
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(ROWS[0]))
            writer.writeheader()
            writer.writerows(ROWS)
        print(f"wrote {path}")
    if not ok:
        sys.exit("correctness check FAILED")


if __name__ == "__main__":
    main()
