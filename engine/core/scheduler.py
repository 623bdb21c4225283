"""One scheduler for both backends, in the spirit of vLLM V1.

Each step has one token budget. Running requests are served first (a decode
token, or the next chunk of a prefill), then swapped-out requests are resumed,
then waiting requests are admitted, all while blocks and `max_num_seqs` allow.
When a running request cannot get a block, a victim is preempted (recompute or
swap). Admission also respects the partial-prefill caps and LoRA slots (a
request whose adapter finds no slot is skipped, as in vLLM), and sheds requests
over `max_waiting` or past `shed_ttft_ms`. The scheduler never reads a clock:
the caller passes the time.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass
from itertools import repeat

from servebench.engine.core.config import CacheConfig, SchedulerConfig
from servebench.engine.core.encoder_cache import EncoderCache
from servebench.engine.core.kv_cache_manager import KVCacheManager
from servebench.engine.core.lora import LoRASlots
from servebench.engine.core.policies import make_preemption, make_queue, make_victim_policy
from servebench.engine.core.recorder import NAN, StepRow, TraceRecorder, prefill_attention
from servebench.engine.core.request import PENDING, Request, RequestStatus
from servebench.engine.core.scheduler_output import SchedulerOutput

RUNNING = RequestStatus.RUNNING

# How many held-back requests (long prefill over its cap, adapter without a slot) admission looks past in
# one step: under overload an unbounded scan would walk the whole waiting queue every step.
MAX_SKIPPED = 64


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    """A scheduler's counters since it was built and the state of its queues and cache now: what runs
    summarize and servers export, read without reaching into the scheduler's parts."""

    num_steps: int
    num_finished_requests: int  # every request that ended (a row of the requests table), rejected or shed too
    num_rejected: int
    num_shed: int
    num_preemptions: int
    prefix_cache_queries_tokens: int  # tokens looked up in the prefix cache at admission
    prefix_cache_hits_tokens: int  # of which found there
    num_running: int
    num_waiting: int  # waiting and swapped out
    kv_usage: float
    num_free_blocks: int
    num_gpu_blocks: int


class Scheduler:
    """Decides each step which requests run and how many tokens each computes, for the simulator and the
    GPU engine alike (so a policy tried in one is the code that runs in the other).

    Owns the request queues (waiting, ordered by `queue_policy`; running, in admission order; swapped),
    the KV-cache manager (block tables, prefix cache, swap space), the LoRA slots, the encoder cache and the
    trace recorder. It reads no clock and executes nothing: every call takes `now` from its caller (SimPy
    time, or the engine's wall clock) and the caller runs the batch it returns, which is what lets one
    scheduler serve a virtual and a real clock. Policies are small objects chosen by name in
    SchedulerConfig (engine.core.policies): the waiting queue's order (`queue_policy`), which running
    request gives way when blocks run out (`victim_policy`), and whether it is swapped or recomputed
    (`preemption_mode`); which cached block is evicted first is the cache's (`eviction_policy`).

    A step: `out = schedule(now)`, execute `out`, `update(out, sampled, now)`. With async scheduling the
    caller runs `advance(out)` instead, schedules the next step while this one executes, and calls
    `resolve(out, sampled, now)` once its tokens are known.
    """

    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        num_gpu_blocks: int,
        num_cpu_blocks: int = 0,
        recorder: TraceRecorder | None = None,
    ) -> None:
        self.config = scheduler_config
        self.block_size = cache_config.block_size
        if num_gpu_blocks * self.block_size < scheduler_config.max_model_len:
            raise ValueError(
                f"the KV cache holds {num_gpu_blocks} blocks x {self.block_size} tokens = "
                f"{num_gpu_blocks * self.block_size} tokens, less than one max_model_len="
                f"{scheduler_config.max_model_len} request: raise gpu_memory_utilization or "
                "num_gpu_blocks_override, or lower max_model_len"
            )
        self.kv = KVCacheManager(
            num_gpu_blocks,
            self.block_size,
            cache_config.enable_prefix_caching,
            num_cpu_blocks,
            cache_config.eviction_policy,
        )
        cfg = scheduler_config
        self.waiting = make_queue(cfg.queue_policy)
        self.victim_policy = make_victim_policy(cfg.victim_policy)
        self.preemption = make_preemption(
            cfg.preemption_mode, cfg.swap_s_per_block, cfg.recompute_s_per_token
        )
        self.loras = LoRASlots(cfg.max_loras, cfg.max_cpu_loras) if cfg.max_loras else None
        self.encoder_cache = EncoderCache(cfg.encoder_cache_size)
        self._num_mm = 0  # unfinished requests with images: encoder inputs are looked for only then
        self.running: list[Request] = []
        self.swapped: deque[Request] = deque()
        self.requests: dict[str, Request] = {}
        self.recorder = recorder if recorder is not None else TraceRecorder()
        self.num_rejected = 0
        self.num_shed = 0
        self.num_preemptions = 0
        self.num_steps = 0
        self._last_step_end = NAN  # when the previous step's tokens became known (update or resolve ran)

    # ---- requests in and out -------------------------------------------------
    def add_request(self, req: Request, now: float) -> bool:
        """Queue a request; False if it is rejected (prompt empty or over max_model_len) or shed
        (`max_waiting` requests already wait): either way it is finished at once, never scheduled."""
        cfg = self.config
        if req.num_prompt_tokens > cfg.max_model_len or req.num_prompt_tokens == 0:
            self.num_rejected += 1
            self._drop(req, RequestStatus.FINISHED_REJECTED, now)
            return False
        if cfg.max_waiting and len(self.waiting) >= cfg.max_waiting:
            self.num_shed += 1
            self._drop(req, RequestStatus.FINISHED_SHED, now)
            return False
        req.max_num_tokens = min(req.max_num_tokens, cfg.max_model_len)
        self.requests[req.request_id] = req
        if req.mm_positions:
            self._num_mm += 1
        self.waiting.push(req)
        return True

    def _drop(self, req: Request, status: RequestStatus, now: float) -> None:
        req.status = status
        req.finish_time = now
        self.recorder.on_finish(req)

    def finish_requests(self, request_ids: list[str], status: RequestStatus, now: float) -> None:
        """End requests from outside the step loop (abort, stop string); their blocks are freed at once."""
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is not None:
                self._dequeue(req)
                if req.all_token_ids[-1] == PENDING:  # its token in flight (async) is never resolved
                    req.all_token_ids.pop()
                self._finish(req, status, now)

    def _dequeue(self, req: Request) -> None:
        if req.status == RUNNING:
            self._leave_running(req)
        elif req.status == RequestStatus.SWAPPED:
            self.swapped.remove(req)
        else:
            self.waiting.remove(req)

    def _finish(self, req: Request, status: RequestStatus, now: float) -> None:
        self.kv.free(req)
        del self.requests[req.request_id]
        if req.mm_positions:
            self._num_mm -= 1
        self._drop(req, status, now)

    def _leave_running(self, req: Request) -> None:
        self.running.remove(req)
        self._release_lora(req)

    def _release_lora(self, req: Request) -> None:
        if self.loras is not None and req.lora_id:
            self.loras.release(req.lora_id)

    def has_unfinished_requests(self) -> bool:
        """Whether any admitted request is still waiting, swapped or running: the caller's loop condition."""
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        """Requests queued but not running: waiting and swapped out."""
        return len(self.waiting) + len(self.swapped)

    def stats(self) -> SchedulerStats:
        kv = self.kv
        return SchedulerStats(
            num_steps=self.num_steps,
            num_finished_requests=len(self.recorder.request_rows),
            num_rejected=self.num_rejected,
            num_shed=self.num_shed,
            num_preemptions=self.num_preemptions,
            prefix_cache_queries_tokens=kv.prefix_queries,
            prefix_cache_hits_tokens=kv.prefix_hits,
            num_running=len(self.running),
            num_waiting=self.num_waiting,
            kv_usage=kv.usage,
            num_free_blocks=kv.num_free_blocks,
            num_gpu_blocks=kv.num_gpu_blocks,
        )

    def cached_prefix_blocks(self, req: Request) -> int:
        """Leading full blocks of `req`'s tokens that the prefix cache holds now, as a cache-aware router
        asks: a lookup that changes nothing but `req.block_hashes` (which every scheduler computes alike)."""
        return len(self.kv.get_computed_blocks(req))

    # ---- one step --------------------------------------------------------------
    def schedule(self, now: float) -> SchedulerOutput:
        """The next batch, within `max_num_batched_tokens` tokens and `max_num_seqs` requests: running
        requests first (a decode token or the next prefill chunk each, preempting victims when blocks run
        out), then, only if nobody was preempted (blocks are short: admitting more would preempt again, as
        in vLLM V1), swapped requests resumed and waiting ones admitted.

        Allocates the batch's KV slots and fills the returned SchedulerOutput with what the executor needs
        (requests and token counts, swaps, encoder inputs, LoRAs to load) and what prices the step (prefill
        chunks, decode contexts). It does not advance the requests: the caller must pass `out` to `update`
        (or `advance`) before scheduling again. `now` stamps the step and first admissions, and is the
        clock of TTFT shedding.
        """
        cfg = self.config
        out = SchedulerOutput()
        budget = self._schedule_running(out, cfg.max_num_batched_tokens)
        if cfg.shed_ttft_ms:
            self._shed_late(out, now)
        if not out.preempted:
            budget = self._resume_swapped(out, budget)
            self._admit_waiting(out, budget, now)
        if self.loras is not None:
            self._take_lora_loads(out)
        if self._num_mm:
            self._schedule_encoder_inputs(out)
        out.num_running = len(self.running)
        out.num_waiting = self.num_waiting
        out.kv_usage = self.kv.usage
        out.scheduled_at = now
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        """Serve running requests in order while the budget lasts; when one cannot get its blocks,
        preempt a victim and go on from where we were. Returns the budget left.

        The batch is always the prefix running[:k], so a decode costs counters, not appends, and
        the batch is one slice at the end; the few requests that compute more than a decode token
        are noted in `chunks` (in batch order) and placed afterwards.
        """
        kv, running = self.kv, self.running
        threshold = self.config.long_prefill_token_threshold or budget
        chunks: dict[Request, int] = {}
        k = decode = context = longest = 0  # running[k] is the next request to serve
        while k < len(running) and budget > 0:
            req = running[k]
            computed = req.num_computed_tokens
            n = len(req.all_token_ids) - computed
            if n > 1:
                n = min(n, threshold, budget)
            # Fast path: a decode token that fits the last block without filling it needs no KV work.
            if not ((n == 1 and computed + 1 < req.num_kv_slots) or kv.allocate_slots(req, n)):
                # No blocks: preempt a victim (maybe `req` itself), then retry at running[k].
                j = self.victim_policy.select(running)
                victim = running.pop(j)
                if j < k:  # already in this step's batch: give its tokens back
                    k -= 1
                    if victim in chunks:
                        budget += chunks.pop(victim)
                    else:
                        budget += 1
                        decode -= 1
                        context -= victim.num_computed_tokens + 1
                self._preempt(victim, out)
                continue
            k += 1
            budget -= n
            if n == 1 and computed >= req.num_prompt_tokens:
                decode += 1
                context += computed + 1
                if computed >= longest:
                    longest = computed + 1
            else:
                chunks[req] = n
        out.requests = running[:k]
        out.num_scheduled_tokens = ntoks = [1] * k
        out.num_decode_tokens = decode
        out.decode_context_tokens = context
        # A preempted decode may have been the longest: the batch's own maximum then (preemption is rare).
        out.decode_context_max = longest if len(out.preempted) == 0 else max(
            (r.num_computed_tokens + 1 for r in out.requests if r not in chunks), default=0)
        for req, n in chunks.items():
            ntoks[running.index(req)] = n
            self._count(out, req, n)
        return budget

    def _schedule_new(self, out: SchedulerOutput, req: Request, n: int) -> None:
        if self.loras is not None and req.lora_id:
            self.loras.acquire(req.lora_id)
        req.status = RUNNING
        self.running.append(req)
        out.requests.append(req)
        out.num_scheduled_tokens.append(n)
        self._count(out, req, n)

    @staticmethod
    def _count(out: SchedulerOutput, req: Request, n: int) -> None:
        """Add `n` tokens of `req` to the batch's composition."""
        computed = req.num_computed_tokens
        if n == 1 and computed >= req.num_prompt_tokens:
            out.num_decode_tokens += 1
            out.decode_context_tokens += computed + 1
            out.decode_context_max = max(out.decode_context_max, computed + 1)
        else:
            out.prefill_chunks.append((n, computed))
            out.num_prefill_tokens += n

    def _resume_swapped(self, out: SchedulerOutput, budget: int) -> int:
        """Swap requests back in, oldest preemption first, before any waiting request is admitted (their KV
        is computed already); stops at the first that does not fit. Returns the budget left."""
        max_seqs = self.config.max_num_seqs
        threshold = self.config.long_prefill_token_threshold or budget
        while self.swapped and budget > 0 and len(self.running) < max_seqs:
            req = self.swapped[0]
            if self._prefill_capped(out, req) or not self._lora_fits(req):
                break
            n = min(len(req.all_token_ids) - req.num_computed_tokens, budget, threshold)
            mapping = self.kv.swap_in(req, n)
            if mapping is None:
                break
            self.swapped.popleft()
            out.swap_in.extend(mapping)
            self._schedule_new(out, req, n)
            budget -= n
        return budget

    def _admit_waiting(self, out: SchedulerOutput, budget: int, now: float) -> None:
        """Admit waiting requests in the queue's order while the budget, `max_num_seqs` and blocks last.

        Each starts after its longest prefix-cache hit and computes at most `long_prefill_token_threshold`
        tokens and what is left of the budget (without chunked prefill, a chunk over the budget waits). A
        request that finds no blocks, does not fit the budget unchunked or would exceed
        `max_num_partial_prefills` ends admission: later ones may not overtake it (the queue's order is the
        policy). One held back by a cap that frees up as others finish (its adapter has no LoRA slot; it is
        a long prefill over `max_long_partial_prefills`) is passed over instead, up to MAX_SKIPPED of them,
        and put back at the head of the queue in its order. The first admission of a request sets its
        first-scheduled time and its cached-token count.
        """
        cfg = self.config
        kv = self.kv
        bs = self.block_size
        waiting = self.waiting
        long_cap, threshold = cfg.max_long_partial_prefills, cfg.long_prefill_token_threshold
        num_long = self._num_long_prefills(out) if long_cap else 0
        skipped = []  # passed over for now (adapter without a slot, long prefill over its cap)
        while waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            req = waiting.peek()
            if self._prefill_capped(out, req):
                break
            hits = kv.get_computed_blocks(req) if self._lora_fits(req) else None
            # Long, as in _num_long_prefills: by what is left to compute after the prefix-cache hit.
            num_hit = len(hits) * bs if hits is not None else 0
            n = len(req.all_token_ids) - num_hit
            is_long = long_cap and n > threshold
            if hits is None or (is_long and num_long >= long_cap):
                if len(skipped) == MAX_SKIPPED:
                    break
                skipped.append(waiting.pop())
                continue
            if threshold:
                n = min(n, threshold)
            if n > budget:
                if not cfg.enable_chunked_prefill:
                    break
                n = budget
            if not kv.allocate_slots(req, n, hits):
                break
            waiting.pop()
            num_long += is_long
            req.num_computed_tokens = num_hit
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_hit
                req.first_scheduled_time = now
            out.prefix_hit_tokens += num_hit
            self._schedule_new(out, req, n)
            budget -= n
        for req in reversed(skipped):
            waiting.push_front(req)

    def _prefill_capped(self, out: SchedulerOutput, req: Request) -> bool:
        """True if max_num_partial_prefills prefills are in the batch already and `req` would be
        another (a decode always fits)."""
        cap = self.config.max_num_partial_prefills
        if not cap or len(out.prefill_chunks) < cap:
            return False
        computed = req.num_computed_tokens
        return computed < req.num_prompt_tokens or len(req.all_token_ids) - computed > 1

    def _num_long_prefills(self, out: SchedulerOutput) -> int:
        threshold = self.config.long_prefill_token_threshold
        return sum(len(r.all_token_ids) - r.num_computed_tokens > threshold for r in out.requests)

    def _take_lora_loads(self, out: SchedulerOutput) -> None:
        """Move the loads (and CPU-cache evictions) of this step's admissions into `out`, with the GPU slot of
        every adapter the batch uses."""
        loras = self.loras
        out.loaded_loras, loras.loaded = loras.loaded, []
        out.loaded_loras_from_disk, loras.loaded_from_disk = loras.loaded_from_disk, []
        out.evicted_loras_from_cpu, loras.evicted_from_cpu = loras.evicted_from_cpu, []
        out.lora_slots = {a: loras.slot_of[a] for a in out.active_loras}

    def _lora_fits(self, req: Request) -> bool:
        """A request is admitted only if its adapter can get a GPU slot; the base model always fits."""
        return self.loras is None or not req.lora_id or self.loras.can_place(req.lora_id)

    def _shed_late(self, out: SchedulerOutput, now: float) -> None:
        """Shed waiting requests, from the head of the queue, that can no longer meet shed_ttft_ms: already
        past it, or past it once their own prefill is done when `recompute_s_per_token` prices one (the
        simulator fills it from its step-time model; unset, only requests already late are shed)."""
        waiting, limit = self.waiting, self.config.shed_ttft_ms / 1e3
        per_token = self.config.recompute_s_per_token or 0.0
        while waiting:
            req = waiting.peek()
            # A request preempted while its first token was in flight (async scheduling) is not late: that
            # token is already computed, and shedding it would return the PENDING placeholder as a token.
            if req.first_token_time is not None or req.all_token_ids[-1] == PENDING:
                return
            prefill_s = (req.num_prompt_tokens - req.num_computed_tokens) * per_token
            if now - req.arrival_time + prefill_s <= limit:
                return
            waiting.pop()
            self.num_shed += 1
            self._finish(req, RequestStatus.FINISHED_SHED, now)
            out.shed.append(req)

    def _schedule_encoder_inputs(self, out: SchedulerOutput) -> None:
        """Images whose placeholder tokens the batch reaches for the first time since (re)admission:
        encoded this step unless the encoder cache holds them. Images wholly inside a prefix-cache hit
        are skipped: their tokens are never computed."""
        cache, inputs = self.encoder_cache, out.encoder_inputs
        for req, n in zip(out.requests, out.num_scheduled_tokens):
            positions, k = req.mm_positions, req.num_mm_handled
            start, end = req.num_computed_tokens, req.num_computed_tokens + n
            while k < len(positions) and positions[k][0] < end:
                offset, length = positions[k]
                if offset + length > start and not cache.lookup_or_add(req.mm_hashes[k], length):
                    inputs.append((req.mm_hashes[k], length))
                k += 1
            req.num_mm_handled = k

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        """Take a running request (already out of `running`) off the GPU: its KV to CPU swap space when the
        preemption policy says so and space remains, else freed to be recomputed from the head of the
        waiting queue."""
        req.num_preemptions += 1
        self.num_preemptions += 1
        req.num_mm_handled = 0  # the encoder outputs it held are dropped with its KV
        self._release_lora(req)
        out.preempted.append(req)
        if self.preemption.swap(req, len(req.block_table)):
            mapping = self.kv.swap_out(req)
            if mapping is not None:
                req.status = RequestStatus.SWAPPED
                out.swap_out.extend(mapping)
                self.swapped.append(req)
                return
        # Recompute (or swap space full): drop the KV; the prefix cache may keep part of it.
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        self.waiting.push_front(req)

    def update(self, out: SchedulerOutput, sampled: list[int] | None, now: float) -> list[Request]:
        """Advance the step's requests, append sampled tokens, finish those that stop.

        `sampled[i]` belongs to `out.requests[i]`; None (the simulator) appends placeholder tokens.
        """
        finished = self._apply(out, sampled, now)
        self._record(out, now, out.scheduled_at - self._last_step_end)
        return finished

    def _apply(self, out: SchedulerOutput, sampled: list[int] | None, now: float) -> list[Request]:
        """`update` but for the step's row in the steps table; returns the requests finished."""
        itl_append = self.recorder.itl_s.append
        tokens_iter = sampled if sampled is not None else repeat(0)
        finished = []
        for req, n, tok in zip(out.requests, out.num_scheduled_tokens, tokens_iter):
            if req.status.finished:  # ended since this step was scheduled (abort, a failed sample)
                continue
            computed = req.num_computed_tokens + n
            req.num_computed_tokens = computed
            tokens = req.all_token_ids
            if computed < len(tokens):
                continue  # a partial prefill chunk samples nothing
            tokens.append(tok)  # now len(tokens) == computed + 1
            if req.first_token_time is None:
                req.first_token_time = now
            else:
                itl_append(now - req.last_token_time)
            req.last_token_time = now
            if computed >= req.max_num_tokens - 1:  # max_tokens or max_model_len
                status = RequestStatus.FINISHED_LENGTH
            elif tok in req.stop_ids:
                status = RequestStatus.FINISHED_STOPPED
            else:
                continue
            if tok != req.eos_token_id and status == RequestStatus.FINISHED_STOPPED:
                req.stop_reason = tok
            finished.append((req, status))
        for req, status in finished:
            self._dequeue(req)  # running; with async scheduling it may have been preempted since
            self._finish(req, status, now)
        return [req for req, _ in finished] if finished else []

    def _record(self, out: SchedulerOutput, now: float, host_gap: float) -> None:
        """The step's row of the steps table."""
        self.recorder.on_step(
            StepRow(
                step=self.num_steps,
                start_s=out.scheduled_at,
                duration_s=now - out.scheduled_at,
                num_prefill_tokens=out.num_prefill_tokens,
                num_decode_tokens=out.num_decode_tokens,
                num_running=len(self.running),
                num_waiting=self.num_waiting,
                kv_usage=out.kv_usage,
                num_preempted=len(out.preempted),
                prefix_hit_tokens=out.prefix_hit_tokens,
                num_prefill_chunks=len(out.prefill_chunks),
                prefill_attention=prefill_attention(out.prefill_chunks),
                prefill_context_sum=sum(c for _, c in out.prefill_chunks),
                decode_context_sum=out.decode_context_tokens,
                decode_context_max=out.decode_context_max,
                graph_batch=out.graph_batch,
                graph_tokens=out.graph_tokens,
                swap_in_blocks=len(out.swap_in),
                swap_out_blocks=len(out.swap_out),
                host_gap_s=host_gap,
                device_s=out.device_s,
                lora_loads=len(out.loaded_loras),
                lora_loads_from_disk=len(out.loaded_loras_from_disk),
                lora_load_s=out.lora_load_s,
            )
        )
        self._last_step_end = now
        self.num_steps += 1

    # ---- async scheduling: the next step is scheduled while this one runs ----------
    def advance(self, out: SchedulerOutput) -> None:
        """Async scheduling's first half of `update`, called as soon as `out` is scheduled, before its tokens
        are known: advance the requests and append a PENDING token to each that samples, so that the next
        `schedule` sees the state this step will leave (its decode rows read the PENDING tokens on the
        device) while this one runs. `out.sample_at` records where each sampled token goes (-1: none);
        `resolve` must follow for every advanced step, in order."""
        out.sample_at = sample_at = []
        for req, n in zip(out.requests, out.num_scheduled_tokens):
            tokens = req.all_token_ids
            if req.status.finished:  # finished by the previous step's tokens after this one was scheduled
                sample_at.append(-1)
                continue
            computed = req.num_computed_tokens + n
            req.num_computed_tokens = computed
            if computed < len(tokens):
                sample_at.append(-1)
                continue
            sample_at.append(computed)
            tokens.append(PENDING)

    def resolve(self, out: SchedulerOutput, sampled: list[int], now: float) -> list[Request]:
        """Async scheduling's second half of `update`: the `advance`d step's tokens are known at `now`
        (`sampled[i]` for `out.requests[i]`). `_apply` writes them in place of their PENDING tokens, records
        their times and finishes the requests they end, which are returned. Such a request may already be in
        the step running now (its token there is dropped) or preempted by it. The step's row is recorded
        with its start at the later of its scheduling and the previous step's end, as steps overlap."""
        reqs, tokens, preempted = [], [], []
        for req, at, tok in zip(out.requests, out.sample_at, sampled):
            if at < 0 or req.status.finished:
                continue
            req.all_token_ids.pop()  # its PENDING token, the last: the next step's advance comes after this
            if req.num_computed_tokens != at:  # preempted since: _apply finds it at its sampled position
                preempted.append((req, req.num_computed_tokens))
                req.num_computed_tokens = at
            reqs.append(req)
            tokens.append(tok)
        # Steps overlap: a step's duration runs from when the previous step's tokens were known.
        start = max(out.scheduled_at, self._last_step_end) if self.num_steps else out.scheduled_at
        done = dataclasses.replace(out, requests=reqs, num_scheduled_tokens=[0] * len(reqs),
                                   scheduled_at=start)
        finished = self._apply(done, tokens, now)
        # Negative: scheduled while the previous step still ran (the host's work hidden behind the device's).
        self._record(done, now, out.scheduled_at - self._last_step_end)
        for req, computed in preempted:
            req.num_computed_tokens = computed
        return finished

