"""One scheduler for both backends, in the spirit of vLLM V1.

Each step has one token budget. Running requests are served first (a decode
token, or the next chunk of a prefill), then swapped-out requests are resumed,
then waiting requests are admitted, all while blocks and `max_num_seqs` allow.
When a running request cannot get a block, a victim is preempted (recompute or
swap). The scheduler never reads a clock: the caller passes the time.
"""

from __future__ import annotations

from collections import deque
from itertools import islice, repeat

from engine.core.config import CacheConfig, SchedulerConfig
from engine.core.kv_cache_manager import KVCacheManager
from engine.core.policies import make_queue, make_victim_policy
from engine.core.recorder import TraceRecorder
from engine.core.request import Request, RequestStatus
from engine.core.scheduler_output import SchedulerOutput

RUNNING = RequestStatus.RUNNING


class Scheduler:
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
            num_gpu_blocks, self.block_size, cache_config.enable_prefix_caching, num_cpu_blocks
        )
        self.waiting = make_queue(scheduler_config.queue_policy)
        self.victim_policy = make_victim_policy(scheduler_config.victim_policy)
        self.running: list[Request] = []
        self.swapped: deque[Request] = deque()
        self.requests: dict[str, Request] = {}
        self.recorder = recorder if recorder is not None else TraceRecorder()
        self.num_rejected = 0
        self.num_preemptions = 0
        self.num_steps = 0
        self._step_start = 0.0

    # ---- requests in and out -------------------------------------------------
    def add_request(self, req: Request, now: float) -> bool:
        """Queue a request; False if its prompt exceeds max_model_len (rejected, never scheduled)."""
        if req.num_prompt_tokens > self.config.max_model_len or req.num_prompt_tokens == 0:
            self.num_rejected += 1
            req.status = RequestStatus.FINISHED_REJECTED
            req.finish_time = now
            self.recorder.on_finish(req)
            return False
        req.max_num_tokens = min(req.max_num_tokens, self.config.max_model_len)
        self.requests[req.request_id] = req
        self.waiting.push(req)
        return True

    def finish_requests(self, request_ids: list[str], status: RequestStatus, now: float) -> None:
        """End requests from outside the step loop (abort, stop string); their blocks are freed at once."""
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None:
                continue
            if req.status == RUNNING:
                self.running.remove(req)
            elif req.status == RequestStatus.SWAPPED:
                self.swapped.remove(req)
            else:
                self.waiting.remove(req)
            self._finish(req, status, now)

    def _finish(self, req: Request, status: RequestStatus, now: float) -> None:
        req.status = status
        req.finish_time = now
        self.kv.free(req)
        del self.requests[req.request_id]
        self.recorder.on_finish(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.swapped)

    # ---- one step --------------------------------------------------------------
    def schedule(self, now: float) -> SchedulerOutput:
        cfg = self.config
        kv = self.kv
        out = SchedulerOutput()
        reqs, ntoks = out.requests, out.num_scheduled_tokens
        budget = cfg.max_num_batched_tokens
        threshold = cfg.long_prefill_token_threshold or budget
        running = self.running
        decode = context = 0
        blocked = True  # a request could not get its blocks: preempt, then go on from where we were
        while blocked:
            blocked = False
            # running[:len(reqs)] are this step's batch so far: resume right after them
            for req in islice(running, len(reqs), None):
                if budget <= 0:
                    break
                computed = req.num_computed_tokens
                n = len(req.all_token_ids) - computed
                if n > 1:
                    n = min(n, threshold, budget)
                # Fast path: a decode token that fits the last block without filling it needs no KV work.
                if (n == 1 and computed + 1 < req.num_kv_slots) or kv.allocate_slots(req, n):
                    reqs.append(req)
                    ntoks.append(n)
                    budget -= n
                    if n == 1 and computed >= req.num_prompt_tokens:  # _count's decode case, inlined: hot
                        decode += 1
                        context += computed + 1
                    else:
                        self._count(out, req, n, 1)
                    continue
                blocked = True
                break
            if blocked:
                victim = running.pop(self.victim_policy.select(running, len(reqs)))
                if victim in reqs:  # already scheduled this step: give its tokens back
                    j = reqs.index(victim)
                    del reqs[j]
                    n = ntoks.pop(j)
                    budget += n
                    self._count(out, victim, n, -1)
                self._preempt(victim, out)
        out.num_decode_tokens += decode
        out.decode_context_tokens += context
        if not out.preempted:
            budget = self._resume_swapped(out, budget)
            self._admit_waiting(out, budget, now)
        out.num_running = len(running)
        out.num_waiting = len(self.waiting) + len(self.swapped)
        out.kv_usage = kv.usage
        self._step_start = now
        return out

    def _schedule_new(self, out: SchedulerOutput, req: Request, n: int) -> None:
        req.status = RUNNING
        self.running.append(req)
        out.requests.append(req)
        out.num_scheduled_tokens.append(n)
        self._count(out, req, n, 1)

    @staticmethod
    def _count(out: SchedulerOutput, req: Request, n: int, sign: int) -> None:
        """Add (sign 1) or remove (-1) `n` tokens of `req` to the batch's composition."""
        computed = req.num_computed_tokens
        if n == 1 and computed >= req.num_prompt_tokens:
            out.num_decode_tokens += sign
            out.decode_context_tokens += sign * (computed + 1)
        elif sign > 0:
            out.prefill_chunks.append((n, computed))
            out.num_prefill_tokens += n
        else:
            out.prefill_chunks.remove((n, computed))
            out.num_prefill_tokens -= n

    def _resume_swapped(self, out: SchedulerOutput, budget: int) -> int:
        max_seqs = self.config.max_num_seqs
        threshold = self.config.long_prefill_token_threshold or budget
        while self.swapped and budget > 0 and len(self.running) < max_seqs:
            req = self.swapped[0]
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
        cfg = self.config
        kv = self.kv
        bs = self.block_size
        while self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            req = self.waiting.peek()
            hits = kv.get_computed_blocks(req)
            num_hit = len(hits) * bs
            n = len(req.all_token_ids) - num_hit
            if cfg.long_prefill_token_threshold:
                n = min(n, cfg.long_prefill_token_threshold)
            if n > budget:
                if not cfg.enable_chunked_prefill:
                    break
                n = budget
            if not kv.allocate_slots(req, n, hits):
                break
            self.waiting.pop()
            req.num_computed_tokens = num_hit
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_hit
                req.first_scheduled_time = now
            out.prefix_hit_tokens += num_hit
            self._schedule_new(out, req, n)
            budget -= n

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        req.num_preemptions += 1
        self.num_preemptions += 1
        out.preempted.append(req)
        if self.config.preemption_mode == "swap":
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
        itl_append = self.recorder.itl_s.append
        tokens_iter = sampled if sampled is not None else repeat(0)
        finished = []
        for req, n, tok in zip(out.requests, out.num_scheduled_tokens, tokens_iter):
            computed = req.num_computed_tokens + n
            req.num_computed_tokens = computed
            tokens = req.all_token_ids
            if computed < len(tokens):
                continue  # a partial prefill chunk samples nothing
            tokens.append(tok)
            if req.first_token_time is None:
                req.first_token_time = now
            else:
                itl_append(now - req.last_token_time)
            req.last_token_time = now
            if len(tokens) >= req.max_num_tokens:  # max_tokens or max_model_len
                status = RequestStatus.FINISHED_LENGTH
            elif tok in req.stop_ids:
                status = RequestStatus.FINISHED_STOPPED
            else:
                continue
            if req.status != RUNNING:
                continue  # aborted after this step was scheduled
            req.status = status
            if tok != req.eos_token_id and status == RequestStatus.FINISHED_STOPPED:
                req.stop_reason = tok
            finished.append(req)
        for req in finished:
            self.running.remove(req)
            self._finish(req, req.status, now)
        self.recorder.on_step(
            (
                self.num_steps,
                self._step_start,
                now - self._step_start,
                out.num_prefill_tokens,
                out.num_decode_tokens,
                len(self.running),
                self.num_waiting,
                out.kv_usage,
                len(out.preempted),
                out.prefix_hit_tokens,
            )
        )
        self.num_steps += 1
        return finished
