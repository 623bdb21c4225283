"""Offline throughput of the engine on the card in hand, against HF transformers' continuous batching and the
roofline bound of that card.

    python benchmarks/engine_throughput.py --workload all          # W7 and W0.6, engine + HF
    python benchmarks/engine_throughput.py --workload W7 --skip-hf --prefill

Workloads (dummy bf16 weights from a config.json written here; no hub, no internet):
  W7   Llama-2-7B shape, 128 requests, prompt lengths U[100, 1024], 256 output tokens, ignore_eos, all at t=0.
  W0.6 Qwen3-0.6B shape, 256 requests, prompt and output lengths U[100, 1024].
Prompt token ids are uniform in [100, vocab - 100), from random.Random(0).

Every bound comes from the card's ceilings measured at the start (benchmarks/card.py: device-to-device copy
bandwidth, bf16 GEMM rate), and every line that gives a bound names the card and those ceilings.
Prints output tok/s and total tok/s of the engine and of HF `generate_batch` (continuous batching, CUDA graphs
and async batching where the installed transformers has them), their ratio, the roofline bound (weights + KV
bytes at the copy bandwidth, FLOPs at the GEMM rate) and the engine's fraction of it, and the decode step
latency at batch 1, 8 and 64 against the weights + KV read bound. With --prefill, also prefill alone
(max_tokens=1) of one 4096-token prompt and of 16 x 2048-token prompts: model FLOPs (causal attention
included) per second of the whole generate call, as a fraction of the GEMM rate.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import inspect
import json
import os
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from card import Card, card
from servebench.engine.dummy import write_dummy_model_dir

from servebench import LLM, SamplingParams

MAX_MODEL_LEN = 2048  # longest prompt + output of both workloads
PREFILL_RUNS = ((1, 4096), (16, 2048))  # (prompts, tokens each), prefilled together with max_tokens=1
PREFILL_REPS = 3
DECODE_PROMPT, DECODE_STEPS = 128, 64  # decode-latency runs: context grows from 128 to 192 tokens

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
}
QWEN3_06B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 1024,
    "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "hidden_act": "silu", "tie_word_embeddings": True, "torch_dtype": "bfloat16", "bos_token_id": 151643,
    "eos_token_id": 151645, "attention_bias": False,
}


@dataclass(slots=True)
class Workload:
    name: str
    config: dict
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)


def random_requests(n: int, vocab: int, prompt_lens: tuple[int, int] = (100, 1024),
                    output_len: int | None = None, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """Prompts of U[prompt_lens] ids in [100, vocab - 100); output_len tokens each (None: U[100, 1024])."""
    rng = random.Random(seed)
    prompts, output_lens = [], []
    for _ in range(n):
        length = rng.randint(*prompt_lens)
        prompts.append([rng.randrange(100, vocab - 100) for _ in range(length)])
        output_lens.append(output_len or rng.randint(100, 1024))
    return prompts, output_lens


def make_workload(name: str) -> Workload:
    config, n, fixed_output = {"W7": (LLAMA2_7B, 128, 256), "W0.6": (QWEN3_06B, 256, None)}[name]
    return Workload(name, config, *random_requests(n, config["vocab_size"], output_len=fixed_output))


# ---- roofline ------------------------------------------------------------------------
@dataclass(slots=True)
class Shape:
    layers: int
    hidden: int
    q_dim: int
    kv_dim: int
    inter: int
    vocab: int
    tied: bool

    @classmethod
    def of(cls, c: dict) -> Shape:
        head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        return cls(c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"] * head_dim,
                   c["num_key_value_heads"] * head_dim, c["intermediate_size"], c["vocab_size"],
                   c["tie_word_embeddings"])

    @property
    def layer_params(self) -> int:
        h = self.hidden
        return self.layers * (h * (self.q_dim + 2 * self.kv_dim) + self.q_dim * h + 3 * h * self.inter)

    @property
    def weight_bytes(self) -> int:
        """Bytes read per forward pass: layers and the LM head (embedding rows read are negligible)."""
        return 2 * (self.layer_params + self.hidden * self.vocab)

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * 2 * self.layers * self.kv_dim

    def flops(self, new_tokens: int, context_sum: int, sampled: int) -> float:
        """Linear layers for every new token, attention over `context_sum` (query, key) pairs, LM head."""
        return 2 * self.layer_params * new_tokens + 4 * self.layers * self.q_dim * context_sum \
            + 2 * self.hidden * self.vocab * sampled


def roofline_seconds(w: Workload, c: Card) -> dict[str, float]:
    """A lower bound: all requests decode together (max output length steps, each reading the weights once),
    every token's K/V is written once and every decode token reads its context; bytes at the card's copy
    bandwidth, FLOPs at its GEMM rate."""
    s = Shape.of(w.config)
    steps = max(w.output_lens)
    kv_read = sum(o * p + o * (o - 1) // 2 for p, o in zip(map(len, w.prompts), w.output_lens))
    kv_write = w.prompt_tokens + w.output_tokens
    prefill_pairs = sum(p * (p + 1) // 2 for p in map(len, w.prompts))
    mem = c.read_seconds(steps * s.weight_bytes + (kv_read + kv_write) * s.kv_bytes_per_token)
    sampled = len(w.prompts) + w.output_tokens
    compute = c.compute_seconds(s.flops(w.prompt_tokens + w.output_tokens, prefill_pairs + kv_read, sampled))
    return {"memory_s": mem, "compute_s": compute, "bound_s": max(mem, compute)}


def decode_floor_seconds(s: Shape, batch: int, c: Card) -> float:
    """A decode step reads the weights once and each request's K/V at the decode runs' mean context."""
    context = DECODE_PROMPT + DECODE_STEPS // 2
    return c.read_seconds(s.weight_bytes + batch * context * s.kv_bytes_per_token)


# ---- runs ------------------------------------------------------------------------------
def load_engine(w: Workload, model_dir: Path, cudagraph_mode: str) -> LLM:
    llm = LLM(model=str(model_dir), load_format="dummy", dtype="bfloat16", max_model_len=MAX_MODEL_LEN,
              compilation_config={"cudagraph_mode": cudagraph_mode})
    warm = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in w.prompts[:4]], warm, use_tqdm=False)  # Triton JIT
    return llm


def run_engine(llm: LLM, w: Workload) -> float:
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in w.output_lens]
    llm.engine.reset()  # an empty prefix cache: a second run of the same prompts prefills them all again
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in w.prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    assert [len(o.outputs[0].token_ids) for o in outs] == w.output_lens
    return elapsed


def decode_latency(llm: LLM, vocab: int, batch: int, steps: int = DECODE_STEPS) -> float:
    """Median duration of pure decode steps with `batch` requests of DECODE_PROMPT-token prompts (token ids
    in [100, vocab - 100))."""
    engine = llm.engine
    first = len(engine.recorder.step_rows)
    rng = random.Random(batch)
    prompts = [{"prompt_token_ids": [rng.randrange(100, vocab - 100) for _ in range(DECODE_PROMPT)]}
               for _ in range(batch)]
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True), use_tqdm=False)
    rows = engine.recorder.step_rows[first:]
    return statistics.median(r.duration_s for r in rows
                             if r.num_prefill_tokens == 0 and r.num_decode_tokens == batch)


def hf_cb_config():
    """ContinuousBatchingConfig(use_cuda_graph=True, use_async_batching=True), where transformers has it."""
    cls = getattr(transformers, "ContinuousBatchingConfig", None)
    if cls is None:
        return None, "no ContinuousBatchingConfig in this transformers: defaults"
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    wanted = {k: True for k in ("use_cuda_graph", "use_async_batching") if not names or k in names}
    try:
        return cls(**wanted), f"ContinuousBatchingConfig({', '.join(f'{k}=True' for k in wanted)})"
    except TypeError as e:
        return None, f"ContinuousBatchingConfig rejected {wanted} ({e}): defaults"


def run_hf(w: Workload) -> tuple[float, str]:
    config = transformers.AutoConfig.for_model(**{k: v for k, v in w.config.items() if k != "architectures"})
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    gen = transformers.GenerationConfig(max_new_tokens=max(w.output_lens), do_sample=False, eos_token_id=None,
                                        pad_token_id=0)
    model.generation_config = gen
    cb, how = hf_cb_config()
    kwargs = {"continuous_batching_config": cb} if cb is not None else {}
    context = getattr(model, "continuous_batching_context_manager", None)
    if context is not None and not _accepts(context, kwargs):
        kwargs, how = {}, how + " (not accepted by continuous_batching_context_manager: defaults)"
    if context is not None and _accepts(context, {"block": 1, "timeout": 1}):
        # What generate_batch runs, with per-request max_new_tokens and the warmup (graph capture) untimed.
        with context(generation_config=gen, block=True, timeout=5, **kwargs) as manager:
            t0 = time.perf_counter()
            for i, (p, n) in enumerate(zip(w.prompts, w.output_lens)):
                manager.add_request(p, request_id=f"r{i}", max_new_tokens=n)
            done = 0
            while done < len(w.prompts):
                result = manager.get_result(timeout=1)
                if result is not None and result.is_finished():
                    done += 1
                elif result is None and not manager.is_running():
                    raise RuntimeError("HF continuous batching loop died")
            elapsed = time.perf_counter() - t0
        how += "; continuous_batching_context_manager + add_request (generate_batch's loop, warmup untimed)"
    else:
        if len(set(w.output_lens)) > 1:
            raise RuntimeError("this transformers has generate_batch only: no per-request max_new_tokens")
        t0 = time.perf_counter()
        model.generate_batch(inputs=w.prompts, generation_config=gen, **kwargs)
        elapsed = time.perf_counter() - t0
        how += "; generate_batch (its warmup timed)"
    how += f"; attn={model.config._attn_implementation}"
    del model
    return elapsed, how


def _accepts(fn, kwargs: dict) -> bool:
    params = inspect.signature(fn).parameters
    return all(k in params for k in kwargs) or any(p.kind is p.VAR_KEYWORD for p in params.values())


def free_gpu() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def _rates(w: Workload, seconds: float) -> str:
    total = w.prompt_tokens + w.output_tokens
    return (f"{seconds:.2f} s  {w.output_tokens / seconds:,.0f} output tok/s  "
            f"{total / seconds:,.0f} total tok/s")


def engine_runs(llm: LLM, w: Workload, c: Card, row: dict) -> None:
    """The workload with async scheduling off (the baseline) and on, each followed by the decode-step runs."""
    s, total = Shape.of(w.config), w.prompt_tokens + w.output_tokens
    for mode in ("sync", "async"):
        llm.engine.args.async_scheduling = mode == "async"
        elapsed = run_engine(llm, w)
        stats = llm.engine.stats()
        print(f"engine ({mode} scheduling): {_rates(w, elapsed)}  ({stats.num_preemptions} preemptions, "
              f"{stats.num_gpu_blocks} KV blocks, {stats.prefix_cache_hits_tokens} prefix-cache hit tokens); "
              f"{row['bound_s'] / elapsed:.1%} of the roofline bound "
              f"{row['bound_s']:.2f} s (memory {row['memory_s']:.2f} s, compute {row['compute_s']:.2f} s) "
              f"[{c}]")
        row.update({f"engine_{mode}_s": elapsed, f"engine_{mode}_output_tok_s": w.output_tokens / elapsed,
                    f"engine_{mode}_total_tok_s": total / elapsed,
                    f"engine_{mode}_of_bound": row["bound_s"] / elapsed})
        for batch in (1, 8, 64):
            step = decode_latency(llm, w.config["vocab_size"], batch)
            floor = decode_floor_seconds(s, batch, c)
            print(f"  decode step, batch {batch:3d} ({mode}): {step * 1e3:.2f} ms = {step / floor:.2f}x the "
                  f"weights + KV read bound {floor * 1e3:.2f} ms [{c}]")
            row[f"decode_{mode}_ms_b{batch}"] = step * 1e3
            row[f"decode_{mode}_x_bound_b{batch}"] = step / floor


def hf_run(w: Workload, row: dict) -> None:
    hf_s, how = run_hf(w)
    free_gpu()
    print(f"HF transformers {transformers.__version__}: {_rates(w, hf_s)}  [{how}]")
    print(f"engine (async) / HF throughput: {hf_s / row['engine_async_s']:.2f}x")
    row.update(hf_s=hf_s, hf_how=how, speedup_vs_hf=hf_s / row["engine_async_s"])


def report(w: Workload, skip_hf: bool, c: Card, cudagraph_mode: str) -> dict:
    print(f"\n== {w.name}: {len(w.prompts)} requests, {w.prompt_tokens} prompt + {w.output_tokens} output "
          f"tokens, cudagraph_mode {cudagraph_mode}")
    with tempfile.TemporaryDirectory() as tmp:
        llm = load_engine(w, write_dummy_model_dir(w.config, Path(tmp) / w.name), cudagraph_mode)
    row = {"workload": w.name, "cudagraph_mode": cudagraph_mode, **roofline_seconds(w, c)}
    engine_runs(llm, w, c, row)  # one model load, one capture for both scheduling modes
    del llm
    free_gpu()
    if not skip_hf:
        hf_run(w, row)
    return row


# ---- prefill ---------------------------------------------------------------------------
def prefill_seconds(llm: LLM, prompts: list[list[int]]) -> float:
    """Wall time of generating one token for each prompt, all added at once: their prefill and one sample."""
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    t0 = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - t0


def prefill_report(c: Card, config: dict = LLAMA2_7B) -> list[dict]:
    """Prefill throughput at PREFILL_RUNS in model FLOPs (causal attention included) per second of the whole
    generate call, against the card's GEMM rate. Fresh prompts in every run: no prefix-cache hit."""
    longest = max(length for _, length in PREFILL_RUNS)
    # Room for the longest prompt and its one output token; the position limit changes no FLOP or byte.
    config = {**config, "max_position_embeddings": max(config["max_position_embeddings"], longest + 1)}
    print(f"\n== prefill alone (max_tokens=1), Llama-2-7B shape, max_model_len {longest + 1}")
    with tempfile.TemporaryDirectory() as tmp:
        llm = LLM(model=str(write_dummy_model_dir(config, Path(tmp) / "prefill")), load_format="dummy",
                  dtype="bfloat16", max_model_len=longest + 1)
    s, vocab, rows = Shape.of(config), config["vocab_size"], []
    for n, length in PREFILL_RUNS:
        runs = [random_requests(n, vocab, (length, length), 1, seed=1000 * length + i)[0]
                for i in range(PREFILL_REPS + 1)]
        prefill_seconds(llm, runs.pop())  # untimed: Triton compiles for these shapes
        t = statistics.median(prefill_seconds(llm, prompts) for prompts in runs)
        flops = s.flops(n * length, n * length * (length + 1) // 2, n)
        rate = flops / t
        print(f"prefill {n:2d} x {length} tokens: {t * 1e3:.1f} ms end to end (median of {PREFILL_REPS}), "
              f"{flops / 1e12:.1f} TFLOP -> {rate / 1e12:.0f} TFLOP/s = {rate / c.gemm_flops_per_s:.1%} "
              f"of the GEMM rate [{c}]")
        rows.append({"workload": f"prefill_{n}x{length}", "seconds": t, "flops": flops,
                     "of_gemm_rate": rate / c.gemm_flops_per_s})
    del llm
    free_gpu()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", choices=["W7", "W0.6", "all", "none"], default="all")
    ap.add_argument("--skip-hf", action="store_true", help="engine only")
    ap.add_argument("--prefill", action="store_true", help="then prefill alone: 1x4096, 16x2048 tokens")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--cudagraph-mode", nargs="+", default=["FULL_DECODE_ONLY"],
                    choices=["FULL_DECODE_ONLY", "FULL"], help="each workload once per mode (vLLM's names)")
    args = ap.parse_args()
    c = card()  # before any model takes the card's memory
    print(f"{c}  torch {torch.__version__}  transformers {transformers.__version__}")
    names = {"all": ["W7", "W0.6"], "none": []}.get(args.workload, [args.workload])
    # HF once per workload, beside the first mode's engine runs
    rows = [report(make_workload(n), args.skip_hf or i > 0, c, mode) for n in names
            for i, mode in enumerate(args.cudagraph_mode)]
    if args.prefill:
        rows += prefill_report(c)
    if args.json:
        args.json.write_text(json.dumps({"card": dataclasses.asdict(c), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
