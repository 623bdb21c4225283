"""Behaviour of the shared scheduler that users rely on."""

from __future__ import annotations

import pytest
from scheduler_helpers import make, run_all
from servebench.engine.core import (
    CacheConfig,
    Request,
    RequestStatus,
    SamplingParams,
    Scheduler,
    SchedulerConfig,
)


def test_request_longer_than_max_model_len_is_rejected_and_counted():
    sched = Scheduler(SchedulerConfig(max_model_len=64), CacheConfig(), 100)
    assert not sched.add_request(make(65, "long"), 0.0)
    assert sched.add_request(make(64, "ok"), 0.0)
    run_all(sched)
    rows = sched.recorder.requests_table()
    assert sched.num_rejected == 1
    assert dict(zip(rows["request_id"], rows["finish_reason"])) == {"long": "rejected", "ok": "length"}


def test_without_chunked_prefill_a_prompt_runs_whole():
    cfg = SchedulerConfig(max_num_batched_tokens=100, enable_chunked_prefill=False, max_model_len=100)
    sched = Scheduler(cfg, CacheConfig(), 100)
    sched.add_request(make(60, "a"), 0.0)
    sched.add_request(make(60, "b", base=1000), 0.0)
    out = sched.schedule(0.0)
    assert out.num_scheduled_tokens == [60]  # b does not fit the rest of the budget and is not split


def test_chunked_off_rejects_budget_below_max_model_len():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(max_num_batched_tokens=100, enable_chunked_prefill=False, max_model_len=200)


def test_kv_cache_smaller_than_one_request_is_a_clear_error():
    with pytest.raises(ValueError, match="less than one max_model_len"):
        Scheduler(SchedulerConfig(max_model_len=4096), CacheConfig(block_size=16), 10)


def test_decodes_come_before_new_prefills():
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=32, max_model_len=64), CacheConfig(), 64)
    sched.add_request(make(8, "first", max_tokens=10), 0.0)
    sched.update(sched.schedule(0.0), None, 1.0)
    sched.add_request(make(64, "second", base=500), 1.0)
    out = sched.schedule(1.0)
    assert [r.request_id for r in out.requests] == ["first", "second"]
    assert out.num_scheduled_tokens == [1, 31] and out.num_decode_tokens == 1


def test_priority_queue_admits_lowest_value_first():
    cfg = SchedulerConfig(max_num_seqs=1, queue_policy="priority", max_model_len=64)
    sched = Scheduler(cfg, CacheConfig(), 64)
    sched.add_request(make(8, "low", priority=5), 0.0)
    sched.add_request(make(8, "high", priority=0, t=1.0, base=100), 1.0)
    out = sched.schedule(1.0)
    assert [r.request_id for r in out.requests] == ["high"]


@pytest.mark.parametrize("policy,victim", [("last_admitted", "c"), ("lowest_priority", "a")])
def test_victim_policy_chooses_whom_to_preempt(policy, victim):
    cfg = SchedulerConfig(max_num_seqs=3, max_model_len=32, victim_policy=policy)
    sched = Scheduler(cfg, CacheConfig(block_size=4, enable_prefix_caching=False), 8)
    for rid, prio in (("a", 9), ("b", 0), ("c", 1)):
        sched.add_request(make(8, rid, max_tokens=20, priority=prio, base=ord(rid) * 100), 0.0)
    preempted = []
    t = 0.0
    while not preempted:
        out = sched.schedule(t)
        preempted = [r.request_id for r in out.preempted]
        t += 1
        sched.update(out, None, t)
    assert preempted[0] == victim


def test_prefix_cache_hits_shared_blocks_and_never_the_last_token():
    sched = Scheduler(SchedulerConfig(max_model_len=128), CacheConfig(block_size=4), 64)
    sched.add_request(make(32, "a"), 0.0)
    run_all(sched)
    sched.add_request(make(32, "same"), 10.0)
    sched.add_request(make(20, "prefix"), 10.0)
    run_all(sched, 10.0)
    rows = sched.recorder.requests_table()
    cached = dict(zip(rows["request_id"], rows["cached_tokens"]))
    assert cached == {"a": 0, "same": 28, "prefix": 16}
    assert sched.kv.prefix_hits == 44


def test_prefix_caching_off_gives_no_hits():
    sched = Scheduler(
        SchedulerConfig(max_model_len=128), CacheConfig(block_size=4, enable_prefix_caching=False), 64
    )
    for i in range(3):
        sched.add_request(make(32, str(i)), 0.0)
    run_all(sched)
    assert sched.kv.prefix_hits == 0


def test_stop_token_and_eos_end_a_request():
    sched = Scheduler(SchedulerConfig(max_model_len=64), CacheConfig(), 64)
    req = Request("r", [1, 2, 3], SamplingParams(max_tokens=10, stop_token_ids=[7]), eos_token_id=2)
    sched.add_request(req, 0.0)
    sched.update(sched.schedule(0.0), [5], 1.0)
    sched.update(sched.schedule(1.0), [7], 2.0)
    assert req.status == RequestStatus.FINISHED_STOPPED and req.stop_reason == 7
    assert req.output_token_ids == [5, 7] and req.num_output_tokens == 2


def test_abort_frees_blocks_at_once():
    sched = Scheduler(SchedulerConfig(max_model_len=64), CacheConfig(), 64)
    sched.add_request(make(40, "r", max_tokens=100), 0.0)
    sched.update(sched.schedule(0.0), None, 1.0)
    assert sched.kv.num_free_blocks < 64
    sched.finish_requests(["r"], RequestStatus.FINISHED_ABORTED, 1.5)
    assert sched.kv.num_free_blocks == 64 and not sched.has_unfinished_requests()
    assert sched.recorder.requests_table()["finish_reason"] == ["abort"]


def test_request_preempted_with_its_first_token_in_flight_is_not_shed():
    """Async scheduling schedules step k + 1 before step k's tokens are known. A request preempted then is
    past its TTFT SLO, but its first token exists: it stays, and ends with real tokens only (shedding it
    returned the in-flight placeholder, -1, as a token)."""
    cfg = SchedulerConfig(max_model_len=32, max_num_batched_tokens=64, shed_ttft_ms=500,
                          preemption_mode="recompute")
    sched = Scheduler(cfg, CacheConfig(block_size=16, enable_prefix_caching=False), 2)
    reqs = [make(16, "a"), make(16, "b", base=100)]
    for req in reqs:
        sched.add_request(req, 0.0)
    first = sched.schedule(0.0)
    sched.advance(first)  # both first tokens in flight
    second = sched.schedule(1.0)  # one block left for two decodes: one is preempted, 1 s after arrival
    assert second.preempted and not second.shed
    sched.resolve(first, [7, 7], 1.0)
    sched.advance(second)
    t, prev = 2.0, second
    while sched.has_unfinished_requests():
        out = sched.schedule(t)
        sched.resolve(prev, [7] * len(prev.requests), t)
        sched.advance(out)
        t, prev = t + 1, out
    assert sched.num_shed == 0
    assert [r.output_token_ids for r in reqs] == [[7] * 4] * 2


def test_unknown_policy_name_is_a_clear_error():
    with pytest.raises(ValueError, match="scheduler.queue_policy: unknown value 'sjf'"):
        Scheduler(SchedulerConfig(queue_policy="sjf", max_model_len=16), CacheConfig(), 8)


@pytest.mark.parametrize("policy,first", [("shortest_prompt", "short"), ("edf", "urgent"), ("fcfs", "long")])
def test_queue_policies_order_admission(policy, first):
    cfg = SchedulerConfig(max_num_seqs=1, queue_policy=policy, max_model_len=64)
    sched = Scheduler(cfg, CacheConfig(), 64)
    sched.add_request(make(40, "long", t=0.0), 0.0)
    sched.add_request(make(8, "short", t=1.0, base=100), 1.0)
    urgent = make(20, "urgent", t=2.0, base=200)
    urgent.deadline = 2.5
    sched.add_request(urgent, 2.0)
    assert [r.request_id for r in sched.schedule(2.0).requests] == [first]


def test_least_computed_victim_loses_less_work_than_last_admitted():
    """The same overload: least_computed recomputes fewer tokens than vLLM's choice of victim."""
    recomputed = {}
    for policy in ("last_admitted", "least_computed"):
        cfg = SchedulerConfig(max_num_seqs=8, max_model_len=128, victim_policy=policy)
        sched = Scheduler(cfg, CacheConfig(block_size=4, enable_prefix_caching=False), 40)
        reqs = [make(8 + 12 * i, str(i), max_tokens=40, t=float(i), base=1000 * i) for i in range(8)]
        for req in reqs:
            sched.add_request(req, 0.0)
        scheduled, t = 0, 0.0
        while sched.has_unfinished_requests():
            out = sched.schedule(t)
            scheduled += sum(out.num_scheduled_tokens)
            t += 1
            sched.update(out, None, t)
        needed = sum(r.num_prompt_tokens + 40 - 1 for r in reqs)  # each token computed once, the last sampled
        recomputed[policy] = scheduled - needed
        assert sched.num_preemptions > 0
    assert recomputed["least_computed"] < recomputed["last_admitted"]


def test_core_imports_no_torch_simpy_or_hydra():
    import subprocess
    import sys

    code = "import sys, engine.core, sim.simulator; print(sorted({'torch', 'hydra'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_stats_count_steps_finished_requests_and_prefix_cache_tokens():
    sched = Scheduler(SchedulerConfig(max_model_len=128), CacheConfig(block_size=4), 64)
    assert not sched.add_request(make(129, "long"), 0.0)
    sched.add_request(make(32, "a"), 0.0)
    outs = run_all(sched)
    assert sched.cached_prefix_blocks(make(32, "probe")) == 7  # never the last token's block
    sched.add_request(make(32, "same"), 10.0)
    outs += run_all(sched, 10.0)
    stats = sched.stats()
    assert (stats.num_steps, stats.num_finished_requests, stats.num_rejected) == (len(outs), 3, 1)
    assert (stats.prefix_cache_queries_tokens, stats.prefix_cache_hits_tokens) == (64, 28)
    assert stats.num_running == stats.num_waiting == 0 and stats.num_free_blocks == stats.num_gpu_blocks == 64
