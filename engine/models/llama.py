"""The Llama family: Llama 2/3, CodeLlama, Mistral, Qwen2/2.5 (q/k/v bias) and Qwen3 (per-head q/k norm).

Parameter names follow HF's, except that q/k/v and gate/up are merged (`qkv_proj`, `gate_up_proj`);
`packed_modules` tells the loader where each HF shard goes. With a QuantizationConfig the decoder layers'
projections are engine.quantization's QuantizedLinear, under the checkpoint's parameter names. With tensor
parallelism (engine.parallel) a model is one rank's shard: built from the shard's config (its heads and MLP
columns), its o_proj and down_proj outputs all-reduced, its embedding and LM head a slice of the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from servebench.engine.config import ModelConfig
from servebench.engine.parallel import TensorParallel
from servebench.engine.quantization import QuantizationConfig, QuantizedLinear
from servebench.kernels import ops
from torch import nn


@dataclass(slots=True)
class AttentionMetadata:
    """Where this step's tokens sit in the paged KV cache (see ops.paged_attention)."""

    slot_mapping: torch.Tensor  # [tokens] cache slot of each new token
    block_tables: torch.Tensor  # [seqs, max blocks]
    seq_lens: torch.Tensor  # [seqs] context length including the new tokens
    query_start_loc: torch.Tensor  # [seqs + 1] offsets of each sequence's new tokens
    max_query_len: int
    max_seq_len: int


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor | ops.SplitK, residual: torch.Tensor | None = None):
        return ops.rms_norm(x, self.weight, self.eps, residual)


class Linear(nn.Linear):
    """nn.Linear whose decode-sized calls stream the weights through ops.linear.

    split_k: the output may be ops.SplitK partial sums, for layers that only an RMSNorm reads (o_proj,
    down_proj). swiglu: the weight is [gate; up] and the output is their SwiGLU (gate_up_proj)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 split_k: bool = False, swiglu: bool = False) -> None:
        super().__init__(in_features, out_features, bias)
        self.split_k, self.swiglu = split_k, swiglu

    def forward(self, x: torch.Tensor) -> torch.Tensor | ops.SplitK:
        return ops.linear(x, self.weight, self.bias, split_k=self.split_k, swiglu=self.swiglu)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T + b, without the fused epilogues (split-K, SwiGLU): what a LoRA update is added to."""
        return ops.linear(x, self.weight, self.bias)

    def rotary_store_kv(self, x: torch.Tensor, rope: ops.RotaryStoreKV) -> torch.Tensor:
        """This q/k/v projection of x, then rope's rotary embedding and KV write (one kernel in decode)."""
        return ops.linear_rotary_store_kv(x, self.weight, self.bias, rope)


def make_linear(in_features: int, out_features: int, bias: bool, quant: QuantizationConfig | None, *,
                split_k: bool = False, swiglu: bool = False) -> Linear | QuantizedLinear:
    if quant is None:
        return Linear(in_features, out_features, bias, split_k=split_k, swiglu=swiglu)
    return QuantizedLinear(in_features, out_features, bias, quant, swiglu=swiglu)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, quant: QuantizationConfig | None, tp: TensorParallel | None) -> None:
        super().__init__()
        self.tp = tp
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.qkv_proj = make_linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, cfg.qkv_bias, quant)
        # Split-K partial sums only where the next RMSNorm reduces them (a shard's output is all-reduced).
        self.o_proj = make_linear(self.q_size, cfg.hidden_size, False, quant, split_k=tp is None)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        # Views into the model runner's cache tensor, set once it is allocated.
        self.k_cache = self.v_cache = torch.empty(0)
        # An fp8 cache's per-tensor scales: vLLM's default (no calibration), K and V stored as they are and
        # saturated at e4m3's 448, far outside Llama-family keys and values.
        self.k_scale = self.v_scale = 1.0

    def forward(self, positions: torch.Tensor, x: torch.Tensor, cos_sin: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor | ops.SplitK:
        n = x.shape[0]
        if self.qk_norm:  # Qwen3 normalizes each q and k head before the rotary embedding
            q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(n, self.num_heads, self.head_dim)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(n, self.num_kv_heads, self.head_dim)
            q, k = ops.rotary_store_kv(positions, q, k, v.reshape(n, self.num_kv_heads, self.head_dim),
                                       cos_sin, self.k_cache, self.v_cache, meta.slot_mapping,
                                       k_scale=self.k_scale, v_scale=self.v_scale)
        else:
            rope = ops.RotaryStoreKV(positions, cos_sin, self.k_cache, self.v_cache, meta.slot_mapping,
                                     self.num_heads, self.num_kv_heads, self.head_dim, self.k_scale,
                                     self.v_scale)
            qkv = self.qkv_proj.rotary_store_kv(x, rope)
            q = qkv[:, :self.q_size].view(n, self.num_heads, self.head_dim)
        o = ops.paged_attention(q, self.k_cache, self.v_cache, meta.block_tables, meta.seq_lens,
                                meta.query_start_loc, self.scale, meta.max_query_len, meta.max_seq_len,
                                k_scale=self.k_scale, v_scale=self.v_scale)
        out = self.o_proj(o.reshape(n, self.q_size))
        return out if self.tp is None else self.tp.all_reduce(out)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, quant: QuantizationConfig | None, tp: TensorParallel | None) -> None:
        super().__init__()
        self.tp = tp
        self.gate_up_proj = make_linear(cfg.hidden_size, 2 * cfg.intermediate_size, False, quant, swiglu=True)
        self.down_proj = make_linear(cfg.intermediate_size, cfg.hidden_size, False, quant, split_k=tp is None)

    def forward(self, x: torch.Tensor) -> torch.Tensor | ops.SplitK:
        out = self.down_proj(self.gate_up_proj(x))
        return out if self.tp is None else self.tp.all_reduce(out)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, quant: QuantizationConfig | None, tp: TensorParallel | None) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, quant, tp)
        self.mlp = MLP(cfg, quant, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions: torch.Tensor, h: torch.Tensor | ops.SplitK,
                residual: torch.Tensor | None, cos_sin: torch.Tensor,
                meta: AttentionMetadata) -> tuple[torch.Tensor | ops.SplitK, torch.Tensor]:
        # The residual add is fused into the next norm, as in vLLM; so is the reduction of the split-K
        # o_proj / down_proj output, which no other op reads.
        if residual is None:
            h, residual = self.input_layernorm(h), h
        else:
            h, residual = self.input_layernorm(h, residual)
        h = self.self_attn(positions, h, cos_sin, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class VocabParallelEmbedding(nn.Module):
    """One rank's rows of the embedding, [rank x rows, (rank + 1) x rows): ids elsewhere read zeros here, and
    the all-reduce sums each id's one row from the rank that holds it."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel) -> None:
        super().__init__()
        self.tp, self.rows = tp, tp.vocab_rows(vocab_size)
        self.start = tp.rank * self.rows
        self.weight = nn.Parameter(torch.zeros(self.rows, hidden_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.rows)
        h = nn.functional.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(h.masked_fill(outside.unsqueeze(-1), 0))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, quant: QuantizationConfig | None = None,
                 tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.embed_tokens = (nn.Embedding(cfg.vocab_size, cfg.hidden_size) if tp is None
                             else VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp))
        self.layers = nn.ModuleList(DecoderLayer(cfg, quant, tp) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        h, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            h, residual = layer(positions, h, residual, cos_sin, meta)
        return self.norm(h, residual)[0]


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_position: int, quant: QuantizationConfig | None = None,
                 tp: TensorParallel | None = None) -> None:
        """`cfg`: the whole model's config, or with `tp` its shard's (TensorParallel.shard_config)."""
        super().__init__()
        self.config, self.tp = cfg, tp
        self.model = LlamaModel(cfg, quant, tp)
        vocab_rows = cfg.vocab_size if tp is None else tp.vocab_rows(cfg.vocab_size)
        self.lm_head = Linear(cfg.hidden_size, vocab_rows, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos_sin = ops.build_cos_sin_cache(cfg.head_dim, max_position, cfg.rope_theta, cfg.rope_scaling,
                                              torch.get_default_dtype())
        self.register_buffer("cos_sin_cache", cos_sin, persistent=False)
        q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
        self.packed_modules = {"q_proj": ("qkv_proj", 0, q), "k_proj": ("qkv_proj", q, kv),
                               "v_proj": ("qkv_proj", q + kv, kv), "gate_proj": ("gate_up_proj", 0, inter),
                               "up_proj": ("gate_up_proj", inter, inter)}

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, self.cos_sin_cache, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.tp is not None:  # every rank's slice of the vocabulary, less the last one's padding
            logits = self.tp.all_gather_columns(logits)[:, :self.config.vocab_size]
        return logits.float()
