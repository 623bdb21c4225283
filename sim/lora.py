"""LoRA adapters in the simulator: adapter size, load time and the per-step cost of the adapters in a batch.

Which adapters sit in GPU slots, and which requests wait for a slot, is the scheduler's business
(`scheduler.max_loras`, `scheduler.max_cpu_loras`, engine.core.lora); this module prices what it decides:
- an adapter is rank x (in + out) weights per adapted matrix, on every linear layer of every transformer
  layer (q, k, v, o, gate, up, down, as PEFT's `target_modules="all-linear"`), in the model's dtype;
- a load (`SchedulerOutput.loaded_loras`) copies the GPU's shard over PCIe; one not in the CPU cache
  (`loaded_loras_from_disk`) is read from disk first at `lora.disk_gbs`. vLLM loads adapters before the
  step's forward, so the step waits for them;
- the batch's adapters run as Punica/S-LoRA SGMV kernels (shrink to rank, expand back): 2 x rank x (in +
  out) FLOPs per token of a LoRA request and per matrix, and every distinct adapter's weights read once,
  priced as a roofline per layer. Punica (Chen et al., MLSys 2024) and S-LoRA (Sheng et al., MLSys 2024)
  measure this as a small overhead on the base model's step, which the roofline reproduces.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from servebench.engine.core.scheduler_output import SchedulerOutput
from servebench.sim.specs import HardwareSpec, ModelSpec, ParallelSpec, check_int, from_group

DISTRIBUTIONS = ("uniform", "zipf")


@dataclass(slots=True)
class LoRA:
    """The `lora` group: the adapters the workload uses and how fast they load."""

    num_adapters: int = 0  # 0: no LoRA; else each request uses one of adapters 1..num_adapters
    rank: int = 16
    distribution: str = "uniform"  # uniform | zipf (adapter k drawn with probability ~ k^-zipf_s)
    zipf_s: float = 1.1
    disk_gbs: float = 2.0  # adapter files read from disk (NVMe) into host memory, GB/s
    # backend=engine: PEFT adapter folders of adapters 1..num_adapters (rank at most `rank`); None: random
    # adapters of `rank` written for the run (the simulator prices `rank` either way)
    paths: list[str] | None = None

    def __post_init__(self) -> None:
        check_int("lora.num_adapters", self.num_adapters, 0)
        check_int("lora.rank", self.rank, 1)
        if self.paths is not None and len(self.paths) != self.num_adapters:
            raise ValueError(f"lora.paths has {len(self.paths)} folders for lora.num_adapters="
                             f"{self.num_adapters}: one per adapter")
        if self.distribution not in DISTRIBUTIONS:
            choices = ", ".join(DISTRIBUTIONS)
            raise ValueError(f"lora.distribution={self.distribution!r}: choose one of {choices}")
        for key in ("zipf_s", "disk_gbs"):
            if not getattr(self, key) > 0:
                raise ValueError(f"lora.{key}={getattr(self, key)!r}: must be > 0")

    @property
    def enabled(self) -> bool:
        return self.num_adapters > 0

    def weights_per_layer(self, model: ModelSpec) -> int:
        """rank x sum over the layer's adapted matrices of (in + out) features."""
        h, q, kv, inter = model.hidden_size, model.q_size, model.kv_size, model.intermediate_size
        return self.rank * (7 * h + 2 * q + 2 * kv + 3 * inter)

    def adapter_bytes(self, model: ModelSpec) -> int:
        return model.num_layers * self.weights_per_layer(model) * model.dtype_bytes

    def slot_bytes_per_gpu(self, model: ModelSpec, parallel: ParallelSpec, slots: int) -> int:
        """GPU memory of `slots` adapter slots (vLLM preallocates them), on the fullest GPU."""
        per_layer = self.weights_per_layer(model) * model.dtype_bytes / parallel.tensor_parallel_size
        return int(slots * parallel.layers_per_stage(model) * per_layer)


def lora_spec(cfg: Mapping[str, Any] | None) -> LoRA:
    return from_group(LoRA, "lora", cfg or {})


class LoRATerm:
    """Seconds a step spends loading adapters (also set as the step's `lora_load_s`, as the engine measures
    it) and in the SGMV kernels of its adapters."""

    def __init__(self, model: ModelSpec, hw: HardwareSpec, parallel: ParallelSpec, lora: LoRA) -> None:
        tp = parallel.tensor_parallel_size
        shard = lora.adapter_bytes(model) / tp
        self._load_s = shard / (hw.pcie_gbs * 1e9)
        self._disk_s = lora.adapter_bytes(model) / (lora.disk_gbs * 1e9)
        per_layer = lora.weights_per_layer(model) / tp
        self._layers = model.num_layers
        self._flops_per_token = 2 * per_layer / hw.matmul_flops
        self._bytes_per_adapter = per_layer * model.dtype_bytes / hw.mem_bandwidth

    def __call__(self, out: SchedulerOutput) -> float:
        t = self._load(out) if out.loaded_loras else 0.0
        adapters, tokens = set(), 0
        for req, n in zip(out.requests, out.num_scheduled_tokens):
            if req.lora_id:
                adapters.add(req.lora_id)
                tokens += n
        if tokens:
            t += self._layers * max(tokens * self._flops_per_token, len(adapters) * self._bytes_per_adapter)
        return t

    def _load(self, out: SchedulerOutput) -> float:
        loads, from_disk = len(out.loaded_loras), len(out.loaded_loras_from_disk)
        out.lora_load_s = loads * self._load_s + from_disk * self._disk_s
        return out.lora_load_s
