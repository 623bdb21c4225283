"""The engine's adapters: the LoRARequests it was given (each checked once), the host copies of those in the
CPU cache, and the GPU slot tables, filled as the scheduler's LoRA slots decide (engine.core.lora): its
`loaded_loras_from_disk` are read from disk into the host cache, its `loaded_loras` copied into their slots
before the step's forward, its `evicted_loras_from_cpu` dropped from the host cache."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from servebench.engine.config import ModelConfig
from servebench.engine.core.scheduler_output import SchedulerOutput
from servebench.engine.host_to_device import to_device
from servebench.engine.lora import AdapterConfig, LoRARequest, check_adapter, read_adapter
from servebench.engine.lora_layers import LoRATables, PackedLoRA, group_rows
from servebench.engine.models import LlamaForCausalLM
from servebench.kernels import ops


@dataclass(slots=True)
class LoRALoads:
    """A step's adapter loads (engine.core.lora's decisions, in the SchedulerOutput): into which slots, which
    from disk (and their LoRARequests), which leave the host cache."""

    loaded: list[int]
    from_disk: list[int]
    evicted: list[int]
    slots: dict[int, int]
    requests: list[LoRARequest]


class LoRAManager:
    def __init__(self, model: LlamaForCausalLM, model_config: ModelConfig, max_loras: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.model_config, self.max_rank, self.device = model_config, max_rank, device
        self.tables = LoRATables(model, max_loras, max_rank, dtype, device)
        self.requests: dict[int, tuple[LoRARequest, AdapterConfig]] = {}
        self.host: dict[int, list[PackedLoRA]] = {}  # the CPU cache: adapter id -> its packed tensors

    def register(self, request: LoRARequest) -> None:
        """Check an adapter the first time its id is seen (engine.lora.check_adapter); an id names one
        adapter for the engine's life."""
        lora_id = request.lora_int_id
        known = self.requests.get(lora_id)
        if known is None:
            self.requests[lora_id] = (request, check_adapter(request, self.model_config, self.max_rank))
        elif known[0] != request:
            raise ValueError(f"lora_int_id {lora_id} is already adapter {known[0].lora_name!r} at "
                             f"{known[0].lora_path}; one id names one adapter")

    def reset(self) -> None:
        """Forget every adapter (LLMEngine.reset: a fresh scheduler, whose LoRA slots start with an empty CPU
        cache); the GPU slots are overwritten as adapters load again."""
        self.requests.clear()
        self.host.clear()

    def loads(self, out: SchedulerOutput) -> LoRALoads:
        """The step's loads, with the adapters that come from disk (for tensor-parallel ranks 1..)."""
        return LoRALoads(out.loaded_loras, out.loaded_loras_from_disk, out.evicted_loras_from_cpu,
                         out.lora_slots, [self.requests[lora][0] for lora in out.loaded_loras_from_disk])

    def load(self, loads: LoRALoads) -> float:
        """Put the step's loads in their slots; returns their seconds: disk to host, host to device."""
        start = time.perf_counter()
        pin = self.device.type == "cuda"
        for lora in loads.from_disk:
            weights = read_adapter(*self.requests[lora], self.model_config.num_layers)
            self.host[lora] = self.tables.pack(weights, pin)
        disk_s = time.perf_counter() - start
        copy_s = self._copy([(loads.slots[lora], self.host[lora]) for lora in loads.loaded])
        for lora in loads.evicted:
            del self.host[lora]
        return disk_s + copy_s

    def follow(self, loads: LoRALoads) -> None:
        """A tensor-parallel rank's part of rank 0's loads: the same adapters (each checked again as it
        comes from disk: its id may name another adapter since an engine reset) into its shard's slots."""
        for request in loads.requests:
            self.requests.pop(request.lora_int_id, None)
            self.register(request)
        self.load(loads)

    def _copy(self, loads: list[tuple[int, list[PackedLoRA]]]) -> float:
        """Write each (slot, adapter); the copies' time. On a GPU they queue behind the step in flight (which
        may still read an evicted adapter's slot), and CUDA events time them alone."""
        if self.device.type != "cuda":
            start = time.perf_counter()
            for slot, packed in loads:
                self.tables.write(slot, packed)
            return time.perf_counter() - start
        began, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        began.record()
        for slot, packed in loads:
            self.tables.write(slot, packed)
        done.record()
        done.synchronize()
        return began.elapsed_time(done) / 1e3

    def set_rows(self, token_slots: np.ndarray | None) -> None:
        """The adapter slot of each token row of the next eager forward (None: no row has an adapter)."""
        if token_slots is None:
            self.tables.indices = self.tables.idle
            return
        rows, starts, max_rows = group_rows(token_slots, self.tables.max_loras)
        self.tables.indices = ops.LoRAIndices(to_device(rows, self.device), to_device(starts, self.device),
                                              max_rows)
