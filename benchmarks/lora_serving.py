"""Multi-LoRA serving on the card in hand: throughput of a Zipf tenant mix over N random adapters against the
base model alone, the time to load an adapter, and the memory the adapters take.

    python benchmarks/lora_serving.py                                 # Llama-2-7B shape, 8 and 32 adapters
    python benchmarks/lora_serving.py --adapters 16 64 --max-loras 16 --json lora.json
    python benchmarks/lora_serving.py --tiny --device cpu             # a smoke test: tiny_llama, < 1 minute

The model is the shape of conf/model/<--model>.yaml with dummy weights (load_format="dummy", as the other
benchmarks); the adapters are random PEFT folders of rank --rank on every q/k/v/o and gate/up/down projection,
written to a temporary folder. The workload: --requests requests, prompts of U[--prompt-len] random token
ids, --output-len tokens each (ignore_eos), all submitted at once; each request's adapter drawn Zipf(--zipf-s)
over adapters 1..N (the workbench's assign_adapters, so tenant k has weight k^-s). Runs, each on a fresh
prefix cache after an untimed warm-up:
  base       the base model alone, enable_lora=False (the baseline);
  lora-base  enable_lora=True, every request on the base model: what the LoRA layers cost without adapters;
  lora-N     the Zipf mix over N adapters, --max-loras GPU slots, a CPU cache of --max-cpu-loras (None: N).
Printed and in the JSON: output and total tokens/s and their ratio to base; the adapter loads the scheduler's
LoRA slots decided (engine/core/lora.py), from disk and from the CPU cache, and their mean time from the
steps table (`lora_load_s`); one adapter's load timed alone, disk to host (the folder was just written: the
page cache serves it) and host to device; the GPU memory of the slot tables and the KV cache it displaced.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import yaml
from servebench.engine.config import LORA_RANKS, ModelConfig
from servebench.engine.dummy import MODEL_CONF, hf_config, write_dummy_adapter, write_dummy_model_dir
from servebench.engine.llm_engine import release_engines
from servebench.engine.lora import LoRARequest, read_adapter
from servebench.workbench.metrics import lora_loads
from servebench.workbench.workload_requests import assign_adapters

from servebench import LLM, SamplingParams

GiB = 2**30
TINY = {"model": "tiny_llama", "requests": 16, "prompt_len": (8, 32), "output_len": 8, "adapters": [4],
        "max_loras": 2, "max_model_len": 64}


def workload(args: argparse.Namespace, vocab: int) -> list[list[int]]:
    """--requests prompts of U[--prompt-len] token ids in [1, vocab - 1), from random.Random(0)."""
    rng = random.Random(0)
    return [[rng.randrange(1, vocab - 1) for _ in range(rng.randint(*args.prompt_len))]
            for _ in range(args.requests)]


def engine(folder: Path, args: argparse.Namespace, **lora: object) -> LLM:
    return LLM(model=str(folder), load_format="dummy", dtype=args.dtype, device=args.device,
               max_model_len=args.max_model_len, **lora)


def timed_run(llm: LLM, prompts: list[list[int]], loras: list[LoRARequest | None], args: argparse.Namespace,
              name: str) -> dict:
    """One untimed warm-up (Triton compiles), then the workload on a fresh scheduler and prefix cache."""
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    warm = [{"prompt_token_ids": p} for p in prompts[:4]]
    llm.generate(warm, params, use_tqdm=False, lora_request=loras[:4])
    llm.engine.reset()
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False,
                        lora_request=loras)
    elapsed = time.perf_counter() - t0
    output = sum(len(o.outputs[0].token_ids) for o in outs)
    total = output + sum(map(len, prompts))
    row = {"run": name, "seconds": elapsed, "output_tok_s": output / elapsed, "total_tok_s": total / elapsed,
           "adapters": len({lora.lora_int_id for lora in loras if lora is not None})}
    if any(loras):
        row |= lora_loads(pd.DataFrame(llm.engine.recorder.steps_table()))
    return row


def load_alone(llm: LLM, adapter: LoRARequest, cfg: ModelConfig) -> dict:
    """One adapter read from its folder and packed (disk to host), then copied into GPU slot 1 (host to
    device), each timed alone; the engine is reset afterwards, as slot 1 no longer holds what its scheduler
    put there."""
    manager, on_gpu = llm.engine.runner.lora, llm.engine.runner.device.type == "cuda"
    llm.engine.add_lora(adapter)
    t0 = time.perf_counter()
    weights = read_adapter(adapter, manager.requests[adapter.lora_int_id][1], cfg.num_layers)
    packed = manager.tables.pack(weights, pin=on_gpu)
    t1 = time.perf_counter()
    manager.tables.write(1, packed)
    if on_gpu:
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    llm.engine.reset()
    nbytes = sum(a.nbytes + b.nbytes for a, b in packed)
    return {"adapter_mib": nbytes / 2**20, "disk_to_host_ms": (t1 - t0) * 1e3,
            "host_to_device_ms": (t2 - t1) * 1e3}


def print_row(row: dict, base: dict) -> None:
    ratio = row["output_tok_s"] / base["output_tok_s"]
    line = (f"{row['run']:>10}: {row['seconds']:7.2f} s  {row['output_tok_s']:9,.0f} output tok/s  "
            f"{row['total_tok_s']:9,.0f} total tok/s  = {ratio:.2f}x base")
    if "lora_loads" in row:
        line += (f"; {row['adapters']} adapters used, {row['lora_loads']} loads "
                 f"({row['lora_loads_from_disk']} from disk), {row['mean_lora_load_ms']:.2f} ms each")
    print(line, flush=True)


def print_memory(m: dict) -> None:
    share = m["lora_slots_gib"] / m["weight_gib"]
    print(f"memory: LoRA slot tables {m['lora_slots_gib']:.3f} GiB for {m['max_loras']} adapters (weights "
          f"{m['weight_gib']:.2f} GiB: +{share:.1%}); KV cache {m['kv_cache_gib']:.2f} GiB against "
          f"{m['kv_cache_gib_base']:.2f} GiB without LoRA")
    print(f"one adapter ({m['adapter_mib']:.1f} MiB in the slot layout): disk to host "
          f"{m['disk_to_host_ms']:.1f} ms (page cache), host to device {m['host_to_device_ms']:.2f} ms")


def lora_runs(folder: Path, adapters: list[LoRARequest], prompts: list[list[int]], args: argparse.Namespace,
              cfg: ModelConfig, base: dict) -> tuple[list[dict], dict]:
    """lora-base and lora-N for each N of --adapters on one LoRA engine; its memory and one timed load."""
    slots = args.max_loras
    llm = engine(folder, args, enable_lora=True, max_loras=slots, max_lora_rank=args.max_lora_rank,
                 max_cpu_loras=args.max_cpu_loras or max(args.adapters + [slots]))
    runner = llm.engine.runner
    rows = [timed_run(llm, prompts, [None] * len(prompts), args, "lora-base")]
    print_row(rows[-1], base)
    for n in args.adapters:
        tenants = assign_adapters(pd.DataFrame(index=range(len(prompts))), n, "zipf", args.zipf_s, 0)
        rows.append(timed_run(llm, prompts, [adapters[k - 1] for k in tenants["lora_id"]], args, f"lora-{n}"))
        print_row(rows[-1], base)
    memory = {"lora_slots_gib": runner.lora_bytes / GiB, "kv_cache_gib": runner.kv_cache_bytes / GiB,
              "weight_gib": runner.weight_bytes / GiB, "max_loras": slots}
    memory |= load_alone(llm, adapters[0], cfg)
    del llm, runner
    release_engines()
    return rows, memory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help=f"a smoke test: {TINY}")
    ap.add_argument("--model", default="llama2_7b", help="a conf/model shape")
    ap.add_argument("--adapters", type=int, nargs="+", default=[8, 32], help="N: adapters of each LoRA run")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--zipf-s", type=float, default=1.1)
    ap.add_argument("--max-loras", type=int, default=8)
    ap.add_argument("--max-cpu-loras", type=int, default=None)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, nargs=2, default=[128, 512])
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--dtype", default=None, help="default: bfloat16 (float32 on the CPU)")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if args.tiny:
        vars(args).update(TINY)
    on_cpu = args.device == "cpu" or not torch.cuda.is_available()
    args.dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
    args.max_lora_rank = next((r for r in LORA_RANKS if r >= args.rank), None)
    if args.max_lora_rank is None:
        raise SystemExit(f"--rank {args.rank}: the engine serves ranks up to {LORA_RANKS[-1]}")
    spec = yaml.safe_load((MODEL_CONF / f"{args.model}.yaml").read_text())
    device = "cpu" if on_cpu else torch.cuda.get_device_name()
    print(f"{args.model} (dummy {args.dtype} weights) on {device}: {args.requests} requests, prompts "
          f"U{tuple(args.prompt_len)}, {args.output_len} output tokens; rank-{args.rank} adapters, Zipf "
          f"s={args.zipf_s}, {args.max_loras} GPU slots")
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_dummy_model_dir(hf_config(spec), Path(tmp) / spec["name"])
        cfg = ModelConfig.from_dir(folder)
        prompts = workload(args, spec["vocab_size"])
        base_llm = engine(folder, args)
        base = timed_run(base_llm, prompts, [None] * len(prompts), args, "base")
        base_kv_gib = base_llm.engine.runner.kv_cache_bytes / GiB
        del base_llm
        release_engines()
        print_row(base, base)
        adapters = [LoRARequest(f"tenant-{i}", i, str(write_dummy_adapter(Path(tmp) / f"tenant-{i}", cfg,
                                                                          args.rank, seed=i)))
                    for i in range(1, max(args.adapters) + 1)]
        rows, memory = lora_runs(folder, adapters, prompts, args, cfg, base)
    memory["kv_cache_gib_base"] = base_kv_gib
    print_memory(memory)
    if args.json:
        result = {"device": device, "model": args.model, "args": {k: v for k, v in vars(args).items()
                                                                   if k != "json"},
                  "rows": [base, *rows], "memory": memory}
        args.json.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
