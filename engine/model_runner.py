"""Runs one scheduler step on the device: swaps, input tensors, forward (eager or CUDA graph), sampling."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from servebench.engine.config import EngineArgs, ModelConfig
from servebench.engine.core.config import CacheConfig, SchedulerConfig
from servebench.engine.core.scheduler_output import SchedulerOutput
from servebench.engine.cuda_graphs import CudaGraphs
from servebench.engine.host_to_device import to_device
from servebench.engine.input_batch import HostBatch, prepare
from servebench.engine.kv_cache import KVCache
from servebench.engine.loader import load_model
from servebench.engine.lora_manager import LoRALoads, LoRAManager
from servebench.engine.models import AttentionMetadata
from servebench.engine.parallel import TensorParallel
from servebench.engine.pending_tokens import PendingTokens
from servebench.engine.sampled_tokens import SampledTokens
from servebench.engine.sampler import Logprobs, Sampler


@dataclass(slots=True)
class ShardStep:
    """What tensor-parallel ranks 1.. need of a step to run their shard of it (engine.workers)."""

    swap_out: list[tuple[int, int]]
    swap_in: list[tuple[int, int]]
    batch: HostBatch | None  # None: a step that only swaps
    graph_batch: int
    graph_tokens: int
    lora: LoRALoads | None = None  # adapters to load first


class ModelRunner:
    """The model on the device and what a step needs around it: the KV cache (kv_cache.py), the step's inputs
    (input_batch.py), the previous launch's tokens for async scheduling (pending_tokens.py), decode graphs
    (cuda_graphs.py; None when eager), the sampler and, with enable_lora, the adapters (lora_manager.py;
    None without). A step is `launch` (or `execute`, which waits).

    With tensor parallelism (`tp`) the model and KV cache are this rank's shard; rank 0's runner hands each
    step to the other ranks' runners (`send_step`: engine.workers.Workers.send) before running it, and alone
    samples; theirs run it in `run_shard`."""

    def __init__(self, args: EngineArgs, cfg: ModelConfig, sched: SchedulerConfig, cache: CacheConfig,
                 tp: TensorParallel | None = None, send_step: Callable[[ShardStep], None] | None = None
                 ) -> None:
        self.dtype, self.send_step = args.torch_dtype(cfg), send_step
        # Async scheduling under tensor parallelism: the next step's PENDING inputs are this step's tokens,
        # which rank 0 samples and broadcasts, so that every rank fills them on its own device.
        self.tp_pending = tp if tp is not None and args.async_scheduling else None
        self.device = args.torch_device if tp is None else tp.device(args.torch_device)
        self.block_size = cache.block_size
        torch.manual_seed(args.seed)
        max_position = max(cfg.max_position_embeddings, sched.max_model_len)
        self.model = load_model(cfg, self.dtype, self.device, max_position, args.load_format, args.seed,
                                args.quantization, tp)
        # Before the KV cache is sized: the adapters' slot tables take their share of the device's memory.
        self.lora: LoRAManager | None = None
        if args.enable_lora:
            self.lora = LoRAManager(self.model, cfg, sched.max_loras, args.max_lora_rank, self.dtype,
                                    self.device)
        self.sampler = Sampler(self.device)
        self.pending_tokens = PendingTokens()
        self.kv_cache = KVCache(self.model, self.model.config, args.kv_cache_torch_dtype(self.dtype),
                                self.device, sched, cache, args.kv_cache_memory_bytes, self._run_eager)
        self.cuda_graphs: CudaGraphs | None = None
        if self.device.type == "cuda" and args.cudagraph_mode != "NONE":
            self.cuda_graphs = CudaGraphs(self.model, self.device, sched.max_num_seqs, sched.max_model_len,
                                          self.block_size, self.kv_cache.pad_block,
                                          self.lora.tables if self.lora else None,
                                          sched.max_num_batched_tokens, mixed=args.cudagraph_mode == "FULL")

    @property
    def weight_bytes(self) -> int:
        """Bytes of the model's parameters on the device, quantized as they are (a tied one counted once)."""
        return sum(p.nbytes for p in self.model.parameters())

    @property
    def lora_bytes(self) -> int:
        """Bytes of the adapters' GPU slot tables (0 without enable_lora)."""
        return self.lora.tables.nbytes if self.lora else 0

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of the KV cache's usable blocks (not the padding block CUDA graphs write to)."""
        return self.kv_cache.num_gpu_blocks * self.kv_cache.block_bytes

    def execute(self, out: SchedulerOutput) -> SampledTokens:
        """Swap, run the step's forward and sample, and wait for the device (the step is done on return)."""
        result = self.launch(out)
        result.wait()
        out.device_s = result.device_s
        return result

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput) -> SampledTokens:
        """`execute` without waiting for the device: the host can schedule the next step meanwhile. Input
        tokens still PENDING are the previous launch's sampled tokens, gathered on the device. Adapters the
        step loads are in their slots first (their time in `out.lora_load_s`)."""
        loads = self.lora.loads(out) if out.loaded_loras else None
        if loads is not None:
            out.lora_load_s = self.lora.load(loads)
        sampled, rows, prompt, failures, began = None, [], [], {}, None
        batch = prepare(out, self.block_size, self.pending_tokens) if out.requests else None
        if batch is not None and self.cuda_graphs is not None:
            out.graph_batch, out.graph_tokens = self.cuda_graphs.padded(batch)
        if self.send_step is not None:
            self.send_step(ShardStep(out.swap_out, out.swap_in, batch, out.graph_batch, out.graph_tokens,
                                     loads))
        if self.device.type == "cuda":  # the step's device time: its swap copies, forward and sampling
            began = torch.cuda.Event(enable_timing=True)
            began.record()
        self.kv_cache.swap(out.swap_out, out.swap_in)
        if batch is not None:
            rows = batch.sample_rows
            logits = self._forward(batch, out.graph_batch, out.graph_tokens)
            if rows:
                sampled = self.sampler(logits[:len(rows)], [out.requests[i] for i in rows])
                self.pending_tokens.remember(out.requests, rows, sampled.tokens)
                if self.tp_pending is not None:
                    self.tp_pending.broadcast(sampled.tokens)
                failures = {rows[j]: e for j, e in sampled.failed.items()}
            prompt = self._prompt_logprobs(out, batch, logits[len(rows):], failures)
        return SampledTokens.start(sampled, rows, len(out.requests), self.device, prompt, failures, began)

    @torch.inference_mode()
    def run_shard(self, step: ShardStep) -> None:
        """A tensor-parallel rank's part of rank 0's step: the same swaps and forward (whose collectives meet
        rank 0's); no sampling, but with async scheduling rank 0's sampled tokens, for the next step."""
        if step.lora is not None:
            self.lora.follow(step.lora)
        self.kv_cache.swap(step.swap_out, step.swap_in)
        batch = step.batch
        if batch is None:
            return
        self._forward(batch, step.graph_batch, step.graph_tokens)
        if self.tp_pending is not None and batch.sample_rows:
            tokens = torch.empty(len(batch.sample_rows), dtype=torch.long, device=self.device)
            self.pending_tokens.remember([], [], self.tp_pending.broadcast(tokens))

    def _prompt_logprobs(self, out: SchedulerOutput, batch: HostBatch, logits: torch.Tensor,
                         failures: dict[int, Exception]) -> list[tuple[int, int, Logprobs]]:
        """Scores of the prompt tokens that this step's prefill chunks predict, for `prompt_logprobs`; a
        request whose scores cannot be computed (a long chunk's memory, say) goes to `failures` alone."""
        scored, at = [], 0
        for i, start, token_rows in batch.prompt_rows:
            req, m = out.requests[i], len(token_rows)
            targets = to_device(req.all_token_ids[start + 1:start + 1 + m], self.device, torch.long)
            try:
                scored.append((i, start, Logprobs.of(logits[at:at + m], targets,
                                                     req.sampling_params.prompt_logprobs)))
            except Exception as e:
                failures[i] = e
            at += m
        return scored

    def _forward(self, batch: HostBatch, graph_batch: int, graph_tokens: int) -> torch.Tensor:
        """Logits (float32) of the rows that sample, then of `batch.prompt_rows` (eager only): from the decode
        graph of `graph_batch` rows, else the mixed graph of `graph_tokens` tokens (cudagraph_mode FULL), else
        eagerly."""
        if graph_batch:
            logits = self.cuda_graphs.replay(batch, graph_batch, self.pending_tokens)
            return logits if len(batch.sample_rows) == len(batch.seq_lens) else logits[batch.logits_index]
        if graph_tokens:
            return self.cuda_graphs.replay_mixed(batch, graph_tokens, self.pending_tokens)
        return self._run_eager(batch)

    def _run_eager(self, batch: HostBatch) -> torch.Tensor:
        def put(a: np.ndarray) -> torch.Tensor:
            return to_device(a, self.device)

        meta = AttentionMetadata(
            slot_mapping=put(batch.slot_mapping), block_tables=put(batch.block_tables),
            seq_lens=put(batch.seq_lens), query_start_loc=put(batch.query_start_loc),
            max_query_len=batch.max_query_len, max_seq_len=int(batch.seq_lens.max()))
        input_ids = put(batch.input_ids)
        if self.lora is not None:
            self.lora.set_rows(batch.lora_slots)
        if batch.pending_rows is not None:
            self.pending_tokens.fill(input_ids, batch.pending_rows, batch.pending_from)
        rows = put(np.concatenate([batch.logits_index, *(r for _, _, r in batch.prompt_rows)]))
        hidden = self.model(input_ids, put(batch.positions), meta)
        return self.model.compute_logits(hidden[rows])
