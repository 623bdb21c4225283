"""How often a random ~1B Llama's first 32 greedy tokens agree between bf16 implementations, by weight init.

    python benchmarks/one_b_greedy.py [--inits 0.02 0.05 0.1 0.2] [--prompts 64]

For each initializer_range (the std of every weight matrix, HF's `_init_weights`) it writes the model that
tests/test_engine_gpu.py builds (TinyLlama's shape on the tests' 384-token vocabulary), greedily decodes 32
tokens for the same random prompts with the engine (bf16) and with HF transformers in bf16 (sdpa and eager
attention) and fp32, and prints how many prompts each pair of implementations decodes identically. With
small weights the logits are flat, so bf16 rounding decides the argmax often; any two implementations that
are not bit-identical (HF's own two attention implementations included) then part early.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_model import ONE_B, build_tiny_model, hf_greedy, hf_model, random_prompts  # noqa: E402

from servebench import LLM, SamplingParams  # noqa: E402

NUM_TOKENS = 32


def engine_greedy(path: Path, prompts: list[list[int]]) -> list[list[int]]:
    llm = LLM(model=str(path), dtype="bfloat16", max_model_len=1024, gpu_memory_utilization=0.5)
    params = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True)
    out = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                        use_tqdm=False)]
    del llm
    release()
    return out


def release() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def same(a: list[list[int]], b: list[list[int]]) -> int:
    return sum(x == y for x, y in zip(a, b))


def study(initializer_range: float, num_prompts: int) -> None:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_model(tmp, dtype=torch.bfloat16, device="cuda",
                                **(ONE_B | {"initializer_range": initializer_range}))
        release()
        prompts = random_prompts(path, num_prompts)
        ours = engine_greedy(path, prompts)
        runs = {}
        for name, dtype, attn in (("hf_bf16", torch.bfloat16, "sdpa"),
                                  ("hf_bf16_eager", torch.bfloat16, "eager"),
                                  ("hf_fp32", torch.float32, "sdpa")):
            model = hf_model(path, dtype, attn)
            runs[name] = hf_greedy(model, prompts, NUM_TOKENS)
            del model
            release()
    n = num_prompts
    print(f"initializer_range {initializer_range}: first {NUM_TOKENS} greedy tokens identical on "
          f"ours=HF bf16 {same(ours, runs['hf_bf16'])}/{n}, HF bf16 eager=HF bf16 sdpa "
          f"{same(runs['hf_bf16_eager'], runs['hf_bf16'])}/{n}, HF bf16=HF fp32 "
          f"{same(runs['hf_bf16'], runs['hf_fp32'])}/{n}, ours=HF fp32 {same(ours, runs['hf_fp32'])}/{n} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inits", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2])
    ap.add_argument("--prompts", type=int, default=64)
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "transformers", transformers.__version__)
    for init in args.inits:
        study(init, args.prompts)


if __name__ == "__main__":
    main()
