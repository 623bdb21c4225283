"""Tensor parallelism on the cards in hand: the engine's throughput at each tensor_parallel_size, and the
all-reduce it pays per step against the link's measured bandwidth.

    python benchmarks/tensor_parallel.py --model llama2_13b --tp 1 2          # 2 GPUs
    python benchmarks/tensor_parallel.py --model codellama_34b --tp 2 --json tp.json
    python benchmarks/tensor_parallel.py --tiny --device cpu                  # a smoke test: gloo, < 1 minute

The model is the shape of conf/model/<--model>.yaml with dummy weights; a size that does not fit one card
fails at its start and the next size runs. The workload (W7-like; lora_serving.py's): --requests requests,
prompts of U[--prompt-len] random token ids, --output-len tokens each (ignore_eos), all submitted at once,
after an untimed warm-up. Printed and in the JSON, per size: output and total tokens/s, and the median
decode step of the steps table at batch 1-8 and 33-128; then the all-reduce of one step's hidden states,
timed alone in a process group of the largest size (NCCL on GPUs, gloo on the CPU) for 1 to 8192 tokens, as
time and bus bandwidth (2 (n - 1) / n x bytes / time, nccl-tests' convention), and the share of a decode step
it takes (2 all-reduces a layer).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
import yaml
from lora_serving import workload
from servebench.engine.dummy import MODEL_CONF, hf_config, write_dummy_model_dir
from servebench.engine.parallel import free_port, init_distributed

from servebench import LLM, SamplingParams

TINY = {"model": "tiny_llama", "requests": 8, "prompt_len": (16, 48), "output_len": 8, "max_model_len": 128,
        "tp": [1, 2]}
TOKENS = (1, 8, 64, 256, 1024, 8192)  # all-reduce message sizes: tokens x hidden
REPS = 20


def throughput(folder: Path, tp: int, args: argparse.Namespace) -> dict:
    """One size's timed run (a short untimed one first: graphs, autotuning)."""
    llm = LLM(model=str(folder), load_format="dummy", dtype=args.dtype, device=args.device,
              max_model_len=args.max_model_len, tensor_parallel_size=tp)
    try:
        prompts = workload(args, llm.engine.vocab_size)
        params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
        llm.generate([{"prompt_token_ids": p} for p in prompts[:4]], params, use_tqdm=False)
        llm.engine.reset()
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        steps = pd.DataFrame(llm.engine.recorder.steps_table())
    finally:
        llm.engine.shutdown()
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    decode = steps[steps["num_prefill_tokens"] == 0]
    step_ms = {name: 1e3 * float(decode[decode["num_decode_tokens"].between(lo, hi)]["duration_s"].median())
               for name, (lo, hi) in (("decode_b1-8", (1, 8)), ("decode_b33-128", (33, 128)))}
    return {"tp": tp, "seconds": seconds, "output_tok_s": out_tokens / seconds,
            "total_tok_s": (out_tokens + sum(map(len, prompts))) / seconds, **step_ms}


def _time_all_reduce(rank: int, size: int, port: int, device: str, hidden: int, dtype: torch.dtype,
                     results: mp.Queue) -> None:
    dev = torch.device(device)
    init_distributed(rank, size, port, dev)
    dev = torch.device("cuda", rank) if dev.type == "cuda" else dev
    rows = []
    for tokens in TOKENS:
        x = torch.ones(tokens, hidden, dtype=dtype, device=dev)
        times = []
        for i in range(REPS + 3):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            dist.all_reduce(x)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i >= 3:
                times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        nbytes = x.numel() * x.element_size()
        rows.append({"tokens": tokens, "bytes": nbytes, "ms": 1e3 * t,
                     "bus_gbs": 2 * (size - 1) / size * nbytes / t / 1e9})
    if rank == 0:
        results.put(rows)
    dist.destroy_process_group()


def all_reduce_table(size: int, device: str, hidden: int, dtype: torch.dtype) -> list[dict]:
    ctx = mp.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_time_all_reduce, args=(r, size, port, device, hidden, dtype, results))
             for r in range(size)]
    for p in procs:
        p.start()
    rows = results.get(timeout=600)
    for p in procs:
        p.join(60)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help=f"a smoke test: {TINY}")
    ap.add_argument("--model", default="llama2_13b", help="a conf/model shape")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="tensor_parallel_size of each run")
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, nargs=2, default=[100, 1024])
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--dtype", default=None, help="default: bfloat16 (float32 on the CPU)")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    spec = yaml.safe_load((MODEL_CONF / f"{args.model}.yaml").read_text())
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    cards = [torch.cuda.get_device_name(i) for i in range(gpus)]
    print(f"{args.model} on {', '.join(cards) or 'the CPU'}: {args.requests} requests, prompts "
          f"U{tuple(args.prompt_len)}, {args.output_len} out, {args.dtype}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_dummy_model_dir(hf_config(spec), Path(tmp) / args.model)
        for tp in args.tp:
            try:
                row = throughput(folder, tp, args)
            except (ValueError, RuntimeError) as e:  # does not fit, or a size the model cannot split
                print(f"tp={tp}: not run: {str(e).splitlines()[0]}")
                continue
            rows.append(row)
            print(f"tp={tp}: {row['seconds']:.2f} s, {row['output_tok_s']:,.0f} output tok/s, "
                  f"{row['total_tok_s']:,.0f} total tok/s; decode step b1-8 {row['decode_b1-8']:.2f} ms, "
                  f"b33-128 {row['decode_b33-128']:.2f} ms")
    size, dtype = max(args.tp), getattr(torch, args.dtype)
    table = all_reduce_table(size, device, spec["hidden_size"], dtype) if size > 1 else []
    layers = spec["num_layers"]
    for r in table:
        print(f"all-reduce of {r['tokens']} tokens x {spec['hidden_size']} ({r['bytes'] / 2**20:.2f} MiB) on "
              f"{size} ranks: {r['ms']:.3f} ms, bus {r['bus_gbs']:.1f} GB/s; x {2 * layers} a step: "
              f"{2 * layers * r['ms']:.2f} ms")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "cards": cards, "args": vars(args) | {
            "json": str(args.json)}, "runs": rows, "all_reduce": table}, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
