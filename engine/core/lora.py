"""GPU slots for LoRA adapters (vLLM's `max_loras`), with a CPU cache behind them (`max_cpu_loras`)."""

from __future__ import annotations

from collections import OrderedDict


class LoRASlots:
    """Which adapters sit in the `max_loras` GPU slots, and which running requests use them.

    An adapter used by a running request stays in its slot; among the others the
    least recently used is evicted when a new adapter needs a slot, which it takes
    over: `slot_of` numbers the slots 1..max_loras (0 is the base model), the
    engine's adapter tables' rows. Loads are collected in `loaded` (every load into
    a GPU slot) and `loaded_from_disk` (those not in the LRU CPU cache of
    `max_cpu_loras` adapters either), and the adapters that loads pushed out of the
    CPU cache in `evicted_from_cpu`, until the scheduler moves them into the step's
    output.
    """

    def __init__(self, max_loras: int, max_cpu_loras: int) -> None:
        self.max_loras = max_loras
        self.max_cpu_loras = max_cpu_loras
        self._gpu: OrderedDict[int, int] = OrderedDict()  # adapter -> running requests using it; LRU first
        self._cpu: OrderedDict[int, None] = OrderedDict()
        self.slot_of: dict[int, int] = {}  # adapter in a GPU slot -> the slot, 1..max_loras
        self.loaded: list[int] = []
        self.loaded_from_disk: list[int] = []
        self.evicted_from_cpu: list[int] = []

    def can_place(self, lora_id: int) -> bool:
        """True if the adapter is in a slot, or one is free or held by an adapter no running request uses."""
        gpu = self._gpu
        return lora_id in gpu or len(gpu) < self.max_loras or 0 in gpu.values()

    def acquire(self, lora_id: int) -> None:
        """A request of this adapter starts running; `can_place(lora_id)` must be True."""
        gpu = self._gpu
        if lora_id not in gpu:
            if len(gpu) >= self.max_loras:  # full: slots 1..max_loras are taken, the LRU idle one is freed
                victim = next(a for a, users in gpu.items() if users == 0)
                del gpu[victim]
                slot = self.slot_of.pop(victim)
            else:  # slots are only freed to be taken at once, so 1..len(gpu) are the ones in use
                slot = len(gpu) + 1
            gpu[lora_id] = 0
            self.slot_of[lora_id] = slot
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
        if lora_id in self.evicted_from_cpu:  # pushed out by an earlier load of this step: the host drops it
            self.evicted_from_cpu.remove(lora_id)  # only at the step's end, so it is still there to copy from
        else:
            self.loaded_from_disk.append(lora_id)
        cpu[lora_id] = None
        if len(cpu) > self.max_cpu_loras:
            self.evicted_from_cpu.append(cpu.popitem(last=False)[0])
