"""Whole-step profiles of the engine's own work, the tables the simulator's `profile` step-time model reads.

    python -m servebench.engine.profile --model llama2_7b --out data/profiles/h200    # conf/model shape
    python -m servebench.engine.profile --model /path/to/hf_dir --out DIR --grid tiny --device cpu

Each point is one `ModelRunner.execute` (input preparation, forward, sampling, synchronisation: what the
engine times as a step), CUDA graphs for decode as in serving, on a synthetic batch whose requests get real KV
blocks from a `KVCacheManager` over the engine's cache. Dummy weights (`load_format="dummy"`). Points:
- `linear`: T prefill tokens in chunks of 128 that sample nothing (attention negligible): the linear part;
- `prefill`: one prompt chunk of n tokens after c cached ones (attention grows with n (c + n / 2));
- `decode`: batch b, every request at context c (CUDA graphs), as far as the KV cache holds b x c tokens;
- `decode_skew`: batch b, one request at a long context, the rest short (served batches are not uniform:
  while the attention programs fit on the GPU at once, the longest context sets the time);
- `mixed`: a decode batch and one prefill chunk in the same step;
  (with cudagraph_mode FULL, the default, a step that prefills up to 2048 tokens replays the mixed graph of
  its padded token count, recorded as `graph_tokens`, as in serving);
- `cpu`: the host's per-step overhead in the engine loop (schedule, update, detokenize), by batch size, with
  the execute time of those loop steps and their mean context (the loop's forward against the isolated one);
- `swap_out` / `swap_in`: copying KV blocks between the GPU and the pinned swap space.
Writes `<out>/<model>/{steps.csv, cpu.csv, meta.json}`; meta.json records card, driver, torch, triton, date,
model shape, engine knobs and `source_digest` (engine.digest: the engine and kernel code measured). One
model's full grid takes 1-3 minutes on an H100.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch
from servebench.engine.core.kv_cache_manager import KVCacheManager
from servebench.engine.core.request import Request
from servebench.engine.core.sampling_params import SamplingParams
from servebench.engine.core.scheduler_output import SchedulerOutput
from servebench.engine.digest import source_digest
from servebench.engine.dummy import resolve_model

if TYPE_CHECKING:
    from servebench.engine.llm_engine import LLMEngine
    from servebench.engine.sampled_tokens import SampledTokens

REPO = Path(__file__).resolve().parents[1]
LINEAR_CHUNK = 128  # tokens per sequence in `linear` points: long enough to be matmul-bound, attention ~0
SKEW_SHORT = 16  # context of the short requests of a `decode_skew` batch


@dataclass(slots=True)
class Grid:
    linear_tokens: list[int]
    chunk_sizes: list[int]
    chunk_contexts: list[int]
    decode_batches: list[int]
    decode_contexts: list[int]
    mixed_batches: list[int]
    mixed_contexts: list[int]
    mixed_chunks: list[int]
    skew_batches: list[int]
    skew_contexts: list[int]  # the long context (capped at max_model_len - 1); the others get SKEW_SHORT
    cpu_batches: list[int]
    swap_blocks: list[int]
    cpu_steps: int = 40  # decode steps per batch size in the engine loop
    warmup: int = 2
    reps: int = 5


GRIDS = {
    # batch sizes on both sides of each CUDA-graph size (a batch of 65 runs in the graph of 128)
    "full": Grid(
        linear_tokens=[1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 12288, 16384],
        # 2560 and 3072: single prompts that run eagerly (over the largest mixed graph) within a 4k model's
        # max_model_len, where the linear points above 2048 tokens are all chunks of 128 with no attention
        chunk_sizes=[256, 512, 1024, 2048, 2560, 3072, 4096],
        chunk_contexts=[0, 1024, 3072, 8192, 16384, 32768],
        decode_batches=[1, 2, 4, 8, 9, 16, 17, 32, 33, 64, 65, 128, 129, 256, 512],
        decode_contexts=[16, 256, 1024, 2048, 4096, 8192, 16384, 32768],
        mixed_batches=[16, 64, 128, 256],
        mixed_contexts=[256, 2048],
        mixed_chunks=[256, 1024, 3072, 4096],
        skew_batches=[2, 4, 8, 9, 16, 32, 64],
        skew_contexts=[1024, 4096],
        cpu_batches=[1, 4, 16, 64, 128, 256, 512],
        swap_blocks=[16, 128, 512],
    ),
    "tiny": Grid(  # CPU tests: a few points of each kind
        linear_tokens=[1, 16, 128, 256],
        chunk_sizes=[16, 64],
        chunk_contexts=[0, 64],
        decode_batches=[1, 2, 4],
        decode_contexts=[16, 128],
        mixed_batches=[2, 4],
        mixed_contexts=[64],
        mixed_chunks=[16, 64],
        skew_batches=[2, 4],
        skew_contexts=[128],
        cpu_batches=[1, 4],
        swap_blocks=[2, 4],
        cpu_steps=6,
        warmup=1,
        reps=2,
    ),
}


class Profiler:
    def __init__(self, engine: LLMEngine, grid: Grid) -> None:
        self.engine, self.runner, self.grid = engine, engine.runner, grid
        self.mml, self.bs = engine.max_model_len, self.runner.block_size
        self.kv = KVCacheManager(self.runner.kv_cache.num_gpu_blocks, self.bs, enable_caching=False)
        self.cuda = self.runner.device.type == "cuda"
        self.rows: list[dict] = []
        self._ids = 0

    # ---- synthetic batches ---------------------------------------------------------
    def _request(self, context: int, new: int, sample: bool) -> Request:
        """A request with `context` tokens in the KV cache and `new` to compute; samples iff `sample`."""
        self._ids += 1
        prompt = context + new + (0 if sample else 1)
        ids = [100 + (i * 7919) % 500 for i in range(prompt)]
        req = Request(f"p{self._ids}", ids, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
        self._allocate(req, context + new, [])
        req.num_computed_tokens = context
        return req

    def _allocate(self, req: Request, num_tokens: int, computed_blocks: list[int] | None = None) -> None:
        # not an assert: the allocation is the point, and `python -O` would skip it
        if not self.kv.allocate_slots(req, num_tokens, computed_blocks):
            raise RuntimeError(f"profile: no KV blocks left for {num_tokens} tokens of {req.request_id}")

    def _decode_request(self, context: int) -> Request:
        req = self._request(context - 1, 0, sample=True)
        req.all_token_ids.append(100)  # one output token sampled: the next step decodes it
        self._allocate(req, 1)
        return req

    def batch(self, chunks: list[tuple[int, int]], decodes: list[int], sample: bool = True
              ) -> SchedulerOutput:
        """Prefill chunks (new, cached) and decode requests at the given contexts (incl. the new token)."""
        out = SchedulerOutput()
        for n, c in chunks:
            out.requests.append(self._request(c, n, sample))
            out.num_scheduled_tokens.append(n)
            out.prefill_chunks.append((n, c))
            out.num_prefill_tokens += n
        for ctx in decodes:
            out.requests.append(self._decode_request(ctx))
            out.num_scheduled_tokens.append(1)
            out.num_decode_tokens += 1
            out.decode_context_tokens += ctx
        return out

    def fits(self, chunks: list[tuple[int, int]], decodes: list[int]) -> bool:
        lens = [n + c + 1 for n, c in chunks] + [c + 1 for c in decodes]
        need = sum(-(-n // self.bs) for n in lens)
        return need <= self.kv.num_free_blocks and all(n + c < self.mml for n, c in chunks) and all(
            c < self.mml for c in decodes)

    def _free(self, out: SchedulerOutput) -> None:
        for req in out.requests:
            self.kv.free(req)

    def _time(self, fn: Callable[[], object]) -> list[float]:
        for _ in range(self.grid.warmup):
            fn()
        if self.cuda:  # the warm-up's queued work (asynchronous swap copies) is not the first rep's
            torch.cuda.synchronize()
        times = []
        for _ in range(self.grid.reps):
            t0 = time.perf_counter()
            fn()
            if self.cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return times

    def step(self, kind: str, chunks: list[tuple[int, int]], decodes: list[int], sample: bool = True) -> None:
        """Time one batch; `context` is the decodes' mean context, `max_context` their longest."""
        if not self.fits(chunks, decodes):
            return
        out = self.batch(chunks, decodes, sample)
        times = self._time(lambda: self.runner.execute(out))
        self._free(out)
        self._add(kind, times, tokens=out.total_num_scheduled_tokens, graph_tokens=out.graph_tokens,
                  num_chunks=len(chunks),
                  chunk=chunks[0][0] if chunks else 0, chunk_context=chunks[0][1] if chunks else 0,
                  batch=len(decodes), context=round(statistics.mean(decodes)) if decodes else 0,
                  max_context=max(decodes, default=0))

    def _add(self, kind: str, times: list[float], **cols: int) -> None:
        self.rows.append({"kind": kind, **cols, "median_s": statistics.median(times), "min_s": min(times),
                          "max_s": max(times)})

    # ---- the grid --------------------------------------------------------------------
    def run_steps(self) -> None:
        g = self.grid
        for t in g.linear_tokens:
            k, rest = divmod(t, LINEAR_CHUNK)
            self.step("linear", [(LINEAR_CHUNK, 0)] * k + ([(rest, 0)] if rest else []), [], sample=False)
        for n in g.chunk_sizes:
            for c in g.chunk_contexts:
                self.step("prefill", [(n, c)], [])
        for b in g.decode_batches:
            for c in self.decode_contexts(b):
                self.step("decode", [], [c] * b)
        for b in g.mixed_batches:
            for c in g.mixed_contexts:
                for n in g.mixed_chunks:
                    self.step("mixed", [(n, 0)], [c] * b)
        for b in g.skew_batches:
            for c in g.skew_contexts:
                self.step("decode_skew", [], [min(c, self.mml - 1)] + [SKEW_SHORT] * (b - 1))

    def decode_contexts(self, batch: int) -> list[int]:
        """The grid's contexts below max_model_len, and the longest one the KV cache holds `batch` times."""
        longest = min(self.mml - 1, (self.kv.num_free_blocks // batch) * self.bs - 1)
        return sorted({c for c in self.grid.decode_contexts if c <= longest} | {longest})

    def run_swaps(self) -> None:
        kv_cache = self.runner.kv_cache
        for n in self.grid.swap_blocks:
            if n > min(kv_cache.num_cpu_blocks, kv_cache.num_gpu_blocks):
                continue
            pairs = [(i, i) for i in range(n)]
            for kind, out, back in (("swap_out", pairs, []), ("swap_in", [], pairs)):
                self._add(kind, self._time(lambda out=out, back=back: kv_cache.swap(out, back)), blocks=n)

    def run_cpu(self) -> list[dict]:
        """Per-step host overhead in the engine loop as `backend=engine` runs it: period minus execute."""
        rows = []
        runner_execute = self.runner.execute
        spent: list[tuple[float, float]] = []  # (execute s, mean decode context) of each loop step

        def timed_execute(out: SchedulerOutput) -> SampledTokens:
            t0 = time.perf_counter()
            sampled = runner_execute(out)
            elapsed = time.perf_counter() - t0
            spent.append((elapsed, out.decode_context_tokens / max(out.num_decode_tokens, 1)))
            return sampled

        self.runner.execute = timed_execute
        try:
            for b in self.grid.cpu_batches:
                rows.append(self._cpu_point(b, spent))
        finally:
            del self.runner.execute
        return rows

    def _cpu_point(self, b: int, spent: list[tuple[float, float]]) -> dict:
        engine = self.engine
        params = SamplingParams(max_tokens=self.grid.cpu_steps + 4, temperature=0.0, ignore_eos=True)
        for i in range(b):
            engine.add_request(f"cpu{b}-{i}", None, [100 + i % 500] * 16, params)
        starts: list[float] = []
        spent.clear()
        while engine.has_unfinished_requests():
            starts.append(time.perf_counter())
            engine.step(final_only=True)
        # steady decode steps only: skip the prefill and the first decodes, and the last (finishing) one
        periods = [b2 - a for a, b2 in zip(starts[3:-2], starts[4:-1])]
        steady = spent[3:-2]
        execute = statistics.median(t for t, _ in steady)
        period = statistics.median(periods)
        overhead = max(period - execute, 0.0)
        context = statistics.mean(c for _, c in steady)
        return {"batch": b, "period_s": period, "execute_s": execute, "overhead_s": overhead,
                "context": context}


def environment(device: torch.device) -> dict:
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "device": str(device),
           "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "python": sys.version.split()[0]}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["card"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            smi = subprocess.run(query, capture_output=True, text=True, timeout=20)
            env["driver"] = smi.stdout.split()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            env["driver"] = None
    else:
        env["card"] = "cpu"
    return env


def profile(model: str, out: Path, grid: Grid, device: str = "auto", dtype: str = "auto",
            max_model_len: int | None = None, max_num_seqs: int = 512, swap_space: float = 1.0,
            tensor_parallel_size: int = 1) -> Path:
    """Profile into `out`/<model> (<model>_tp<N> with tensor parallelism: whole steps of N GPUs, where the
    simulator's profile_dir looks for them). Swaps are timed on rank 0, whose copies the others repeat at once
    on their own links."""
    from servebench.engine.config import EngineArgs
    from servebench.engine.llm_engine import LLMEngine

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        name, model_dir = resolve_model(model, Path(tmp))
        hf = json.loads((model_dir / "config.json").read_text())
        args = EngineArgs(model=str(model_dir), dtype=dtype, device=device, load_format="dummy",
                          max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=max(grid.linear_tokens + [max_num_seqs]),
                          enable_prefix_caching=False, preemption_mode="swap", swap_space=swap_space,
                          tensor_parallel_size=tensor_parallel_size)
        engine = LLMEngine(args)
    prof = Profiler(engine, grid)
    blocks = engine.runner.kv_cache.num_gpu_blocks
    _log(f"{name}: engine ready in {time.perf_counter() - t0:.1f} s, {blocks} KV blocks")
    prof.run_steps()
    _log(f"{name}: {len(prof.rows)} step points, {time.perf_counter() - t0:.1f} s")
    prof.run_swaps()
    cpu = prof.run_cpu()
    folder = out / (name if tensor_parallel_size == 1 else f"{name}_tp{tensor_parallel_size}")
    folder.mkdir(parents=True, exist_ok=True)
    steps = pd.DataFrame(prof.rows).fillna(0)
    counts = [c for c in steps.columns if c != "kind" and not c.endswith("_s")]
    steps.astype(dict.fromkeys(counts, int)).to_csv(folder / "steps.csv", index=False)
    pd.DataFrame(cpu).to_csv(folder / "cpu.csv", index=False)
    runner = engine.runner
    meta = {
        "model": name, "hf_config": hf, **environment(runner.device),
        "engine": {"dtype": str(runner.dtype).removeprefix("torch."), "max_model_len": engine.max_model_len,
                   "max_num_seqs": max_num_seqs, "block_size": runner.block_size,
                   "tensor_parallel_size": tensor_parallel_size,
                   "num_gpu_blocks": runner.kv_cache.num_gpu_blocks,
                   "cuda_graphs": runner.cuda_graphs is not None, "cudagraph_mode": args.cudagraph_mode,
                   "max_num_batched_tokens": args.max_num_batched_tokens},
        "grid": dataclasses.asdict(grid), "wall_s": round(time.perf_counter() - t0, 1),
        # the code measured: the simulator warns, and tests/test_profile_digest.py fails, once it changes
        "source_digest": source_digest(),
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    _log(f"{name}: wrote {folder} in {meta['wall_s']} s")
    engine.shutdown()
    return folder


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m servebench.engine.profile",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="conf/model name (llama2_7b, qwen3_0_6b, ...) or HF folder")
    p.add_argument("--out", type=Path, default=REPO / "data" / "profiles" / "h100_80g")
    p.add_argument("--grid", choices=sorted(GRIDS), default="full")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-model-len", type=int, default=None, help="default: the model's")
    p.add_argument("--max-num-seqs", type=int, default=512)
    p.add_argument("--swap-space", type=float, default=1.0, help="GiB of pinned swap space to time swaps")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    a = p.parse_args(argv)
    try:
        profile(a.model, a.out, GRIDS[a.grid], a.device, a.dtype, a.max_model_len, a.max_num_seqs,
                a.swap_space, a.tensor_parallel_size)
    except ValueError as e:
        raise SystemExit(f"profile: error: {e}") from None


if __name__ == "__main__":
    main()
