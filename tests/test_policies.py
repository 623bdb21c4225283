"""The defining behaviour of each scheduling, preemption, eviction and admission policy, and of the
LoRA and multimodal interfaces the simulator builds on."""

from __future__ import annotations

import pytest
from scheduler_helpers import make, run_all, step
from servebench.engine.core import CacheConfig, Request, SamplingParams, Scheduler, SchedulerConfig
from servebench.engine.core.block_pool import BlockPool
from servebench.engine.core.kv_cache_manager import KVCacheManager


# ---- preemption -----------------------------------------------------------------------------------
def overload(**cfg) -> tuple[Scheduler, list]:
    """Three requests that outgrow 12 blocks of 4 tokens while decoding: someone is preempted."""
    sched = Scheduler(
        SchedulerConfig(max_num_seqs=3, max_model_len=48, **cfg),
        CacheConfig(block_size=4, enable_prefix_caching=False),
        12,
        num_cpu_blocks=64,
    )
    for i, n in enumerate((4, 4, 24)):
        sched.add_request(make(n, str(i), max_tokens=20, base=1000 * i, t=float(i)), 0.0)
    return sched, run_all(sched)


@pytest.mark.parametrize(
    "costs,swaps",
    [
        ({"swap_s_per_block": 1e-4, "recompute_s_per_token": 1e-3}, True),  # recompute dearer: swap
        ({"swap_s_per_block": 1.0, "recompute_s_per_token": 1e-3}, False),  # PCIe dearer: recompute
    ],
)
def test_cost_preemption_takes_the_cheaper_way_back(costs, swaps):
    sched, outs = overload(preemption_mode="cost", **costs)
    assert sched.num_preemptions > 0
    assert any(out.swap_out for out in outs) == swaps


def test_cost_preemption_decides_per_victim():
    """A victim swaps only when recomputing its computed tokens costs more than its blocks' round trip."""
    from servebench.engine.core.policies import CostPreemption

    policy = CostPreemption(swap_s_per_block=1.0, recompute_s_per_token=1.0)
    short, long = make(8, "short"), make(40, "long")
    short.num_computed_tokens, long.num_computed_tokens = 8, 40
    assert not policy.swap(short, 4)  # 8 tokens vs 2 x 4 blocks: equal, recompute
    assert policy.swap(long, 10)  # 40 tokens vs 2 x 10 blocks


def test_cost_preemption_needs_its_costs():
    with pytest.raises(ValueError, match="scheduler.swap_s_per_block"):
        Scheduler(SchedulerConfig(preemption_mode="cost", max_model_len=16), CacheConfig(), 8)


def test_most_blocks_victim_frees_the_largest_request_but_never_the_oldest():
    cfg = SchedulerConfig(max_num_seqs=3, max_model_len=64, victim_policy="most_blocks")
    sched = Scheduler(cfg, CacheConfig(block_size=4, enable_prefix_caching=False), 16)
    for rid, n in (("oldest", 20), ("big", 24), ("small", 4)):
        sched.add_request(make(n, rid, max_tokens=30, base=ord(rid[0]) * 100), 0.0)
    preempted, t = [], 0.0
    while not preempted:
        preempted = [r.request_id for r in step(sched, t).preempted]
        t += 1
    assert preempted[0] == "big"


# ---- chunked prefill ------------------------------------------------------------------------------
@pytest.mark.parametrize("cap,most", [(0, 3), (1, 1), (2, 2)])
def test_max_num_partial_prefills_caps_prefills_per_step(cap, most):
    cfg = SchedulerConfig(max_num_partial_prefills=cap, long_prefill_token_threshold=8, max_model_len=64)
    sched = Scheduler(cfg, CacheConfig(), 64)
    for i in range(3):
        sched.add_request(make(40, str(i), base=100 * i), 0.0)
    assert max(len(out.prefill_chunks) for out in run_all(sched)) == most


def test_short_prompts_pass_long_ones_over_max_long_partial_prefills():
    cfg = SchedulerConfig(
        max_num_partial_prefills=2,
        max_long_partial_prefills=1,
        long_prefill_token_threshold=16,
        max_model_len=64,
    )
    sched = Scheduler(cfg, CacheConfig(), 64)
    for rid, n in (("long1", 40), ("long2", 40), ("short", 8)):
        sched.add_request(make(n, rid, base=ord(rid[-1]) * 100), 0.0)
    assert [r.request_id for r in sched.schedule(0.0).requests] == ["long1", "short"]
    assert [r.request_id for r in sched.waiting] == ["long2"]  # skipped, not dropped, and first in line


def test_partial_prefill_caps_are_checked():
    with pytest.raises(ValueError, match="max_long_partial_prefills"):
        SchedulerConfig(max_num_partial_prefills=1, max_long_partial_prefills=2)
    cfg = SchedulerConfig(max_num_partial_prefills=2, max_model_len=1000)
    assert cfg.long_prefill_token_threshold == 40  # vLLM: 4 % of max_model_len when left at 0


# ---- prefix-cache eviction ------------------------------------------------------------------------
def through(kv: KVCacheManager, req: Request) -> None:
    """Admit, compute the whole prompt, free: its full blocks stay cached."""
    hits = kv.get_computed_blocks(req)
    assert kv.allocate_slots(req, req.num_prompt_tokens - 4 * len(hits), hits)
    req.num_computed_tokens = req.num_prompt_tokens
    kv.free(req)


def cached_prefixes(kv: KVCacheManager, prompts: dict[str, list[int]]) -> dict[str, int]:
    """Cached blocks of each prompt's chain (what a new request with that prompt would hit)."""
    out = {}
    for name, tokens in prompts.items():
        probe = Request("probe", tokens + [0], SamplingParams())
        out[name] = len(kv.get_computed_blocks(probe))
    return out


@pytest.mark.parametrize(
    "policy,kept",
    [
        ("lru", {"popular": 0, "recent": 2}),  # the least recently freed goes first, however popular
        ("lfu", {"popular": 2, "recent": 0}),  # the never-hit blocks go first
        ("cost", {"popular": 2, "recent": 0}),
    ],
)
def test_eviction_policy_picks_which_cached_block_goes(policy, kept):
    kv = KVCacheManager(5, 4, eviction_policy=policy)
    popular, recent = list(range(9)), list(range(100, 109))  # 2 full blocks each (+ 1 token)
    for i in range(3):
        through(kv, Request(f"p{i}", popular, SamplingParams()))  # both blocks hit twice after the first
    through(kv, Request("r", recent, SamplingParams()))
    assert kv.allocate_slots(make(12, "new", base=500), 12, [])  # 1 empty block + 2 of the 4 cached
    assert cached_prefixes(kv, {"popular": popular, "recent": recent}) == kept


def test_cost_eviction_keeps_deep_reused_chains_and_evicts_leaf_first():
    kv = KVCacheManager(6, 4, eviction_policy="cost")
    deep, shallow = list(range(13)), list(range(100, 105))
    for _ in range(2):
        through(kv, Request("d", deep, SamplingParams()))  # 3 full blocks hit once: 1, 2, 3 -> 3, 3, 3
        through(kv, Request("s", shallow, SamplingParams()))  # 1 full block hit once: 1
    assert kv.allocate_slots(make(12, "new", base=500), 12, [])  # 3 blocks: 2 empty + 1 evicted
    assert cached_prefixes(kv, {"deep": deep, "shallow": shallow}) == {"deep": 3, "shallow": 0}
    assert kv.allocate_slots(make(4, "more", base=900), 4, [])
    assert cached_prefixes(kv, {"deep": deep}) == {"deep": 2}  # the leaf went, the chain's head stays


def test_lfu_evicts_the_leaf_of_a_chain_first():
    pool = BlockPool(3, eviction_policy="lfu")
    table = pool.allocate(3)
    pool.cache(table, [11, 12, 13], 0, 3)
    pool.free(table)
    assert pool.allocate(1) == [table[2]]


def test_unknown_eviction_policy_names_the_key():
    with pytest.raises(ValueError, match="cache.eviction_policy: unknown value 'mru'"):
        CacheConfig(eviction_policy="mru")


# ---- admission control ----------------------------------------------------------------------------
def test_max_waiting_sheds_arrivals_over_the_cap():
    sched = Scheduler(SchedulerConfig(max_waiting=1, max_model_len=64), CacheConfig(), 64)
    assert sched.add_request(make(8, "a"), 0.0)
    assert not sched.add_request(make(8, "b", base=100), 0.0)
    run_all(sched)
    rows = sched.recorder.requests_table()
    assert dict(zip(rows["request_id"], rows["finish_reason"])) == {"b": "shed", "a": "length"}
    assert (sched.num_shed, sched.num_rejected) == (1, 0)


def test_shed_ttft_drops_a_request_that_can_no_longer_meet_its_slo():
    cfg = SchedulerConfig(max_num_seqs=1, shed_ttft_ms=2500, max_model_len=64)
    sched = Scheduler(cfg, CacheConfig(), 64)
    sched.add_request(make(8, "busy", max_tokens=10), 0.0)
    sched.add_request(make(8, "late", base=100), 0.0)
    run_all(sched)
    rows = sched.recorder.requests_table()
    reasons = dict(zip(rows["request_id"], rows["finish_reason"]))
    finish = dict(zip(rows["request_id"], rows["finish_s"]))
    assert reasons == {"late": "shed", "busy": "length"}
    assert finish["late"] == 3.0  # the first step after its 2.5 s ran out, not when a seat freed (10 s)
    assert sched.num_shed == 1


# ---- LoRA -----------------------------------------------------------------------------------------
def test_lora_request_without_a_slot_waits_without_blocking_others():
    sched = Scheduler(SchedulerConfig(max_loras=1, max_model_len=64), CacheConfig(), 64)
    sched.add_request(make(8, "a1", max_tokens=3, lora_id=1), 0.0)
    sched.add_request(make(8, "b", max_tokens=3, base=100, lora_id=2), 0.0)
    sched.add_request(make(8, "base", max_tokens=3, base=200), 0.0)
    sched.add_request(make(8, "a2", max_tokens=3, base=300, lora_id=1), 0.0)
    out = step(sched, 0.0)
    assert [r.request_id for r in out.requests] == ["a1", "base", "a2"]
    assert out.loaded_loras == [1] and out.active_loras == {1}
    outs = run_all(sched, 1.0)
    first_b = next(o for o in outs if any(r.request_id == "b" for r in o.requests))
    assert first_b.loaded_loras == [2]  # once adapter 1 went idle, its slot was taken over


def test_lora_loads_come_from_disk_unless_in_the_cpu_cache():
    sched = Scheduler(SchedulerConfig(max_loras=1, max_cpu_loras=2, max_model_len=64), CacheConfig(), 64)
    loads = []
    for i, lora in enumerate((1, 2, 1, 3, 2)):
        sched.add_request(make(8, str(i), max_tokens=1, base=100 * i, lora_id=lora), float(i))
        out = step(sched, float(i))
        loads.append((out.loaded_loras, out.loaded_loras_from_disk))
    assert loads == [([1], [1]), ([2], [2]), ([1], []), ([3], [3]), ([2], [2])]


def test_an_adapter_pushed_out_of_the_cpu_cache_by_a_load_of_the_same_step_is_not_read_from_disk():
    # The host drops a step's CPU-cache evictions only after the step's copies, so adapter 3, pushed out by
    # adapter 1's load and needed a moment later in the same step, is still there to copy from.
    sched = Scheduler(SchedulerConfig(max_loras=2, max_cpu_loras=2, max_model_len=64), CacheConfig(), 64)
    steps = []
    for t, loras in enumerate(((3,), (2,), (1, 3), (2,))):
        for lora in loras:
            sched.add_request(make(8, f"{t}-{lora}", max_tokens=1, base=100 * lora, lora_id=lora), float(t))
        out = step(sched, float(t))
        steps.append((out.loaded_loras, out.loaded_loras_from_disk, out.evicted_loras_from_cpu))
    assert steps == [([3], [3], []), ([2], [2], []), ([1, 3], [1], [2]), ([2], [2], [1])]


def test_prefix_cache_never_hits_across_adapters():
    sched = Scheduler(SchedulerConfig(max_model_len=64), CacheConfig(block_size=4), 64)
    for rid, lora in (("base", None), ("base_again", 0), ("adapter", 1), ("adapter_again", 1)):
        sched.add_request(make(16, rid, lora_id=lora), 0.0)
        run_all(sched)
    rows = sched.recorder.requests_table()
    assert dict(zip(rows["request_id"], rows["cached_tokens"])) == {
        "base": 0,
        "base_again": 12,
        "adapter": 0,
        "adapter_again": 12,
    }


# ---- multimodal -----------------------------------------------------------------------------------
def image_request(rid: str, image: str, offset: int = 8, **kw) -> Request:
    return make(32, rid, max_tokens=2, mm_hashes=(image,), mm_positions=((offset, 8),), **kw)


def test_prefix_cache_separates_images_but_shares_the_text_before_them():
    sched = Scheduler(SchedulerConfig(max_model_len=64), CacheConfig(block_size=4), 64)
    for rid, image in (("cat", "h-cat"), ("dog", "h-dog"), ("cat_again", "h-cat")):
        sched.add_request(image_request(rid, image), 0.0)
        run_all(sched)
    rows = sched.recorder.requests_table()
    assert dict(zip(rows["request_id"], rows["cached_tokens"])) == {"cat": 0, "dog": 8, "cat_again": 28}


def test_encoder_runs_once_per_image_at_its_first_chunk():
    cfg = SchedulerConfig(max_num_batched_tokens=6, max_model_len=64)
    sched = Scheduler(cfg, CacheConfig(enable_prefix_caching=False), 64)
    sched.add_request(image_request("r", "h-cat"), 0.0)
    encoded = [out.encoder_inputs for out in run_all(sched)]
    assert encoded[:3] == [[], [("h-cat", 8)], []]  # chunks [0,6) [6,12) [12,18): the image is 8..15
    assert sum(map(len, encoded)) == 1


@pytest.mark.parametrize("cache_size,second", [(0, [("h-cat", 8)]), (100, [])])
def test_encoder_cache_serves_a_known_image(cache_size, second):
    cfg = SchedulerConfig(encoder_cache_size=cache_size, max_model_len=64)
    sched = Scheduler(cfg, CacheConfig(enable_prefix_caching=False), 64)
    sched.add_request(image_request("a", "h-cat"), 0.0)
    assert step(sched, 0.0).encoder_inputs == [("h-cat", 8)]
    sched.add_request(image_request("b", "h-cat", base=500), 1.0)
    assert step(sched, 1.0).encoder_inputs == second


def test_an_image_inside_a_prefix_hit_is_not_encoded():
    sched = Scheduler(SchedulerConfig(max_model_len=64), CacheConfig(block_size=4), 64)
    sched.add_request(image_request("a", "h-cat"), 0.0)
    run_all(sched)
    sched.add_request(image_request("b", "h-cat"), 10.0)
    out = sched.schedule(10.0)
    assert out.prefix_hit_tokens == 28 and out.encoder_inputs == []


def test_shed_ttft_with_a_prefill_price_sheds_before_the_slo_runs_out():
    # 8 prompt tokens at 0.25 s each: "late" cannot get its first token within 2.5 s once it has waited
    # more than 0.5 s, so it goes at the first step after that instead of after 2.5 s.
    cfg = SchedulerConfig(max_num_seqs=1, shed_ttft_ms=2500, max_model_len=64, recompute_s_per_token=0.25)
    sched = Scheduler(cfg, CacheConfig(), 64)
    sched.add_request(make(8, "busy", max_tokens=10), 0.0)
    sched.add_request(make(8, "late", base=100), 0.0)
    run_all(sched)
    rows = sched.recorder.requests_table()
    finish = dict(zip(rows["request_id"], rows["finish_s"]))
    assert dict(zip(rows["request_id"], rows["finish_reason"]))["late"] == "shed"
    assert finish["late"] == 1.0
