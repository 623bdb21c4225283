"""Where a decode step's time goes, on the GPU: engine step vs CUDA-graph replay vs per-kernel time.

    python benchmarks/decode_breakdown.py [--model W7|W0.6] [--batches 1 8 64]

For each decode batch size it prints:
  step     the engine's median pure-decode step (schedule, inputs, forward, sampling, sync), from its trace,
           with scheduling in step and with async scheduling (the host's work hidden behind the GPU's);
  graph    the captured decode graph alone (CUDA events around replay());
  kernels  GPU time per kernel family inside one decode forward (torch.profiler);
each against the weights + KV read bound at the card's copy bandwidth, measured at the start
(benchmarks/card.py), which every bound line names;
and with --sweep, first, for the model's linear layers at M = 1 and 16, the read bandwidth of cuBLAS and of
every tile config of kernels.linear, timed inside a CUDA graph over weights larger than the L2; for o and
down (the layers whose output the next RMSNorm reads) also every tile config at SPLIT_K 2 and 4 (tagged
x2, x4), which stores fp32 partial sums that the norm reduces.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import statistics
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from card import card
from engine_throughput import Shape, decode_floor_seconds, decode_latency, make_workload
from servebench.engine.dummy import write_dummy_model_dir
from servebench.kernels.linear import skinny_matmul_kernel, tuned_configs

from servebench import LLM


def graph_time(fn, reps: int = 20, iters: int = 5) -> float:
    """Seconds per call of fn, captured `reps` times in one CUDA graph (no launch latency)."""
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps)
    return statistics.median(times)


SWEEP = [(bn, bk, w, st) for bn in (16, 32, 64) for bk in (128, 256, 512) for w in (4, 8) for st in (3, 4, 6)
         if bn * bk <= 16384]
SPLIT_K_LAYERS = ("o", "down")  # kernels.linear returns split-K partials for these (their reader is a norm)


def _sweep_one(ws: list[torch.Tensor], m: int, split_ks: tuple[int, ...]) -> list[tuple[str, float]]:
    """Seconds per call of cuBLAS and of each SWEEP config at each split_ks on x [m, K] times each of ws."""
    n, k = ws[0].shape
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(1, m, n, device="cuda", dtype=torch.bfloat16)
    partials = torch.empty(max(split_ks), m, n, device="cuda", dtype=torch.float32)

    def per_call(fn) -> float:
        return graph_time(lambda: [fn(w) for w in ws], reps=3) / len(ws)

    def config(bn: int, bk: int, nw: int, st: int, sk: int):
        dst = out if sk == 1 else partials
        return lambda w: skinny_matmul_kernel[(triton.cdiv(n, bn), sk)](
            x, w, w, dst, m, n, k, x.stride(0), w.stride(0), dst.stride(0), dst.stride(1),
            x, x, 0, x, x, x, 0, 0, 0, HAS_BIAS=False,  # no rotary epilogue
            BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, num_warps=nw, num_stages=st)

    results = [("cublas", per_call(lambda w: F.linear(x, w)))]
    for (bn, bk, nw, st), sk in itertools.product(SWEEP, split_ks):
        name = f"n{bn} k{bk} w{nw} s{st}" + (f" x{sk}" if sk > 1 else "")
        try:
            results.append((name, per_call(config(bn, bk, nw, st, sk))))
        except Exception as e:  # noqa: BLE001 -- a config that does not fit (shared memory) is skipped
            print(f"    skip {name}: {type(e).__name__}")
    return sorted(results, key=lambda r: r[1])


def skinny_sweep(shape: Shape) -> None:
    """Each tile config of kernels.linear's streaming kernel against cuBLAS, on the model's weight shapes."""
    h = shape.hidden
    mats = {"qkv": (shape.q_dim + 2 * shape.kv_dim, h), "o": (h, shape.q_dim),
            "gate_up": (2 * shape.inter, h), "down": (h, shape.inter), "lm_head": (shape.vocab, h)}
    for name, (n, k) in mats.items():
        # Distinct weights per call, more than the L2 holds, so every call streams from HBM.
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(8)]
        for m in (1, 16):
            results = _sweep_one(ws, m, (1, 2, 4) if name in SPLIT_K_LAYERS else (1,))
            gbps = {cfg: n * k * 2 / t / 1e9 for cfg, t in results}
            best = ", ".join(f"{cfg} {gbps[cfg]:.0f}" for cfg, _ in results[:4])
            print(f"  sweep {name:8s} {n}x{k} M={m}: cublas {gbps['cublas']:.0f} GB/s; best (GB/s): {best}")
            if name in SPLIT_K_LAYERS:  # the best tile at each split count, which the top 4 may not show
                per_split = {int(cfg.split(" x")[1]) if " x" in cfg else 1: cfg
                             for cfg, _ in reversed(results) if cfg != "cublas"}  # the fastest written last
                print("    best per SPLIT_K (GB/s): "
                      + ", ".join(f"{sk}: {cfg} {gbps[cfg]:.0f}" for sk, cfg in sorted(per_split.items())))
        del ws


def kernel_breakdown(llm: LLM, batch: int) -> None:
    graphs = llm.engine.runner.cuda_graphs.graphs
    graph = graphs[min(s for s in graphs if s >= batch)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            graph.replay()
        torch.cuda.synchronize()
    totals: dict[str, float] = collections.defaultdict(float)
    counts: collections.Counter = collections.Counter()
    for ev in prof.key_averages():
        if ev.device_time_total > 0:
            totals[ev.key[:70]] += ev.device_time_total / 5
            counts[ev.key[:70]] += ev.count / 5
    total = sum(totals.values())
    print(f"  kernels in one batch-{batch} decode graph: {sum(counts.values()):.0f} launches, "
          f"{total / 1e3:.3f} ms of kernel time")
    for key, us in sorted(totals.items(), key=lambda kv: -kv[1])[:14]:
        print(f"    {us / 1e3:7.3f} ms  x{counts[key]:5.0f}  {key}")


def replay_time(llm: LLM, batch: int) -> float:
    graphs = llm.engine.runner.cuda_graphs.graphs
    graph = graphs[min(s for s in graphs if s >= batch)]
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="W7", choices=["W7", "W0.6"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--sweep", action="store_true", help="time every tile config of kernels.linear first")
    args = ap.parse_args()
    w = make_workload(args.model)
    shape = Shape.of(w.config)
    c = card()  # before the model takes the card's memory
    print(f"{c}, torch {torch.__version__}")
    if args.sweep:
        skinny_sweep(shape)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_dummy_model_dir(w.config, Path(tmp) / w.name)
        llm = LLM(model=str(model_dir), load_format="dummy", dtype="bfloat16", max_model_len=2048,
                  max_num_seqs=max(args.batches))
        for key, config in tuned_configs().items():
            print(f"  kernels.linear tuned {key}: {config}")
        for batch in args.batches:
            steps = {}
            for mode in ("sync", "async"):
                llm.engine.args.async_scheduling = mode == "async"
                steps[mode] = decode_latency(llm, w, batch)
            graph = replay_time(llm, batch)
            bound = decode_floor_seconds(shape, batch, c)
            print(f"batch {batch}: weights + KV read bound {bound * 1e3:.3f} ms; " + ", ".join(
                f"{mode} step {t * 1e3:.3f} ms ({t / bound:.2f}x)" for mode, t in steps.items())
                + f", graph replay {graph * 1e3:.3f} ms ({graph / bound:.2f}x) [{c}]")
            kernel_breakdown(llm, batch)


if __name__ == "__main__":
    main()
