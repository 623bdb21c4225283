"""`backend=server`: the workload replayed against a running server, into the same run folder."""

from __future__ import annotations

from functools import partial
from typing import Any

import httpx
import pandas as pd
from servebench.workbench.metrics import STEP_COLUMNS
from servebench.workbench.runs import RunResult
from servebench.workbench.serve_client import (
    counter_deltas,
    load_tokenizer,
    run_serving_benchmark,
    server_counters,
)
from servebench.workbench.terminal import Progress
from servebench.workbench.workloads import load_workload


def run(cfg: dict[str, Any]) -> RunResult:
    b = cfg["backend"]
    url = b["url"].rstrip("/")
    headers = {"Authorization": f"Bearer {b['api_key']}"} if b.get("api_key") else None
    with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
        try:
            card = http.get("/v1/models").raise_for_status().json()["data"][0]
        except httpx.HTTPError as e:
            raise ValueError(f"backend.url={url}: no OpenAI-compatible server answers there ({e})") from None
        tokenizer = load_tokenizer(card.get("root"))
        encode = partial(tokenizer.encode, add_special_tokens=False) if tokenizer is not None else None
        workload = load_workload(cfg["workload"], encode)
        before = server_counters(http)
        with Progress(len(workload), "server", cfg.get("progress", True)) as bar:
            requests, itl = run_serving_benchmark(
                url,
                workload,
                tokenizer,
                b.get("model") or card["id"],
                b.get("api", "completions"),
                max_concurrency=b.get("max_concurrency"),
                api_key=b.get("api_key"),
                on_finished=bar.update,
            )
        after = server_counters(http)
    steps = pd.DataFrame({c: pd.Series(dtype=float) for c in STEP_COLUMNS})  # only the server sees its steps
    return RunResult(requests, steps, itl,
                     {"backend": "server", "served_model": card["id"], **counter_deltas(before, after)})
