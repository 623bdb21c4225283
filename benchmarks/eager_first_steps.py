"""The first eager steps of a fresh engine against later ones of the same shape, and what Triton compiled for
each: where the 1-2 s stalls of the first steps over 2,048 tokens come from.

    python benchmarks/eager_first_steps.py                        # Llama-2-7B shape (dummy weights), GPU
    python benchmarks/eager_first_steps.py --model tiny_llama --device cpu --dtype float32 --sizes 40 70
                                                    # a CPU dry run (no Triton there: nothing compiles)

With cudagraph_mode FULL (the default) a step of up to 2,048 tokens replays a CUDA graph captured at start,
so its kernels were compiled then; a larger step runs eagerly. In the H200 fidelity runs of 2026-12-06 such
a step took 1.1-2.3 s the first time (`ho_code_burst_async` step 0: 3,180 tokens, 1.19 s; its rerun 72 ms).
Here, on one engine after its start-up: for each --sizes N, one prompt of N tokens (max_tokens=1: a
prefill-only step), then --seqs prompts sharing N tokens (a step of that many sequences), each shape twice
with fresh prompts. Printed per call: its wall time and the kernels Triton compiled during it (new entries
in a TRITON_CACHE_DIR of this run's own, so nothing is found in an older cache). A first call much slower
than the second, with kernels listed, is a compile at serving time that the start-up should have done.

On an H100 (results/h100_eager_first_steps.log, the block-table width already unspecialized) three first
calls took 688-740 ms against 48-102 ms for the second, each compiling _paged_attention_kernel: its decode
launch at a split count (8, 16, 2) that the CUDA graphs had compiled with their block tables 4 bytes off a
16-byte boundary, where an eager step passes a fresh, aligned tensor. engine/cuda_graphs.py now aligns the
graphs' inputs (VIEW_ALIGN).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

CACHE = Path(tempfile.mkdtemp(prefix="triton_cache_"))
os.environ["TRITON_CACHE_DIR"] = str(CACHE)  # before Triton is imported: every compile of this run lands here

import yaml  # noqa: E402
from engine_throughput import random_requests  # noqa: E402
from servebench.engine.dummy import MODEL_CONF, hf_config, write_dummy_model_dir  # noqa: E402

from servebench import LLM, SamplingParams  # noqa: E402


def timed_call(llm: LLM, prompts: list[list[int]]) -> tuple[float, list[str]]:
    """Wall time of one token for each prompt (added together: one step if they fit the budget), and the
    kernels compiled meanwhile."""
    before = compiled_counts()
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    t0 = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    after = compiled_counts()
    return seconds, sorted(name for name, n in after.items() if n > before.get(name, 0))


def compiled_counts() -> dict[str, int]:
    """Specializations per kernel name in this run's Triton cache (a folder each, its `<kernel>.json`)."""
    counts: dict[str, int] = {}
    for p in CACHE.glob("*/*.json"):
        if not p.name.startswith("__grp__"):
            counts[p.stem] = counts.get(p.stem, 0) + 1
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama2_7b", help="a conf/model shape")
    ap.add_argument("--sizes", type=int, nargs="+", default=[2093, 2221, 3180, 4096, 7703],
                    help="tokens of the steps, each above the largest mixed graph (2,048) to run eagerly")
    ap.add_argument("--seqs", type=int, default=7, help="sequences of the second step of each size")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    a = ap.parse_args()
    spec = yaml.safe_load((MODEL_CONF / f"{a.model}.yaml").read_text())
    longest = max(a.sizes) + 1
    config = hf_config(spec)
    config["max_position_embeddings"] = max(config["max_position_embeddings"], longest)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        llm = LLM(model=str(write_dummy_model_dir(config, Path(tmp) / a.model)), load_format="dummy",
                  dtype=a.dtype, device=a.device, max_model_len=longest, max_num_batched_tokens=longest)
    at_start = sum(compiled_counts().values())
    print(f"{a.model}: engine ready in {time.perf_counter() - t0:.1f} s, {at_start} kernels compiled at "
          f"start (cache {CACHE})")
    vocab, seed = config["vocab_size"], 0
    for n in a.sizes:
        for seqs in (1, a.seqs):
            for call in ("first", "second"):
                seed += 1
                prompts, _ = random_requests(seqs, vocab, (n // seqs, n // seqs), 1, seed=seed)
                seconds, kernels = timed_call(llm, prompts)
                print(f"{n:5d} tokens, {seqs} sequences, {call}: {seconds * 1e3:8.1f} ms"
                      + (f"; compiled {', '.join(kernels)}" if kernels else ""))


if __name__ == "__main__":
    main()
