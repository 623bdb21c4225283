"""The benchmark client's saturation tools against a live server: clients that disconnect mid-stream, the
leak check after a load, and the throughput that counts what disconnected clients received."""

from __future__ import annotations

import httpx
from servebench.workbench.serve_client import (
    leak_check,
    load_tokenizer,
    pick_disconnects,
    received_throughput,
    run_serving_benchmark,
    wait_until_idle,
)
from servebench.workbench.workloads import load_workload
from test_server import MODEL, served  # noqa: F401 (a fixture: the server, sync and async scheduling)

OUTPUT_LEN, CUT_AFTER = 48, 3


def test_pick_disconnects_is_a_seeded_share() -> None:
    cuts = pick_disconnects(40, 0.1, 5, seed=3)
    assert len(cuts) == 4 and set(cuts.values()) == {5} and cuts == pick_disconnects(40, 0.1, 5, seed=3)
    assert pick_disconnects(40, 0.0, 5) == {}


def test_disconnecting_clients_are_aborted_and_nothing_leaks(served, tiny_llama_dir) -> None:  # noqa: F811
    server, _ = served
    workload = load_workload({"name": "synthetic", "num_requests": 12, "request_rate": None, "input_len": 16,
                              "output_len": {"dist": "uniform", "min": OUTPUT_LEN, "max": OUTPUT_LEN}})
    cuts = pick_disconnects(len(workload), 0.25, CUT_AFTER)
    requests, _ = run_serving_benchmark(server.url, workload, load_tokenizer(str(tiny_llama_dir)), MODEL,
                                        max_concurrency=4, disconnects=cuts)
    cut = requests.index.isin(list(cuts))
    assert (requests.loc[cut, "finish_reason"] == "abort").all()
    assert (requests.loc[cut, "output_tokens"] == CUT_AFTER).all()
    assert (requests.loc[~cut, "finish_reason"] == "length").all()
    assert (requests.loc[~cut, "output_tokens"] == OUTPUT_LEN).all()
    expected = (len(workload) - len(cuts)) * OUTPUT_LEN + len(cuts) * CUT_AFTER
    duration = requests["finish_s"].max() - requests["arrival_s"].min()
    assert abs(received_throughput(requests) * duration - expected) < 1e-6
    with httpx.Client(base_url=server.url) as http:
        load, waited = wait_until_idle(http, timeout_s=10)
    assert leak_check(load, waited).endswith("nothing leaked"), load
