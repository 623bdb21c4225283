"""What one scheduler step decided: the seam where the simulator and the GPU executor plug in."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from servebench.engine.core.request import Request


@dataclass(slots=True)
class SchedulerOutput:
    """One step's batch.

    `requests[i]` computes `num_scheduled_tokens[i]` tokens, starting at its
    `num_computed_tokens` (not yet advanced: `Scheduler.update`, or `advance` with async
    scheduling, advances it).
    A request samples a token this step iff its computed tokens reach
    `num_tokens` after the step. Decode requests are those past their prompt that
    compute exactly one token; everything else is a prefill chunk.

    LoRA: `loaded_loras` are the adapters loaded into GPU slots before this step's
    forward, `loaded_loras_from_disk` those of them that were not in the CPU cache
    either, `evicted_loras_from_cpu` the adapters those loads pushed out of the CPU
    cache; `active_loras` the distinct adapters the batch uses and `lora_slots`
    their GPU slots (engine.core.lora). Multimodal:
    `encoder_inputs` are (image hash, placeholder tokens) of the images the encoder
    runs on this step: those whose placeholder tokens are scheduled for the first
    time since the request's (re)admission and whose output is not in the encoder cache.
    """

    requests: list[Request] = field(default_factory=list)
    num_scheduled_tokens: list[int] = field(default_factory=list)
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    decode_context_tokens: int = 0  # sum over decode requests of context length incl. the new token
    decode_context_max: int = 0  # the longest of those contexts
    prefill_chunks: list[tuple[int, int]] = field(default_factory=list)  # (new tokens, tokens already in KV)
    swap_out: list[tuple[int, int]] = field(
        default_factory=list
    )  # (gpu block, cpu block), before the forward
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (cpu block, gpu block), before the forward
    preempted: list[Request] = field(default_factory=list)
    shed: list[Request] = field(default_factory=list)  # dropped from the waiting queue this step (TTFT SLO)
    loaded_loras: list[int] = field(default_factory=list)
    loaded_loras_from_disk: list[int] = field(default_factory=list)
    evicted_loras_from_cpu: list[int] = field(default_factory=list)
    lora_slots: dict[int, int] = field(default_factory=dict)  # adapter -> its GPU slot, 1..max_loras
    encoder_inputs: list[tuple[str, int]] = field(default_factory=list)
    prefix_hit_tokens: int = 0
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    scheduled_at: float = 0.0
    sample_at: list[int] | None = None  # async scheduling: each request's PENDING token's index, or -1
    # Set by the executor: the CUDA graph the step replayed in (a decode graph's batch, or a mixed graph's
    # tokens; 0: eager), and the device's time for the step's forward and sampling (the simulator: its
    # step-time model's price; NaN: not measured).
    graph_batch: int = 0
    graph_tokens: int = 0
    device_s: float = math.nan
    lora_load_s: float = 0.0  # set by the executor: the loads' time (the engine's measured, the simulator's)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_tokens

    @property
    def active_loras(self) -> set[int]:
        return {r.lora_id for r in self.requests if r.lora_id}

    @property
    def empty(self) -> bool:
        return not self.requests and not self.swap_out
