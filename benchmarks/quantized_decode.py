"""Decode step time of the engine with quantized weights (and KV cache) against the read bound of the bytes
it holds, on the card in hand.

    python benchmarks/quantized_decode.py --model llama2_7b                       # none, fp8, awq on the GPU
    python benchmarks/quantized_decode.py --model llama3_8b --kv-cache-dtype fp8 --batches 1 8 64
    python benchmarks/quantized_decode.py --model tiny_llama --device cpu --dtype float32 --group-size 32
                                                                                  # a CPU dry run: no bound

For each --quantization (none, fp8, awq, gptq) the model shape of conf/model/<--model>.yaml is built with
dummy weights (awq and gptq: group size --group-size, quantized at load like fp8), and at each batch size the
median of DECODE_STEPS pure decode steps (CUDA graphs, contexts from DECODE_PROMPT tokens on) is printed
against the bound of one step's reads at the card's measured copy bandwidth (benchmarks/card.py): every
weight byte the engine holds, as quantized (int4: packed values, scales and zero points; fp8: e4m3 and
per-channel scales), less the embedding's unread rows, plus each request's K/V at the mean context in the
cache's dtype. Every bound line names the card and its ceilings. Then each method's speedup over none.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import yaml
from card import Card, card
from engine_throughput import DECODE_PROMPT, DECODE_STEPS, decode_latency
from servebench.engine.dummy import MODEL_CONF, hf_config, write_dummy_model_dir
from servebench.engine.llm_engine import release_engines
from servebench.engine.model_runner import ModelRunner

from servebench import LLM

METHODS = ("none", "fp8", "awq", "gptq")


def model_dir(spec: dict, quantization: str, group_size: int, root: Path) -> Path:
    """The dummy model folder of spec; awq and gptq carry the quantization_config a checkpoint would."""
    config = hf_config(spec)
    if quantization in ("awq", "gptq"):
        config["quantization_config"] = {"quant_method": quantization, "bits": 4, "group_size": group_size}
    return write_dummy_model_dir(config, root / quantization)


def read_bytes(runner: ModelRunner, batch: int) -> tuple[int, int]:
    """(weight bytes, KV bytes) one decode step of `batch` requests reads: the parameters less the embedding
    (a few rows read; unless the LM head shares it), and the K/V of the mean context of the decode runs."""
    model = runner.model
    embedding = model.model.embed_tokens.weight
    weights = runner.weight_bytes - (0 if model.config.tie_word_embeddings else embedding.nbytes)
    context = DECODE_PROMPT + DECODE_STEPS // 2
    return weights, batch * context * runner.kv_cache.block_bytes // runner.block_size


def measure(spec: dict, quantization: str, args: argparse.Namespace, c: Card | None,
            root: Path) -> list[dict]:
    folder = model_dir(spec, quantization, args.group_size, root)
    llm = LLM(model=str(folder), load_format="dummy", dtype=args.dtype, device=args.device,
              quantization=None if quantization == "none" else quantization,
              kv_cache_dtype=args.kv_cache_dtype, max_model_len=DECODE_PROMPT + DECODE_STEPS + 1,
              max_num_seqs=max(args.batches))
    runner, rows = llm.engine.runner, []
    decode_latency(llm, spec["vocab_size"], 1, steps=4)  # untimed: Triton compiles for these shapes
    for batch in args.batches:
        step = decode_latency(llm, spec["vocab_size"], batch)
        weights, kv = read_bytes(runner, batch)
        row = {"quantization": quantization, "kv_cache_dtype": args.kv_cache_dtype, "batch": batch,
               "step_ms": step * 1e3, "weight_gb": weights / 1e9, "kv_gb": kv / 1e9}
        line = (f"{quantization:>4} batch {batch:3d}: decode step {step * 1e3:8.2f} ms; reads "
                f"{weights / 1e9:.4g} GB of weights + {kv / 1e9:.4g} GB of KV ({args.kv_cache_dtype})")
        if c is not None:
            bound = c.read_seconds(weights + kv)
            row |= {"bound_ms": bound * 1e3, "x_bound": step / bound}
            line += f" = {step / bound:.2f}x the read bound {bound * 1e3:.2f} ms [{c}]"
        print(line, flush=True)
        rows.append(row)
    del llm, runner
    release_engines()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama2_7b", help="a conf/model shape")
    ap.add_argument("--quantization", nargs="+", choices=METHODS, default=["none", "fp8", "awq"])
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    ap.add_argument("--group-size", type=int, default=128, help="awq and gptq (AutoAWQ's default: 128)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    spec = yaml.safe_load((MODEL_CONF / f"{args.model}.yaml").read_text())
    c = card() if args.device != "cpu" and torch.cuda.is_available() else None  # before any model loads
    print(c if c is not None else "no CUDA card: step times only, no bound")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for quantization in args.quantization:
            rows += measure(spec, quantization, args, c, Path(tmp))
    plain = {r["batch"]: r["step_ms"] for r in rows if r["quantization"] == "none"}
    for r in rows:
        if r["quantization"] != "none" and r["batch"] in plain:
            r["speedup_vs_none"] = plain[r["batch"]] / r["step_ms"]
            print(f"{r['quantization']} batch {r['batch']}: {r['speedup_vs_none']:.2f}x the unquantized step")
    if args.json:
        args.json.write_text(json.dumps({"card": None if c is None else str(c), "model": args.model,
                                         "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
