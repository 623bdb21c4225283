"""The OpenAI server at saturation against the offline engine: same card, model and requests, one run.

    python benchmarks/serve_vs_offline.py --json out.json      # Llama-2-7B shape, 512 requests, 256 streams
    python benchmarks/serve_vs_offline.py --model tiny_llama --device cpu --dtype float32 --num-requests 16 \\
        --max-concurrency 8 --prompt-len 20 100 --output-len 16 --max-model-len 512      # a CPU dry run

One model folder (--model: a conf/model shape written as a dummy HF folder, random weights) and one request
set (engine_throughput's generator: prompts of U[--prompt-len] tokens, --output-len tokens each, ignore_eos):
  offline  LLM.generate of all requests at t=0, with async scheduling off and on: one model load, a fresh
           prefix cache for each run, in a child process so that its GPU memory is free again afterwards;
  server   `python -m servebench.engine.server` on the same folder with the same engine flags (a subprocess),
           loaded through workbench/serve_client.py with --max-concurrency streams from --client-processes
           processes (one event loop alone could cap the rate it measures); --disconnect-fraction of the
           clients close their stream after --disconnect-after tokens. Offline, those requests ask for
           that many tokens, so that both sides produce the same tokens for their clients.
Prints each side's output tok/s (the server's counts the tokens its clients received, disconnected streams
included, from the first request sent to the last token), server / offline in the server's scheduling mode,
and the leak check: /metrics must come back to 0 running, 0 waiting and a KV usage of 0 after the load.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pandas as pd
from servebench.workbench.serve_client import (
    leak_check,
    pick_disconnects,
    received_throughput,
    run_serving_benchmark,
    server_counters,
    wait_until_idle,
)

WARMUP_REQUESTS, WARMUP_TOKENS = 32, 8  # untimed, on each side: Triton compiles, first allocations


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama2_7b", help="a conf/model shape name or a model folder")
    p.add_argument("--num-requests", type=int, default=512)
    p.add_argument("--max-concurrency", type=int, default=256, help="client streams at a time, all together")
    p.add_argument("--client-processes", type=int, default=4,
                   help="processes that share the streams (one event loop may lag the server's chunks)")
    p.add_argument("--prompt-len", type=int, nargs=2, default=[100, 1024], metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--disconnect-fraction", type=float, default=0.1)
    p.add_argument("--disconnect-after", type=int, default=4, help="tokens a disconnecting client reads")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                   help="the server's scheduling mode (offline runs both)")
    p.add_argument("--server-start-timeout", type=float, default=300.0)
    p.add_argument("--server-log", type=Path, default=None, help="the server's output (default: a temp file)")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args()


def engine_flags(args: argparse.Namespace) -> dict:
    """The engine arguments both sides get (async scheduling apart)."""
    return {"load_format": "dummy", "dtype": args.dtype, "max_model_len": args.max_model_len,
            "device": args.device}


def server_argv(model_dir: Path, flags: dict, async_scheduling: bool, port: int) -> list[str]:
    argv = [sys.executable, "-m", "servebench.engine.server", "--model", str(model_dir), "--port", str(port)]
    for key, value in flags.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv + ["--async-scheduling" if async_scheduling else "--no-async-scheduling"]


# ---- offline (in a child process) ------------------------------------------------------
def run_offline(model_dir: str, flags: dict, warmup: list[list[int]], prompts: list[list[int]],
                max_tokens: list[int]) -> dict:
    """Seconds of LLM.generate over all requests, per scheduling mode, after the warm-up prompts; runs in a
    child process."""
    from servebench import LLM, SamplingParams

    llm = LLM(model=model_dir, **flags)
    warm = SamplingParams(temperature=0.0, max_tokens=WARMUP_TOKENS, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in warmup], warm, use_tqdm=False)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in max_tokens]
    seconds = {}
    for mode in ("sync", "async"):
        llm.engine.args.async_scheduling = mode == "async"
        llm.engine.reset()  # no prefix-cache hits from the warm-up or the other mode's run
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        seconds[mode] = time.perf_counter() - t0
        assert [len(o.outputs[0].token_ids) for o in outs] == max_tokens
    return seconds


def offline_in_child(*args: object) -> dict:
    # spawn, not fork: the child initialises CUDA itself, and its exit frees the card for the server.
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(run_offline, *args).result()


# ---- server ----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(http: httpx.Client, server: subprocess.Popen, log: Path, timeout_s: float) -> str:
    """The served model's name once /health answers 200; exits with the log's tail if the server dies."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if http.get("/health").status_code == 200:
                return http.get("/v1/models").json()["data"][0]["id"]
        except httpx.TransportError:
            pass
        time.sleep(1.0)
    raise SystemExit(f"no /health answer within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


def request_table(prompts: list[list[int]], output_len: int) -> pd.DataFrame:
    """All requests at t=0, as serve_client replays them."""
    return pd.DataFrame({"request_id": [f"r{i}" for i in range(len(prompts))], "arrival_s": 0.0,
                         "prompt_tokens": [len(p) for p in prompts], "prompt_token_ids": prompts,
                         "output_tokens": output_len})


def client_shard(url: str, model: str, table: pd.DataFrame, concurrency: int, disconnects: dict[int, int],
                 start_at: float) -> pd.DataFrame:
    """One client process's share of the load, begun at wall time `start_at`; its times count from then."""
    time.sleep(max(0.0, start_at - time.time()))
    late = time.time() - start_at  # a shard that started late shifts its times, so that all share one origin
    requests, _ = run_serving_benchmark(url, table, None, model, max_concurrency=concurrency,
                                        disconnects=disconnects)
    return requests.assign(**{c: requests[c] + late for c in ("arrival_s", "first_token_s", "finish_s")})


def drive_load(url: str, model: str, table: pd.DataFrame, args: argparse.Namespace,
               disconnects: dict[int, int]) -> pd.DataFrame:
    """The load from --client-processes processes, rows dealt round-robin, streams split evenly."""
    k = args.client_processes
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(k, mp_context=spawn) as pool:
        start_at = time.time() + 5.0  # the processes start and import meanwhile
        futures = []
        for j in range(k):
            rows = range(j, len(table), k)
            cuts = {pos: disconnects[row] for pos, row in enumerate(rows) if row in disconnects}
            futures.append(pool.submit(client_shard, url, model, table.iloc[rows].reset_index(drop=True),
                                       max(args.max_concurrency // k, 1), cuts, start_at))
        return pd.concat([f.result() for f in futures], ignore_index=True)


def run_server(model_dir: Path, flags: dict, warmup: pd.DataFrame, table: pd.DataFrame,
               args: argparse.Namespace, disconnects: dict[int, int], log: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        server = subprocess.Popen(server_argv(model_dir, flags, args.async_scheduling, port), stdout=out,
                                  stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            model = wait_ready(http, server, log, args.server_start_timeout)
            run_serving_benchmark(url, warmup, None, model)
            before = server_counters(http)
            requests = drive_load(url, model, table, args, disconnects)
            load, waited = wait_until_idle(http)
            generated = server_counters(http)["vllm:generation_tokens"] - before["vllm:generation_tokens"]
            health = http.get("/health").status_code
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    return {"requests": requests, "load": load, "waited_s": waited, "health": health, "generated": generated}


# ---- report ----------------------------------------------------------------------------
def check_tokens(requests: pd.DataFrame, max_tokens: list[int]) -> int:
    """Requests that did not get their tokens: failed ones, and streams cut short but not by their client."""
    reason = requests["finish_reason"].astype(str)
    short = requests["output_tokens"].to_numpy() < max_tokens
    return int((reason.str.startswith("error") | ((reason != "abort") & short)).sum())


def report(args: argparse.Namespace, offline: dict, served: dict, max_tokens: list[int]) -> dict:
    tokens, requests = sum(max_tokens), served["requests"]
    for mode, seconds in offline.items():
        print(f"offline ({mode} scheduling): {len(max_tokens)} requests, {tokens:,} output tokens in "
              f"{seconds:.2f} s: {tokens / seconds:,.0f} output tok/s")
    mode = "async" if args.async_scheduling else "sync"
    rate, disconnected = received_throughput(requests), int((requests["finish_reason"] == "abort").sum())
    duration = requests["finish_s"].max() - requests["arrival_s"].min()
    print(f"server ({mode} scheduling, {args.max_concurrency} streams from {args.client_processes} "
          f"processes, {disconnected} clients disconnected "
          f"after {args.disconnect_after} tokens): {int(requests['output_tokens'].sum()):,} tokens received "
          f"in {duration:.2f} s: {rate:,.0f} output tok/s; {check_tokens(requests, max_tokens)} requests "
          f"short of their tokens; the server generated {served['generated']:,.0f} tokens "
          f"(aborts caught late: the excess); /health {served['health']} after the load")
    ratio = rate / (tokens / offline[mode])
    print(f"server / offline ({mode} scheduling): {ratio:.1%}")
    print(leak_check(served["load"], served["waited_s"]))
    return {"offline_s": offline, "offline_output_tok_s": {m: tokens / s for m, s in offline.items()},
            "server_mode": mode, "server_output_tok_s": rate, "server_over_offline": ratio,
            "disconnected": disconnected, "short_requests": check_tokens(requests, max_tokens),
            "server_after_load": served["load"], "leaked": not all(v == 0 for v in served["load"].values()),
            "health_after_load": served["health"], "server_generated_tokens": served["generated"]}


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Imported here, not above: the client processes re-import this module and need neither torch nor HF.
    from engine_throughput import random_requests
    from servebench.engine.dummy import resolve_model

    flags = engine_flags(args)
    with tempfile.TemporaryDirectory() as tmp:
        _, model_dir = resolve_model(args.model, Path(tmp))
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        prompts, _ = random_requests(args.num_requests, vocab, tuple(args.prompt_len), args.output_len)
        # Prompts of their own: the load must find nothing of the warm-up in the prefix cache.
        warmup, _ = random_requests(WARMUP_REQUESTS, vocab, tuple(args.prompt_len), WARMUP_TOKENS, seed=1)
        disconnects = pick_disconnects(len(prompts), args.disconnect_fraction, args.disconnect_after)
        max_tokens = [min(disconnects.get(i, args.output_len), args.output_len) for i in range(len(prompts))]
        print(f"{args.model}: {len(prompts)} requests, prompts U{tuple(args.prompt_len)}, {args.output_len} "
              f"output tokens, {len(disconnects)} clients disconnecting after {args.disconnect_after}; "
              f"{flags}")
        offline = offline_in_child(str(model_dir), flags, warmup, prompts, max_tokens)
        log = args.server_log or Path(tmp) / "server.log"
        served = run_server(model_dir, flags, request_table(warmup, WARMUP_TOKENS),
                            request_table(prompts, args.output_len), args, disconnects, log)
    row = report(args, offline, served, max_tokens)
    if args.json:
        args.json.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
