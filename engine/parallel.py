"""Tensor parallelism: which shard of the model a process holds, and the collectives between the shards.

Megatron-style, as vLLM: q/k/v and gate/up are split by heads and columns (each rank computes the attention of
its heads and its columns of the MLP alone), o_proj and down_proj by rows (each rank's partial sum, then one
all-reduce each), the embedding and the LM head by rows of the vocabulary (an all-reduce of the masked lookup,
an all-gather of the logits). The KV cache holds each rank's KV heads. The collectives run on
torch.distributed's default group: NCCL on GPUs (one per rank), gloo on the CPU.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist
from servebench.engine.config import ModelConfig

# A collective waits this long for the other ranks: a rank that died fails the step instead of hanging it.
COLLECTIVE_TIMEOUT = timedelta(minutes=5)
# Which layers (HF module names, also ours) split their outputs, their inputs or the vocabulary's rows; the
# others (norms) every rank holds whole.
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")
VOCAB_PARALLEL = ("embed_tokens", "lm_head")
# What each rank splits, under config.json's names (the shard's config divides each by the size).
SPLIT = {"num_attention_heads": "num_heads", "num_key_value_heads": "num_kv_heads",
         "intermediate_size": "intermediate_size"}


@dataclass(slots=True, frozen=True)
class TensorParallel:
    rank: int
    size: int

    def shard_config(self, cfg: ModelConfig) -> ModelConfig:
        """The model config of one shard: its attention heads, KV heads and MLP columns."""
        for name, field in SPLIT.items():
            n = getattr(cfg, field)
            if n % self.size:
                raise ValueError(f"tensor_parallel_size={self.size} does not divide the model's {name}={n} "
                                 f"({cfg.path / 'config.json'})")
        return replace(cfg, **{field: getattr(cfg, field) // self.size for field in SPLIT.values()})

    def vocab_rows(self, vocab_size: int) -> int:
        """Rows of the embedding and LM head each rank holds (the last rank's padded past the vocabulary)."""
        return -(-vocab_size // self.size)

    def device(self, device: torch.device) -> torch.device:
        return torch.device("cuda", self.rank) if device.type == "cuda" else device

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x)
        return x

    def all_gather_columns(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x side by side along the last dimension, in rank order."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's x, on every rank."""
        dist.broadcast(x, src=0)
        return x

    def min(self, n: int, device: torch.device) -> int:
        """The smallest of every rank's n (the KV blocks all ranks can hold)."""
        t = torch.tensor([n], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())


def init_distributed(rank: int, size: int, port: int, device: torch.device) -> None:
    """Join the default process group of `size` ranks at 127.0.0.1:`port` (one host)."""
    if device.type == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=size, timeout=COLLECTIVE_TIMEOUT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
