"""LLMEngine: tokenizer, the shared scheduler, the model runner and detokenization, stepped by one thread."""

from __future__ import annotations

import atexit
import dataclasses
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from servebench.engine.config import EngineArgs, ModelConfig
from servebench.engine.core.config import CacheConfig, SchedulerConfig
from servebench.engine.core.recorder import TraceRecorder
from servebench.engine.core.request import Request, RequestStatus
from servebench.engine.core.sampling_params import SamplingParams
from servebench.engine.core.scheduler import Scheduler, SchedulerStats
from servebench.engine.core.scheduler_output import SchedulerOutput
from servebench.engine.detokenizer import Detokenizer
from servebench.engine.lora import LoRARequest
from servebench.engine.model_runner import ModelRunner
from servebench.engine.outputs import CompletionOutput, PositionLogprobs, RequestMetrics, RequestOutput
from servebench.engine.parallel import TensorParallel
from servebench.engine.sampled_tokens import SampledTokens
from servebench.engine.workers import Workers
from transformers import AutoTokenizer

logger = logging.getLogger(__name__)


def release_engines() -> None:
    """Free the engines nothing refers to any more, and give their device memory back. LLMEngine gc.freeze()s
    what is alive when it starts (model, KV cache, CUDA graphs), and frozen objects are never collected: a
    second engine in the process would otherwise size its KV cache on a GPU the first one still fills."""
    gc.unfreeze()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass(slots=True)
class _Tracked:
    req: Request
    prompt: str | None
    detokenizer: Detokenizer
    num_reported: int = 0  # output tokens already returned by step()
    logprobs: list[PositionLogprobs] | None = None  # per output token, when SamplingParams.logprobs is set
    cumulative_logprob: float | None = None
    prompt_logprobs: list[PositionLogprobs | None] | None = None  # per prompt token (the first: None)


class LLMEngine:
    """Add requests, call `step()` until `has_unfinished_requests()` is False.

    Times (arrival, first token, ...) are seconds in a wall clock (time.time()) that advances by
    time.perf_counter(), so the recorder's step durations are precise.
    """

    def __init__(self, args: EngineArgs, scheduler_config: SchedulerConfig | None = None,
                 cache_config: CacheConfig | None = None) -> None:
        """`scheduler_config` / `cache_config`: engine/core's whole configs (every policy knob, not only
        the vLLM-named ones in `args`), as the workbench passes them; None derives them from `args`. Either
        way they are the engine's one source of those knobs: the scheduler and the model runner read them,
        never `args`' copies (max_model_len is `args`', resolved against the model)."""
        self.args = args
        release_engines()  # a dropped one would still hold device memory and ranks while this one starts
        self.model_config = cfg = ModelConfig.from_dir(args.model)
        self.tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
        if not hasattr(self.tokenizer, "backend_tokenizer"):
            raise ValueError(f"{args.tokenizer or args.model}: a fast tokenizer (tokenizer.json) is required")
        self.max_model_len = args.resolved_max_model_len(cfg)
        self.scheduler_config = scheduler_config or args.scheduler_config(self.max_model_len)
        self.cache_config = cache_config or args.cache_config()
        if args.enable_lora and not self.scheduler_config.max_loras:
            raise ValueError("enable_lora needs GPU slots for the adapters: scheduler.max_loras >= 1")
        self.workers, tp = None, None
        if args.tensor_parallel_size > 1:
            tp = TensorParallel(0, args.tensor_parallel_size)
            tp.shard_config(cfg)  # a size that does not divide the model fails before any process starts
            self.workers = Workers(args, cfg, self.scheduler_config, self.cache_config)
        try:
            self.runner = ModelRunner(args, cfg, self.scheduler_config, self.cache_config, tp,
                                      self.workers and self.workers.send)
            self.reset()
        except BaseException:
            self.shutdown()
            raise
        eos = cfg.eos_token_ids
        self.eos_token_id = next((e for e in [self.tokenizer.eos_token_id, *eos] if e is not None), None)
        self._extra_eos = [e for e in eos if e != self.eos_token_id]  # Llama 3 ends turns with several
        self._wall0, self._perf0 = time.time(), time.perf_counter()
        # As vLLM does: the model, tokenizer and graphs stay alive for the engine's life, so later full
        # collections need not walk them (each walk would stall a step by milliseconds).
        gc.collect()
        gc.freeze()
        atexit.register(gc.unfreeze)  # frozen objects are never freed: native extensions report leaks

    def shutdown(self) -> None:
        """End the tensor-parallel ranks' processes (also done when the engine is collected or the process
        exits); the engine cannot step afterwards. Nothing to do without tensor parallelism."""
        if self.workers is not None:
            self.workers.stop()

    def reset(self) -> None:
        """A fresh scheduler, KV cache index (prefix cache included) and trace on the loaded model: one model
        load serves several benchmark runs. Requests still in flight are dropped."""
        self.recorder = TraceRecorder()
        if self.runner.lora is not None:
            self.runner.lora.reset()
        kv_cache = self.runner.kv_cache
        self.scheduler = Scheduler(self.scheduler_config, self.cache_config, kv_cache.num_gpu_blocks,
                                   kv_cache.num_cpu_blocks, self.recorder)
        self._tracked: dict[str, _Tracked] = {}
        self._dropped: list[_Tracked] = []  # finished without a step (shed): reported by the next step()
        self._in_flight: tuple[SchedulerOutput, SampledTokens] | None = None  # async: launched, not resolved

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> LLMEngine:
        return cls(EngineArgs.from_kwargs(model, **kwargs))

    def now(self) -> float:
        return self._wall0 + (time.perf_counter() - self._perf0)

    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    # ---- requests ------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int] | None = None,
                    params: SamplingParams | None = None, arrival_time: float | None = None,
                    priority: int = 0, reject_if_too_long: bool = False,
                    lora_request: LoRARequest | None = None) -> None:
        """Queue a request; `prompt_token_ids` wins over `prompt`, which is then only echoed back.
        `lora_request`: the adapter it runs with (None: the base model), checked on first sight (add_lora).

        A prompt over max_model_len is an error, unless `reject_if_too_long`: then the request ends at once
        as rejected (recorded in the trace, reported by the next `step()`), as the simulator's scheduler
        takes it, so that a replayed workload's rejections are counted alike on both backends.
        """
        params = params or SamplingParams()
        if request_id in self._tracked:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if lora_request is not None:
            self.add_lora(lora_request)
        if prompt_token_ids is None:
            if prompt is None:
                raise ValueError(f"request {request_id}: give a prompt or prompt_token_ids")
            prompt_token_ids = self.tokenizer.encode(prompt)
        self._validate(request_id, prompt_token_ids, params, reject_if_too_long)
        if self._extra_eos and not params.ignore_eos:
            params = dataclasses.replace(params, stop_token_ids=[*params.stop_token_ids, *self._extra_eos])
        now = self.now()
        arrival = arrival_time if arrival_time is not None else now
        # Prompt logprobs need every prompt token computed: no prefix-cache hits on other requests' blocks.
        salt = (request_id,) if params.prompt_logprobs is not None else ()
        req = Request(request_id, list(prompt_token_ids), params, arrival, priority,
                      eos_token_id=self.eos_token_id, cache_salt=salt,
                      lora_id=lora_request.lora_int_id if lora_request is not None else None)
        detok = Detokenizer(self.tokenizer.backend_tokenizer, req.prompt_token_ids, params.stop)
        self._tracked[request_id] = tracked = _Tracked(req, prompt, detok)
        if params.logprobs is not None:
            tracked.logprobs, tracked.cumulative_logprob = [], 0.0
        if params.prompt_logprobs is not None:
            tracked.prompt_logprobs = [None] * req.num_prompt_tokens
        if not self.scheduler.add_request(req, now):  # rejected (too long) or shed (a full waiting queue)
            self._dropped.append(tracked)

    def _validate(self, request_id: str, ids: list[int], params: SamplingParams, reject_if_too_long: bool
                  ) -> None:
        n, limit = len(ids), self.max_model_len
        if n == 0:
            raise ValueError(f"request {request_id}: the prompt is empty")
        # A prompt that fills max_model_len still gets its first token (sampled from the prefill, it needs no
        # KV slot), as the scheduler allows and the simulator does; max_tokens of a rejected one is moot.
        if n > limit:
            if not reject_if_too_long:
                raise ValueError(
                    f"request {request_id}: the prompt has {n} tokens, more than max_model_len={limit}")
        elif params.max_tokens is not None and n + params.max_tokens > max(limit, n + 1):
            raise ValueError(f"request {request_id}: prompt ({n} tokens) + max_tokens ({params.max_tokens}) "
                             f"exceeds max_model_len={limit}")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise ValueError(f"request {request_id}: prompt token ids must be in [0, {self.vocab_size})")
        for name in ("top_k", "logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > self.vocab_size:
                raise ValueError(f"request {request_id}: {name} must be at most the vocabulary size "
                                 f"{self.vocab_size}, got {value}")

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Check an adapter and make its id known (vLLM's add_lora); it loads when a request first needs it.
        A ValueError names what is wrong (no enable_lora, a bad folder, a rank over max_lora_rank, ...)."""
        if self.runner.lora is None:
            raise ValueError(f"LoRA adapter {lora_request.lora_name!r}: the engine runs without LoRA; "
                             "pass enable_lora=True")
        self.runner.lora.register(lora_request)
        return True

    def abort_request(self, request_id: str) -> None:
        """End a request now and free its KV blocks; unknown or finished ids are ignored."""
        if self._tracked.pop(request_id, None) is not None:
            self.scheduler.finish_requests([request_id], RequestStatus.FINISHED_ABORTED, self.now())
            self.runner.sampler.forget(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self._dropped) or self._in_flight is not None or self.scheduler.has_unfinished_requests()

    # ---- one step ------------------------------------------------------------------
    def step(self, final_only: bool = False) -> list[RequestOutput]:
        """Schedule, run and sample one batch; outputs of the requests that got tokens or finished.

        final_only (the offline API): outputs of finished requests only, and text decoded only where a
        stop string needs it before then (the rest is decoded at once at the end: the same text).
        """
        out = self.scheduler.schedule(self.now())
        # Requests the scheduler shed (admission control) end without a token; they are reported too.
        self._dropped += (self._tracked[req.request_id] for req in out.shed)
        outputs = [self._output(t) for t in self._dropped]
        for t in self._dropped:
            del self._tracked[t.req.request_id]
        self._dropped.clear()
        if not self.args.async_scheduling:
            if not out.empty:
                result = self._on_ranks(self.runner.execute, out)
                sampled = result.tolist()
                now = self.now()
                outputs += self._fail(out, result, now)
                self.scheduler.update(out, sampled, now)
                self._record_logprobs(out, result)
                outputs += self._collect(out, now, final_only)
            return outputs
        # Async: launch this step, then wait for the previous one's tokens while the GPU runs it.
        launched = None if out.empty else (out, self._on_ranks(self.runner.launch, out))
        if self._in_flight is not None:
            prev, result = self._in_flight
            sampled = result.tolist()
            prev.device_s = result.device_s
            now = self.now()
            outputs += self._fail(prev, result, now)
            self.scheduler.resolve(prev, sampled, now)
            self._record_logprobs(prev, result)
            outputs += self._collect(prev, now, final_only)
        if launched is not None:
            self.scheduler.advance(out)
        self._in_flight = launched
        return outputs

    def _on_ranks(self, run: Callable[[SchedulerOutput], SampledTokens], out: SchedulerOutput
                  ) -> SampledTokens:
        """run(out) (the runner's execute or launch); under tensor parallelism, a failure stops every rank."""
        try:
            return run(out)
        except BaseException as e:
            if self.workers is None or not self.workers.running:  # stopped earlier: Workers.send says so
                raise
            # Another rank may be inside a collective this one left: no later step could pair with it.
            failure = self.workers.failure()
            self.shutdown()
            if not isinstance(e, Exception):  # Ctrl-C and exits stay what they are
                raise
            why = f"a rank's error:\n{failure}" if failure else f"{type(e).__name__}: {e}"
            raise RuntimeError(f"a tensor-parallel step failed, the ranks are stopped ({why})") from e

    def _fail(self, out: SchedulerOutput, result: SampledTokens, now: float) -> list[RequestOutput]:
        """End the requests whose part of the step failed (finish reason "error"), before their placeholder
        tokens land; the rest of the step goes on."""
        outputs = []
        for i, error in result.failures.items():
            rid = out.requests[i].request_id
            tracked = self._tracked.pop(rid, None)
            if tracked is None:
                continue
            logger.error("request %s failed in its step: %r", rid, error)
            self.scheduler.finish_requests([rid], RequestStatus.FINISHED_ERROR, now)
            self.runner.sampler.forget(rid)
            outputs.append(self._output(tracked))
        return outputs

    def _record_logprobs(self, out: SchedulerOutput, result: SampledTokens) -> None:
        """Keep the step's logprobs of the requests that asked, with the tokens they belong to."""
        for i, position in result.logprobs(out.requests).items():
            tracked = self._tracked.get(out.requests[i].request_id)
            if tracked is not None and len(tracked.logprobs) < tracked.req.num_output_tokens:
                tracked.logprobs.append(position)
                tracked.cumulative_logprob += next(iter(position.values())).logprob
        for i, start, positions in result.prompt_logprobs(out.requests):
            tracked = self._tracked.get(out.requests[i].request_id)
            if tracked is not None:  # a recomputed prefill (preemption) writes the same values again
                tracked.prompt_logprobs[start + 1:start + 1 + len(positions)] = positions

    def _collect(self, out: SchedulerOutput, now: float, final_only: bool) -> list[RequestOutput]:
        """Outputs of the step's requests that got tokens or finished."""
        outputs = []
        for req in out.requests:
            tracked = self._tracked.get(req.request_id)
            if tracked is None or req.num_output_tokens == tracked.num_reported:
                continue
            if final_only and not req.status.finished and not tracked.detokenizer.stop:
                continue
            self._detokenize(tracked, now)
            if req.status.finished:
                outputs.append(self._output(tracked))
                del self._tracked[req.request_id]
                self.runner.sampler.forget(req.request_id)
            elif not final_only:
                outputs.append(self._output(tracked))
        return outputs

    def _detokenize(self, tracked: _Tracked, now: float) -> None:
        req = tracked.req
        stop = tracked.detokenizer.append(req.all_token_ids[req.num_prompt_tokens + tracked.num_reported:])
        tracked.num_reported = req.num_output_tokens
        if stop is None:
            return
        if req.status.finished:  # ended by length or EOS on the very token that completed the stop string
            req.status = RequestStatus.FINISHED_STOPPED
        else:
            self.scheduler.finish_requests([req.request_id], RequestStatus.FINISHED_STOPPED, now)
        req.stop_reason = stop

    def _output(self, tracked: _Tracked) -> RequestOutput:
        req = tracked.req
        # Copies: the server reads them in another thread while this one appends.
        logprobs = None if tracked.logprobs is None else list(tracked.logprobs)
        completion = CompletionOutput(0, tracked.detokenizer.text, req.output_token_ids,
                                      tracked.cumulative_logprob, logprobs, req.finish_reason,
                                      req.stop_reason)
        prompt_logprobs = None if tracked.prompt_logprobs is None else list(tracked.prompt_logprobs)
        return RequestOutput(req.request_id, tracked.prompt, req.prompt_token_ids, [completion],
                             req.status.finished, RequestMetrics.of(req), max(req.num_cached_tokens, 0),
                             prompt_logprobs)

    def stats(self) -> SchedulerStats:
        """The scheduler's counters and queues since the last `reset`, and its KV cache now."""
        return self.scheduler.stats()
