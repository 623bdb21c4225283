"""Serving benchmark against a running OpenAI-compatible server (ours or vLLM), as `vllm bench serve`.

    python -m servebench.engine.server --model DIR --dtype float16 --max-model-len 4096 --port 8000 &
    python benchmarks/serve.py --url http://127.0.0.1:8000 --workload sharegpt --num-requests 500 \
        --request-rate 4
    python benchmarks/serve.py --num-requests 512 --max-concurrency 256 --disconnect-fraction 0.1  # saturated

Starts nothing. Replays the workload (workbench/workloads.py presets) with streaming, prints the metrics block
of `vllm bench serve` and writes a run folder under outputs/serve/ (requests.parquet, empty steps.parquet,
itl.npy, then summary.json: each written to a temporary name and renamed, the summary last, as every run).
Preemptions and prefix-cache hits are unknown at the client: they come from the server's /metrics counters,
read before and after the run. Requests whose prompt + output exceed the server's max_model_len are dropped.
With --disconnect-fraction, that share of the clients closes its stream after --disconnect-after tokens; the
output throughput then also counts the tokens those clients received. After the run the server must go idle:
/metrics is read until no request runs or waits and the KV usage is 0 (the leak check, printed last).
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

import httpx
import pandas as pd
from servebench.workbench.metrics import STEP_COLUMNS, summarize
from servebench.workbench.runs import clear_run, write_run
from servebench.workbench.serve_client import (
    APIS,
    counter_deltas,
    leak_check,
    load_tokenizer,
    pick_disconnects,
    received_throughput,
    run_serving_benchmark,
    server_counters,
    wait_until_idle,
)
from servebench.workbench.workloads import DEFAULTS, load_workload


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--workload", default="sharegpt", choices=list(DEFAULTS))
    p.add_argument("--num-requests", type=int, default=500)
    p.add_argument("--request-rate", type=float, default=None, help="req/s (default: all at once, or the "
                   "trace's own rate)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api", choices=list(APIS), default="completions")
    p.add_argument("--model", default=None, help="model name to send (default: the server's only model)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer dir, or 'approx' for the workloads' approximate tokenizer "
                   "(default: the served model's root dir when it exists here, else approx)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--disconnect-fraction", type=float, default=0.0,
                   help="share of the clients that close their stream mid-way")
    p.add_argument("--disconnect-after", type=int, default=4, help="tokens those clients read first")
    p.add_argument("--api-key", default=None)
    for key in ("ttft_ms", "tpot_ms", "e2el_ms"):
        p.add_argument(f"--slo-{key.replace('_', '-')}", type=float, default=None, help="goodput limit")
    p.add_argument("--output-dir", default=None, help="run folder (default: outputs/serve/WORKLOAD-TIME)")
    return p.parse_args()


def print_summary(s: dict, requests: pd.DataFrame) -> None:
    done = requests[requests["finish_reason"].isin(("stop", "length"))]
    rows = [("Successful requests:", s["num_finished"]),
            ("Failed requests:", s["num_requests"] - s["num_finished"]),
            ("Benchmark duration (s):", s["duration_s"]),
            ("Total input tokens:", int(done["prompt_tokens"].sum())),
            ("Total generated tokens:", int(done["output_tokens"].sum())),
            ("Request throughput (req/s):", s["request_throughput"]),
            ("Output token throughput (tok/s):", s["output_throughput"]),
            ("Total Token throughput (tok/s):", s["total_token_throughput"])]
    rows += [("Disconnected by the client:", s["num_aborted"]),  # the client's only aborts
             ("Output tok/s incl. disconnected:", s["received_throughput"])]
    if s["goodput"] == s["goodput"]:
        rows.append(("Request goodput (req/s):", s["goodput"]))
    print(f"{' Serving Benchmark Result ':=^50}")
    for label, value in rows:
        print(f"{label:<40}{value:<10.2f}" if isinstance(value, float) else f"{label:<40}{value:<10}")
    for key, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                       ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        print(f"{title:-^50}")
        for stat in ("mean", "median", "p90", "p99"):
            label = f"{stat.capitalize()} {key.upper()} (ms):"
            print(f"{label:<40}{s[f'{stat}_{key}_ms']:<10.2f}")
    print(f"{'Server (from /metrics)':-^50}")
    print(f"{'Preemptions:':<40}{s['num_preemptions']}")
    print(f"{'Prefix cache hit rate:':<40}{s['prefix_cache_hit_rate']:<10.4f}")
    print("=" * 50)


def main() -> None:
    args = parse_args()
    out = Path(args.output_dir or f"outputs/serve/{args.workload}-{time.strftime('%Y%m%d-%H%M%S')}")
    clear_run(out)  # before the run: an earlier run's results in this folder must not outlive a failed one
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    with httpx.Client(base_url=args.url, headers=headers, timeout=30) as http:
        try:
            card = http.get("/v1/models").raise_for_status().json()["data"][0]
        except httpx.HTTPError as e:
            raise SystemExit(f"serve.py: no OpenAI server at --url {args.url}: {e}") from None
        tokenizer = load_tokenizer(args.tokenizer or card.get("root"))
        encode = partial(tokenizer.encode, add_special_tokens=False) if tokenizer is not None else None
        workload = load_workload({"name": args.workload, "num_requests": args.num_requests,
                                  "request_rate": args.request_rate, "seed": args.seed}, encode)
        max_len = card.get("max_model_len")
        if max_len:
            fits = workload["prompt_tokens"] + workload["output_tokens"] <= max_len
            print(f"dropped {int((~fits).sum())} of {len(workload)} requests longer than "
                  f"max_model_len={max_len}")
            workload = workload[fits].reset_index(drop=True)
        before = server_counters(http)
        model = args.model or card["id"]
        disconnects = pick_disconnects(len(workload), args.disconnect_fraction, args.disconnect_after,
                                       args.seed)
        requests, itl = run_serving_benchmark(args.url, workload, tokenizer, model, args.api,
                                              max_concurrency=args.max_concurrency, api_key=args.api_key,
                                              disconnects=disconnects)
        after = server_counters(http)
        idle = wait_until_idle(http)
    slo = {key: getattr(args, f"slo_{key}") for key in ("ttft_ms", "tpot_ms", "e2el_ms")}
    summary = summarize(requests, None, itl, slo)
    summary.update(counter_deltas(before, after), received_throughput=received_throughput(requests),
                   server_after_load=idle[0])
    summary["config"] = {"backend": "server", **vars(args), "model": model, "api_key": None}
    print_summary(summary, requests)
    steps = pd.DataFrame({c: pd.Series(dtype=float) for c in STEP_COLUMNS})  # only the server knows its steps
    print(f"run folder: {write_run(out, requests, steps, summary, itl)}")
    print(leak_check(*idle))


if __name__ == "__main__":
    main()
