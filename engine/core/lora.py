"""GPU slots for LoRA adapters (vLLM's `max_loras`), with a CPU cache behind them (`max_cpu_loras`)."""

from __future__ import annotations

from collections import OrderedDict


class LoRASlots:
    """Which adapters sit in the `max_loras` GPU slots, and which running requests use them.

    An adapter used by a running request stays in its slot; among the others the
    least recently used is evicted when a new adapter needs a slot. Loads are
    collected in `loaded` (every load into a GPU slot) and `loaded_from_disk`
    (those not in the LRU CPU cache of `max_cpu_loras` adapters either), until
    the scheduler moves them into the step's output.
    """

    def __init__(self, max_loras: int, max_cpu_loras: int) -> None:
        self.max_loras = max_loras
        self.max_cpu_loras = max_cpu_loras
        self._gpu: OrderedDict[int, int] = OrderedDict()  # adapter -> running requests using it; LRU first
        self._cpu: OrderedDict[int, None] = OrderedDict()
        self.loaded: list[int] = []
        self.loaded_from_disk: list[int] = []

    def can_place(self, lora_id: int) -> bool:
        """True if the adapter is in a slot, or one is free or held by an adapter no running request uses."""
        gpu = self._gpu
        return lora_id in gpu or len(gpu) < self.max_loras or 0 in gpu.values()

    def acquire(self, lora_id: int) -> None:
        """A request of this adapter starts running; `can_place(lora_id)` must be True."""
        gpu = self._gpu
        if lora_id not in gpu:
            if len(gpu) >= self.max_loras:
                del gpu[next(a for a, users in gpu.items() if users == 0)]
            gpu[lora_id] = 0
            self._load(lora_id)
        gpu[lora_id] += 1
        gpu.move_to_end(lora_id)

    def release(self, lora_id: int) -> None:
        """A request of this adapter stops running (finished, preempted or swapped out)."""
        self._gpu[lora_id] -= 1

    def _load(self, lora_id: int) -> None:
        self.loaded.append(lora_id)
        cpu = self._cpu
        if lora_id in cpu:
            cpu.move_to_end(lora_id)
            return
        self.loaded_from_disk.append(lora_id)
        cpu[lora_id] = None
        if len(cpu) > self.max_cpu_loras:
            cpu.popitem(last=False)
