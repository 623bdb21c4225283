"""The model's LoRA slot tables on the device: every decoder projection wrapped in a LoRALinear that holds
`max_loras` adapters' A and B, and adds each token row's adapter update (kernels.lora) to its output.

A fused projection (q/k/v, gate/up) keeps one table with a slice per PEFT module (model.packed_modules), so
one shrink and one expand serve all of its slices. Slot s of the scheduler's LoRA slots (1..max_loras,
engine.core.lora) is row s - 1 of every table; the rank is padded to at least 16, the smallest K of a
tensor-core dot. The rows of a step reach the layers through `LoRATables.indices`, set before each forward
(in a CUDA graph, the static inputs the graph was captured with).
"""

from __future__ import annotations

import numpy as np
import torch
from servebench.engine.lora import LoRAWeights
from servebench.engine.models import LlamaForCausalLM
from servebench.engine.parallel import ROW_PARALLEL, TensorParallel
from servebench.kernels import ops
from torch import nn

ADAPTED = (("self_attn", "qkv_proj"), ("self_attn", "o_proj"), ("mlp", "gate_up_proj"), ("mlp", "down_proj"))
MIN_RANK = 16

# (A [slices x rank, in], B [out, rank]) of one adapter for one LoRALinear, in the table's layout
PackedLoRA = tuple[torch.Tensor, torch.Tensor]


def no_rows(device: torch.device) -> ops.LoRAIndices:
    """A step in which no row has an adapter: the layers add nothing and launch nothing."""
    empty = torch.zeros(0, dtype=torch.int32, device=device)
    return ops.LoRAIndices(empty, empty, 0)


def group_rows(token_slots: np.ndarray, max_loras: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The rows of each slot, as kernels.lora reads them: (rows sorted by slot, the start of each slot's
    rows, rows of the largest adapter group)."""
    counts = np.bincount(token_slots, minlength=max_loras + 1)
    starts = np.zeros(max_loras + 2, dtype=np.int32)
    np.cumsum(counts, out=starts[1:])
    return np.argsort(token_slots, kind="stable").astype(np.int32), starts, int(counts[1:].max(initial=0))


class LoRALinear(nn.Module):
    """A decoder projection (Linear or QuantizedLinear) plus the adapters in the GPU slots: base(x) with each
    row's adapter update added, then the base layer's SwiGLU if it has one. The base layer's fused epilogues
    (split-K partials, SwiGLU and rotary in the streaming kernel) give way to its plain projection."""

    def __init__(self, base: nn.Module, layer: int, sources: list[tuple[str, int, int]], tables: LoRATables,
                 dtype: torch.dtype, device: torch.device, tp: TensorParallel | None = None,
                 row_parallel: bool = False) -> None:
        super().__init__()
        self.base, self.layer, self.tables = base, layer, tables
        self.tp, self.row_parallel = tp, row_parallel
        self.sources = [(name, start, size) for name, start, size in sources]  # (PEFT module, columns)
        self.slice_starts = tuple(start for _, start, _ in sources)
        shape_a = (tables.max_loras, len(sources) * tables.rank, base.in_features)
        self.register_buffer("lora_a", torch.zeros(shape_a, dtype=dtype, device=device), persistent=False)
        shape_b = (tables.max_loras, base.out_features, tables.rank)
        self.register_buffer("lora_b", torch.zeros(shape_b, dtype=dtype, device=device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base.project(x)
        ops.add_lora(y, x, self.lora_a, self.lora_b, self.tables.indices, self.slice_starts)
        return ops.silu_and_mul(y) if self.base.swiglu else y

    def rotary_store_kv(self, x: torch.Tensor, rope: ops.RotaryStoreKV) -> torch.Tensor:
        return rope.store(self(x))

    def pack(self, weights: LoRAWeights, a: torch.Tensor, b: torch.Tensor) -> None:
        """One adapter's A and B for this layer into a slot's layout on the host (`a`, `b`: zeros of the
        slot's shapes), left zero where it has no module."""
        rank = self.tables.rank
        for s, (name, start, size) in enumerate(self.sources):
            pair = weights.get((self.layer, name))
            if pair is not None:
                lora_a, lora_b = self._shard(*pair, size)
                r = lora_a.shape[0]
                a[s * rank:s * rank + r] = lora_a
                b[start:start + size, :r] = lora_b

    def _shard(self, lora_a: torch.Tensor, lora_b: torch.Tensor, size: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of a module's A [rank, in] and B [out, rank]: of a row-parallel layer, A's columns
        of its inputs and all of B (its update is a partial sum, which the layer's all-reduce adds up); of a
        column-parallel one, all of A and B's rows of its outputs."""
        if self.tp is None:
            return lora_a, lora_b
        if self.row_parallel:
            n = self.base.in_features
            return lora_a[:, self.tp.rank * n:(self.tp.rank + 1) * n], lora_b
        return lora_a, lora_b[self.tp.rank * size:(self.tp.rank + 1) * size]


class LoRATables:
    """Wraps the model's decoder projections in LoRALinear layers (in place) and loads adapters into their
    slots; `indices` are the current step's rows of each slot, read by every layer."""

    def __init__(self, model: LlamaForCausalLM, max_loras: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.max_loras, self.rank = max_loras, max(MIN_RANK, max_rank)
        self.idle = no_rows(device)
        self.indices = self.idle
        self.layers: list[LoRALinear] = []
        for i, decoder_layer in enumerate(model.model.layers):
            for parent, name in ADAPTED:
                module = getattr(decoder_layer, parent)
                base = getattr(module, name)
                lora = LoRALinear(base, i, _sources(model, name, base.out_features), self, dtype, device,
                                  model.tp, name in ROW_PARALLEL)
                setattr(module, name, lora)
                self.layers.append(lora)

    @property
    def nbytes(self) -> int:
        return sum(layer.lora_a.nbytes + layer.lora_b.nbytes for layer in self.layers)

    def pack(self, weights: LoRAWeights, pin: bool) -> list[PackedLoRA]:
        """An adapter in the tables' layout, on the host (pinned: its copies to the device do not block), as
        views of one buffer: one pinned allocation an adapter (not one a table, ~250 for Llama-2-7B, each
        pinned anew), which the next adapter reuses once this one leaves the host cache."""
        shapes = [s for layer in self.layers for s in (layer.lora_a.shape[1:], layer.lora_b.shape[1:])]
        sizes = [s.numel() for s in shapes]
        flat = torch.zeros(sum(sizes), dtype=self.layers[0].lora_a.dtype, pin_memory=pin)
        tables = [part.view(s) for part, s in zip(flat.split(sizes), shapes, strict=True)]
        packed = list(zip(tables[::2], tables[1::2], strict=True))
        for layer, (a, b) in zip(self.layers, packed, strict=True):
            layer.pack(weights, a, b)
        return packed

    def write(self, slot: int, packed: list[PackedLoRA]) -> None:
        """Copy a packed adapter into GPU slot `slot` (1..max_loras) of every layer."""
        for layer, (a, b) in zip(self.layers, packed, strict=True):
            layer.lora_a[slot - 1].copy_(a, non_blocking=True)
            layer.lora_b[slot - 1].copy_(b, non_blocking=True)


def _sources(model: LlamaForCausalLM, name: str, out_features: int) -> list[tuple[str, int, int]]:
    """The PEFT modules a projection is made of and their output columns (start, size), in order."""
    fused = sorted(((hf, start, size) for hf, (merged, start, size) in model.packed_modules.items()
                    if merged == name), key=lambda s: s[1])
    return fused or [(name, 0, out_features)]
