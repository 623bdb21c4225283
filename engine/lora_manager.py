"""The engine's adapters: the LoRARequests it was given (each checked once), the host copies of those in the
CPU cache, and the GPU slot tables, filled as the scheduler's LoRA slots decide (engine.core.lora): its
`loaded_loras_from_disk` are read from disk into the host cache, its `loaded_loras` copied into their slots
before the step's forward, its `evicted_loras_from_cpu` dropped from the host cache."""

from __future__ import annotations

import time

import numpy as np
import torch
from servebench.engine.config import ModelConfig
from servebench.engine.core.scheduler_output import SchedulerOutput
from servebench.engine.lora import AdapterConfig, LoRARequest, check_adapter, read_adapter
from servebench.engine.lora_layers import LoRATables, PackedLoRA, group_rows
from servebench.engine.models import LlamaForCausalLM
from servebench.kernels import ops


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

    def load(self, out: SchedulerOutput) -> float:
        """Put the step's loads in their slots; returns their seconds: disk to host, host to device."""
        start = time.perf_counter()
        pin = self.device.type == "cuda"
        for lora in out.loaded_loras_from_disk:
            weights = read_adapter(*self.requests[lora], self.model_config.num_layers)
            self.host[lora] = self.tables.pack(weights, pin)
        disk_s = time.perf_counter() - start
        copy_s = self._copy([(out.lora_slots[lora], self.host[lora]) for lora in out.loaded_loras])
        for lora in out.evicted_loras_from_cpu:
            del self.host[lora]
        return disk_s + copy_s

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
        self.tables.indices = ops.LoRAIndices(torch.from_numpy(rows).to(self.device),
                                              torch.from_numpy(starts).to(self.device), max_rows)
