"""Property-based tests of the shared scheduler, KV-cache manager and block pool, under every policy.

A fake executor writes into the KV slot the block table gives each computed token
what its real KV depends on (adapter, token id, images up to it), and copies
blocks on swap; before every step it checks that every token a request has
already computed (its own or a prefix-cache hit) is found in its blocks. That
checks the whole memory bookkeeping end to end, and that a prefix hit never
crosses adapters or images.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from servebench.engine.core import CacheConfig, Request, SamplingParams, Scheduler, SchedulerConfig
from servebench.engine.core.request import PENDING

MAX_MODEL_LEN = 256


def sampled_token(req: Request, pos: int) -> int:
    """What the fake model samples at `pos`: fixed, so a PENDING token is known to the fake device."""
    return 7 + (pos * 31 + int(req.request_id)) % 5


def content(req: Request, pos: int) -> tuple:
    images = tuple(h for h, (o, _) in zip(req.mm_hashes, req.mm_positions) if o <= pos)
    tok = req.all_token_ids[pos]
    return req.lora_id or 0, sampled_token(req, pos) if tok == PENDING else tok, images


class FakeKV:
    def __init__(self) -> None:
        self.gpu: dict[tuple[int, int], int] = {}
        self.cpu: dict[tuple[int, int], int] = {}
        # request id -> content(req, pos) for pos = 0, 1, ...: fixed per position (a PENDING token reads as
        # the token it becomes), so each step checks every computed token against a list, not recomputing it.
        self.expected: dict[str, list[tuple]] = {}
        self.lora_slots: dict[int, int] = {}  # GPU slot -> the adapter last loaded into it
        self.host_loras: set[int] = set()  # adapters in the engine's CPU cache

    def execute(self, sched: Scheduler, out) -> None:
        self.check_loras(sched, out)
        bs = sched.block_size
        for gpu_block, cpu_block in out.swap_out:
            for off in range(bs):
                if (gpu_block, off) in self.gpu:
                    self.cpu[(cpu_block, off)] = self.gpu[(gpu_block, off)]
        for cpu_block, gpu_block in out.swap_in:
            for off in range(bs):
                if (cpu_block, off) in self.cpu:
                    self.gpu[(gpu_block, off)] = self.cpu[(cpu_block, off)]
        gpu = self.gpu
        for req, n in zip(out.requests, out.num_scheduled_tokens):
            table = req.block_table
            start = req.num_computed_tokens
            want = self.expected.setdefault(req.request_id, [])
            want += (content(req, pos) for pos in range(len(want), start))  # prefix-cache hits
            found = [gpu.get((table[pos // bs], pos % bs)) for pos in range(start)]
            if found != want[:start]:
                pos = next(p for p in range(start) if found[p] != want[p])
                raise AssertionError(f"request {req.request_id}: KV of token {pos} lost")
            for pos in range(start, start + n):
                c = content(req, pos)
                if pos < len(want):  # computed again after a preemption: the same token
                    assert want[pos] == c, f"request {req.request_id}: token {pos} changed"
                else:
                    want.append(c)
                gpu[(table[pos // bs], pos % bs)] = c


    def check_loras(self, sched: Scheduler, out) -> None:
        """Load adapters as the engine does (from disk unless cached on the host, into their slot): every
        request then finds its own adapter in its slot, and the host cache stays within max_cpu_loras."""
        if sched.loras is None:  # max_loras=0: every adapter resident, nothing loads
            return
        for lora in out.loaded_loras:
            assert (lora in out.loaded_loras_from_disk) == (lora not in self.host_loras)
            self.host_loras.add(lora)
            self.lora_slots[out.lora_slots[lora]] = lora
        self.host_loras -= set(out.evicted_loras_from_cpu)
        assert len(self.host_loras) <= sched.config.max_cpu_loras
        assert set(out.lora_slots.values()) <= set(range(1, sched.config.max_loras + 1))
        for req in out.requests:
            if req.lora_id:
                assert self.lora_slots[out.lora_slots[req.lora_id]] == req.lora_id


def check_pool(sched: Scheduler) -> None:
    pool = sched.kv.pool
    free_ids = set(pool._empty) | set(pool._cached_free)
    assert len(free_ids) == len(pool._empty) + len(pool._cached_free), "a block is free twice"
    assert len(free_ids) == pool.num_free
    assert min(pool.ref_cnt, default=0) >= 0
    unused = {b for b, ref in enumerate(pool.ref_cnt) if ref == 0}
    assert unused == free_ids, "a block is both free and in use"
    for h, b in pool._index.items():
        assert pool.block_hash[b] == h


families = st.lists(st.integers(0, 3), min_size=1, max_size=24)


@st.composite
def scheduler_configs(draw) -> SchedulerConfig:
    chunked = draw(st.booleans())
    budget = draw(st.integers(8, 300)) if chunked else draw(st.integers(MAX_MODEL_LEN, 400))
    partial = draw(st.sampled_from([0, 0, 1, 2]))
    return SchedulerConfig(
        max_num_seqs=draw(st.integers(1, 8)),
        max_num_batched_tokens=budget,
        enable_chunked_prefill=chunked,
        long_prefill_token_threshold=draw(st.sampled_from([0, 0, 17])),
        max_num_partial_prefills=partial,
        max_long_partial_prefills=draw(st.integers(0, partial)),
        preemption_mode=draw(st.sampled_from(["recompute", "swap", "cost"])),
        swap_s_per_block=draw(st.sampled_from([0.0, 1e-3, 1.0])),
        recompute_s_per_token=1e-3,
        max_model_len=MAX_MODEL_LEN,
        queue_policy=draw(st.sampled_from(["fcfs", "priority", "shortest_prompt", "edf"])),
        victim_policy=draw(
            st.sampled_from(["last_admitted", "lowest_priority", "least_computed", "most_blocks"])
        ),
        max_waiting=draw(st.sampled_from([0, 0, 3])),
        shed_ttft_ms=draw(st.sampled_from([0, 0, 8000])),  # a step is one second
        max_loras=draw(st.sampled_from([0, 1, 2])),
        encoder_cache_size=draw(st.sampled_from([0, 40])),
    )


@st.composite
def scenarios(draw):
    bs = draw(st.sampled_from([1, 2, 4, 16]))
    cfg = draw(scheduler_configs())
    min_blocks = -(-MAX_MODEL_LEN // bs)
    eviction = draw(st.sampled_from(["lru", "lfu", "cost"]))
    cache = CacheConfig(block_size=bs, enable_prefix_caching=draw(st.booleans()), eviction_policy=eviction)
    num_blocks = draw(st.integers(min_blocks, min_blocks * 4))
    num_cpu = draw(st.sampled_from([0, min_blocks, 10 * min_blocks]))
    reqs = []
    for i, fam in enumerate(draw(families)):
        shared = draw(st.integers(0, 150))
        own = draw(st.integers(1, 60))
        prompt = [fam * 1000 + k for k in range(shared)] + [100000 + i * 1000 + k for k in range(own)]
        params = SamplingParams(max_tokens=draw(st.integers(1, 40)), ignore_eos=True)
        image = draw(st.sampled_from([None, "cat", "dog"]))  # one image of 10 tokens at offset 5, if it fits
        mm = image is not None and len(prompt) >= 15
        req = Request(
            str(i),
            prompt,
            params,
            arrival_time=float(i),
            priority=draw(st.integers(0, 2)),
            lora_id=draw(st.sampled_from([None, 0, 1, 2, 3])),
            mm_hashes=(image,) if mm else (),
            mm_positions=((5, 10),) if mm else (),
        )
        reqs.append((draw(st.integers(0, 20)), req))
    return cfg, cache, num_blocks, num_cpu, reqs


def check_step(sched: Scheduler, out) -> None:
    cfg = sched.config
    assert out.total_num_scheduled_tokens == sum(out.num_scheduled_tokens)
    assert sum(out.num_scheduled_tokens) <= cfg.max_num_batched_tokens
    assert len(sched.running) <= cfg.max_num_seqs
    assert len({r.request_id for r in out.requests}) == len(out.requests)
    if cfg.max_num_partial_prefills:
        assert len(out.prefill_chunks) <= cfg.max_num_partial_prefills
    if cfg.max_loras:
        assert len({r.lora_id for r in sched.running if r.lora_id}) <= cfg.max_loras
    assert out.active_loras <= {r.lora_id for r in sched.running}


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.booleans())
def test_scheduler_invariants(scenario, async_scheduling):
    """Also with async scheduling: step k + 1 is scheduled before step k's tokens are known."""
    cfg, cache, num_blocks, num_cpu, reqs = scenario
    sched = Scheduler(cfg, cache, num_blocks, num_cpu)
    kv = FakeKV()
    pending = sorted(reqs, key=lambda x: x[0])
    expected = {r.request_id: r.sampling_params.max_tokens for _, r in reqs}
    prompt_len = {r.request_id: r.num_prompt_tokens for _, r in reqs}
    step = 0
    in_flight = None
    while pending or sched.has_unfinished_requests() or in_flight:
        while pending and pending[0][0] <= step:
            sched.add_request(pending.pop(0)[1], float(step))
        out = sched.schedule(float(step))
        check_step(sched, out)
        check_pool(sched)
        kv.execute(sched, out)
        if not async_scheduling:
            sched.update(out, [sampled_token(r, r.num_computed_tokens + n)
                               for r, n in zip(out.requests, out.num_scheduled_tokens)], step + 1.0)
        else:
            if in_flight is not None:
                tokens = [sampled_token(r, at) for r, at in zip(in_flight.requests, in_flight.sample_at)]
                sched.resolve(in_flight, tokens, step + 0.5)
            sched.advance(out)
            in_flight = out if out.requests else None
        check_pool(sched)
        step += 1
        assert step < 20000, "no progress"
    rows = sched.recorder.requests_table()
    assert sorted(rows["request_id"]) == sorted(expected), "every request finishes exactly once"
    shed = cfg.max_waiting or cfg.shed_ttft_ms
    for rid, out_tokens, cached, reason in zip(
        rows["request_id"], rows["output_tokens"], rows["cached_tokens"], rows["finish_reason"]
    ):
        assert reason == "length" or (shed and reason == "shed" and out_tokens == 0)
        assert reason == "shed" or out_tokens == expected[rid]
        assert cached <= prompt_len[rid] - 1
    assert rows["finish_reason"].count("shed") == sched.num_shed
    assert sched.kv.num_free_blocks == num_blocks, "blocks held after all requests finished"
    assert sched.kv.num_free_cpu_blocks == num_cpu
    assert not any(sched.kv.pool.ref_cnt)
    for _, req in reqs:
        if req.status.name != "FINISHED_SHED":
            assert req.output_token_ids == [sampled_token(req, req.num_prompt_tokens + i)
                                            for i in range(req.num_output_tokens)]


@settings(max_examples=60, deadline=None)
@given(prompt=st.integers(1, 400), budget=st.integers(1, 64), threshold=st.sampled_from([0, 5, 33]))
def test_chunked_prefill_pieces_add_up_to_the_prompt(prompt, budget, threshold):
    cfg = SchedulerConfig(
        max_num_batched_tokens=budget, long_prefill_token_threshold=threshold, max_model_len=512
    )
    sched = Scheduler(cfg, CacheConfig(block_size=16), 64)
    req = Request("r", list(range(prompt)), SamplingParams(max_tokens=2, ignore_eos=True))
    sched.add_request(req, 0.0)
    pieces = []
    while req.first_token_time is None:
        out = sched.schedule(0.0)
        pieces += out.num_scheduled_tokens
        assert max(out.num_scheduled_tokens) <= (threshold or budget)
        sched.update(out, None, 1.0)
    assert sum(pieces) == prompt


def test_swap_round_trip_keeps_progress():
    cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, preemption_mode="swap", max_model_len=64)
    sched = Scheduler(cfg, CacheConfig(block_size=4, enable_prefix_caching=False), 16, num_cpu_blocks=64)
    reqs = [
        Request(str(i), list(range(i * 100, i * 100 + 30)), SamplingParams(max_tokens=30, ignore_eos=True))
        for i in range(3)
    ]
    kv = FakeKV()
    for r in reqs:
        sched.add_request(r, 0.0)
    swapped_out = swapped_in = 0
    t = 0.0
    while sched.has_unfinished_requests():
        out = sched.schedule(t)
        swapped_out += len(out.swap_out)
        swapped_in += len(out.swap_in)
        kv.execute(sched, out)
        t += 1
        sched.update(out, None, t)
    assert swapped_out > 0 and swapped_in == swapped_out
    assert all(len(r.output_token_ids) == 30 for r in reqs)
    assert sum(r.num_preemptions for r in reqs) > 0
