"""Step-time models: how long one scheduler step takes on the simulated hardware.

Both models answer `predict(out: SchedulerOutput) -> float` (seconds) and compose a step the same way:

    swap copies + CPU overhead
    + num_layers x (linear ops + attention + 2 tensor-parallel all-reduces)
    + LM head on one token per scheduled request + (pipeline stages - 1) activation sends

`RooflineStepTime` prices every term from FLOPs and bytes of the `ModelSpec` on the `HardwareSpec`
(works for any model and device). `VidurProfileStepTime` replaces the linear ops, all-reduces, sends,
and, where `attention.csv` exists, attention and CPU overhead with Vidur's measured operator times;
the LM head and swap copies stay roofline (Vidur does not model them). Pipeline stages run one after
another: one batch is in flight at a time, so pipelining adds capacity, not throughput.
`predict` runs once per simulated step, so it touches only plain Python floats and lists, in time
proportional to the number of prefill chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from servebench.engine.core.scheduler_output import SchedulerOutput
from servebench.sim.curve import Curve, upper_half_slope
from servebench.sim.specs import HardwareSpec, ModelSpec, ParallelSpec, block_bytes

DEFAULT_PROFILE_ROOT = Path(__file__).resolve().parents[1] / "data" / "vidur_profiles"
NCCL_LAUNCH_S = 20e-6  # Vidur's nccl_cpu_launch_overhead_ms, added to each profiled all-reduce


class RooflineStepTime:
    """Analytic step time: each op takes max(FLOPs / achievable FLOP/s, bytes / achievable bandwidth).

    Per layer and GPU (work split over tensor_parallel_size): the matmuls read their weights once per
    step and do 2 x params FLOPs per token; norms, RoPE and activations stream the hidden state; prefill
    attention does 4 x heads x head_dim FLOPs per (query, key) pair of each causal chunk and reads the
    chunk's context from the KV cache; decode attention reads every context token's K and V. An all-reduce
    is a ring: latency + 2 (tp - 1) / tp x bytes / interconnect bandwidth.
    """

    def __init__(self, model: ModelSpec, hw: HardwareSpec, parallel: ParallelSpec, block_size: int) -> None:
        parallel.check(model)
        tp, dt = parallel.tensor_parallel_size, model.dtype_bytes
        self.model, self.hw, self.parallel = model, hw, parallel
        self.sources = {"all": "roofline"}
        self._tp, self._pp_hops, self._layers = tp, parallel.pipeline_parallel_size - 1, model.num_layers
        self._flops, self._attn_flops, self._bw = hw.matmul_flops, hw.attention_flops, hw.mem_bandwidth
        self._linear_flops_per_token = 2 * model.linear_params_per_layer / tp
        self._linear_bytes = model.linear_params_per_layer * dt / tp
        # fused add+RMSNorm twice on the full hidden state, RoPE on q/k, SiLU-and-mul on the MLP shard
        elementwise = (
            8 * model.hidden_size + (2 * (model.q_size + model.kv_size) + 3 * model.intermediate_size) / tp
        )
        self._elementwise_bytes_per_token = elementwise * dt
        self._attn_flops_per_pair = 4 * model.q_size / tp
        self._kv_bytes_per_token = 2 * parallel.kv_heads_per_gpu(model) * model.head_dim * dt
        self._head_flops_per_seq = 2 * model.embedding_params / tp
        self._head_bytes = model.embedding_params * dt / tp
        self._hidden_bytes = model.hidden_size * dt
        link = hw.interconnect_gbs * 1e9
        self._ring_s_per_byte = 2 * (tp - 1) / tp / link
        self._p2p_s_per_byte = 1 / link
        self._latency = hw.interconnect_latency_s
        self._swap_s_per_block = block_bytes(model, parallel, block_size) / (hw.pcie_gbs * 1e9)

    def predict(self, out: SchedulerOutput) -> float:
        tokens = out.num_prefill_tokens + out.num_decode_tokens
        # logits for every scheduled request's last token, as vLLM computes them (partial prefills too)
        seqs = out.num_decode_tokens + len(out.prefill_chunks)
        t = (len(out.swap_in) + len(out.swap_out)) * self._swap_s_per_block + self.cpu_time(seqs)
        if tokens == 0:
            return t
        layer = self.linear_time(tokens) + self.attention_time(out)
        if self._tp > 1:
            layer += 2 * self.all_reduce_time(tokens)
        t += self._layers * layer + self.head_time(seqs)
        if self._pp_hops:
            t += self._pp_hops * self.send_recv_time(tokens)
        return t

    def linear_time(self, tokens: int) -> float:
        """One layer's matmuls and elementwise ops over `tokens` tokens."""
        gemm = max(tokens * self._linear_flops_per_token / self._flops, self._linear_bytes / self._bw)
        return gemm + tokens * self._elementwise_bytes_per_token / self._bw

    def attention_time(self, out: SchedulerOutput) -> float:
        """One layer's attention: prefill chunks and decodes priced separately, each as a roofline."""
        pairs = kv_tokens = 0.0
        for n, c in out.prefill_chunks:
            pairs += n * (c + 0.5 * n)
            kv_tokens += c + 2 * n  # read the context and the chunk, write the chunk
        t = 0.0
        if pairs:
            t = max(
                pairs * self._attn_flops_per_pair / self._attn_flops,
                kv_tokens * self._kv_bytes_per_token / self._bw,
            )
        ctx = out.decode_context_tokens
        if ctx:
            kv_bytes = (ctx + out.num_decode_tokens) * self._kv_bytes_per_token
            t += max(ctx * self._attn_flops_per_pair / self._attn_flops, kv_bytes / self._bw)
        return t

    def all_reduce_time(self, tokens: int) -> float:
        return self._latency + tokens * self._hidden_bytes * self._ring_s_per_byte

    def send_recv_time(self, tokens: int) -> float:
        return self._latency + tokens * self._hidden_bytes * self._p2p_s_per_byte

    def head_time(self, seqs: int) -> float:
        return max(seqs * self._head_flops_per_seq / self._flops, self._head_bytes / self._bw)

    def cpu_time(self, seqs: int) -> float:
        return self.hw.cpu_overhead_s + seqs * self.hw.per_request_overhead_s


class _DecodeTable:
    """Decode attention time by (batch size, mean context) on the profile's rectangular grid: exact per
    batch size, linear in context (extrapolated like `Curve`), proportional to batch size beyond the
    grid (the largest profiled batches already fill the GPU)."""

    __slots__ = ("_rows", "_slopes", "_b_max", "_step", "_x_max")

    def __init__(self, batch: np.ndarray, context: np.ndarray, seconds: np.ndarray) -> None:
        grid = pd.DataFrame({"b": batch, "c": context, "t": seconds}).pivot_table(
            values="t", index="b", columns="c", aggfunc="median"
        )
        grid = grid.interpolate(axis=0, limit_direction="both").interpolate(axis=1, limit_direction="both")
        bs, cs, t = grid.index.to_numpy(float), grid.columns.to_numpy(float), grid.to_numpy()
        self._b_max = int(bs[-1])
        self._step = int(np.gcd.reduce(grid.columns.to_numpy(int)))
        self._x_max = int(cs[-1]) // self._step
        dense_b = np.arange(1, self._b_max + 1)
        by_b = np.stack([np.interp(dense_b, bs, t[:, j]) for j in range(len(cs))], axis=1)
        dense_c = np.arange(self._x_max + 1) * self._step
        self._rows = [[]] + [np.interp(dense_c, cs, row).tolist() for row in by_b]
        self._slopes = [0.0] + [upper_half_slope(row) for row in self._rows[1:]]

    def __call__(self, batch: int, context_tokens: int) -> float:
        x = context_tokens / (batch * self._step)
        scale = 1.0
        if batch > self._b_max:
            scale, batch = batch / self._b_max, self._b_max
        row = self._rows[batch]
        if x >= self._x_max:
            return (row[-1] + self._slopes[batch] * (x - self._x_max)) * scale
        i = int(x)
        return (row[i] + (x - i) * (row[i + 1] - row[i])) * scale


_MLP_OPS = (
    "attn_pre_proj",
    "attn_post_proj",
    "attn_rope",
    "mlp_up_proj",
    "mlp_down_proj",
    "mlp_act",
    "input_layernorm",
    "post_attention_layernorm",
    "add",
)
_CPU_COLUMNS = (  # the terms Vidur sums into its CPU overhead
    "schedule_median",
    "sampler_e2e_median",
    "prepare_inputs_e2e_median",
    "process_model_outputs_median",
    "ray_comm_time_mean",
)


def _read(path: Path, columns: Sequence[str]) -> pd.DataFrame:
    """Read only `columns` (those absent from the file are skipped: Vidur treats missing ops as 0 ms)."""
    wanted = set(columns)
    return pd.read_csv(path, usecols=lambda c: c in wanted)


def _rows(df: pd.DataFrame, match: dict[str, object]) -> pd.DataFrame:
    mask = np.ones(len(df), bool)
    for column, value in match.items():
        mask &= df[column].to_numpy() == value
    return df[mask]


def _available(root: Path) -> str:
    found = []
    for path in sorted(root.glob("compute/*/*/*/mlp.csv")):
        tps = sorted(_read(path, ["num_tensor_parallel_workers"])["num_tensor_parallel_workers"].unique())
        found.append(f"{path.parent.relative_to(root / 'compute')} (tp={','.join(map(str, tps))})")
    return "; ".join(found) or f"none under {root}"


class VidurProfileStepTime(RooflineStepTime):
    """Step time from Vidur's operator profiles (`profile_root`, layout of microsoft/vidur data/profiling).

    Which source prices what (recorded in `self.sources`):
    - linear ops, norms, RoPE, activation, residual add: `compute/<vidur_device>/<vidur_name>/mlp.csv`,
      rows of the model's shape and tensor_parallel_size, summed per layer, interpolated in the token count;
    - attention: `attention.csv` where one exists for this shape and tp (today only CodeLlama-34B, tp=2,
      A100): decode from the (batch size, mean context) grid, prefill from a least-squares fit of
      t = a + b n + c n ctx + d n^2 per chunk (n new tokens after ctx cached ones; 5.7 % mean error on
      that profile); elsewhere the roofline attention;
    - CPU overhead: `cpu_overheads.csv` by batch size where present (vLLM V0 with Ray, as Vidur measured
      it; `cpu_overheads=False` keeps the hardware's cpu_overhead_s), else the hardware's overheads;
    - all-reduce and pipeline send: `network/<hardware.network>/{all_reduce,send_recv}.csv` by message size;
    - LM head and swap copies: roofline.
    A directory `<vidur_name>-tp<N>-*` (newest name first) is preferred to `<vidur_name>` at tp=N.
    Vidur's 10 % batching overheads for GQA attention are not applied.
    """

    def __init__(
        self,
        model: ModelSpec,
        hw: HardwareSpec,
        parallel: ParallelSpec,
        block_size: int,
        profile_root: Path | str = DEFAULT_PROFILE_ROOT,
        cpu_overheads: bool = True,
    ) -> None:
        super().__init__(model, hw, parallel, block_size)
        root = Path(profile_root)
        dirs = self._compute_dirs(root)
        self.sources = {"lm_head": "roofline", "swap": "roofline"}
        self._linear = self._load_linear(root, dirs)
        self._decode, self._prefill = self._load_attention(root, dirs)
        self._cpu = self._load_cpu(root, dirs) if cpu_overheads else None
        if self._cpu is None:
            self.sources["cpu"] = "hardware"
        if self._tp > 1:
            self._all_reduce = self._load_network(
                root, "all_reduce", {"num_workers": self._tp, "devices_per_node": self._tp}
            )
        if self._pp_hops:
            self._send_recv = self._load_network(root, "send_recv", {"devices_per_node": 2})

    def linear_time(self, tokens: int) -> float:
        return self._linear(tokens)

    def attention_time(self, out: SchedulerOutput) -> float:
        if self._decode is None:
            return super().attention_time(out)
        t = 0.0
        if out.prefill_chunks:
            sn = snc = snn = 0
            for n, c in out.prefill_chunks:
                sn += n
                snc += n * c
                snn += n * n
            a, b, c, d = self._prefill
            t = a + b * sn + c * snc + d * snn
        if out.num_decode_tokens:
            t += self._decode(out.num_decode_tokens, out.decode_context_tokens)
        return t

    def all_reduce_time(self, tokens: int) -> float:
        return self._all_reduce(tokens) + NCCL_LAUNCH_S

    def send_recv_time(self, tokens: int) -> float:
        return self._send_recv(tokens)

    def cpu_time(self, seqs: int) -> float:
        return super().cpu_time(seqs) if self._cpu is None else self._cpu(seqs)

    def _compute_dirs(self, root: Path) -> list[Path]:
        model, hw, tp = self.model, self.hw, self._tp
        if hw.vidur_device is None:
            raise ValueError(
                f"hardware {hw.name} has no vidur_device: no Vidur profiles exist for it; "
                "use the roofline step-time model"
            )
        if model.vidur_name is None:
            raise ValueError(
                f"model {model.name} has no vidur_name: no Vidur profile for it; "
                f"use the roofline step-time model (available: {_available(root)})"
            )
        base = root / "compute" / hw.vidur_device / model.vidur_name
        dirs = [
            d for d in [*sorted(base.parent.glob(f"{base.name}-tp{tp}-*"), reverse=True), base] if d.is_dir()
        ]
        if not any((d / "mlp.csv").is_file() for d in dirs):
            raise FileNotFoundError(
                f"no Vidur profile for model {model.name} on {hw.vidur_device} at tp={tp}: "
                f"{base}/mlp.csv not found (available: {_available(root)})"
            )
        return dirs

    def _load_linear(self, root: Path, dirs: list[Path]) -> Curve:
        m, tp = self.model, self._tp
        path = next(d / "mlp.csv" for d in dirs if (d / "mlp.csv").is_file())
        ops = [f"time_stats.{op}.median" for op in _MLP_OPS]
        shape = {
            "n_head": m.num_attention_heads,
            "n_kv_head": m.num_key_value_heads,
            "n_embd": m.hidden_size,
            "n_expanded_embd": m.intermediate_size,
            "num_tensor_parallel_workers": tp,
        }
        rows = _rows(_read(path, [*ops, *shape, "num_tokens"]), shape)
        if rows.empty:
            raise ValueError(
                f"no Vidur profile for model {m.name} on {self.hw.vidur_device} at tp={tp}: "
                f"{path} has no rows of this shape and tp (available: {_available(root)})"
            )
        per_layer = rows.reindex(columns=ops).fillna(0).sum(axis=1) * 1e-3
        by_tokens = per_layer.groupby(rows["num_tokens"]).median()
        self.sources["linear"] = str(path.relative_to(root))
        return Curve(by_tokens.index.to_numpy(), by_tokens.to_numpy())

    def _load_attention(self, root: Path, dirs: list[Path]) -> tuple[_DecodeTable | None, tuple[float, ...]]:
        m = self.model
        shape = {
            "n_q_head": m.num_attention_heads,
            "n_kv_head": m.num_key_value_heads,
            "n_embd": m.hidden_size,
            "num_tensor_parallel_workers": self._tp,
        }
        columns = [
            *shape,
            "batch_size",
            "prefill_chunk_size",
            "kv_cache_size",
            "is_prefill",
            "time_stats.attn_prefill.median",
            "time_stats.attn_decode.median",
        ]
        for path in (d / "attention.csv" for d in dirs if (d / "attention.csv").is_file()):
            rows = _rows(_read(path, columns), shape)
            decode, prefill = rows[~rows["is_prefill"]], rows[rows["is_prefill"]]
            if len(decode) and len(prefill) >= 4:
                self.sources["attention"] = str(path.relative_to(root))
                table = _DecodeTable(
                    decode["batch_size"].to_numpy(),
                    decode["kv_cache_size"].to_numpy(),
                    decode["time_stats.attn_decode.median"].to_numpy() * 1e-3,
                )
                return table, _fit_prefill(prefill)
        self.sources["attention"] = "roofline"
        return None, ()

    def _load_cpu(self, root: Path, dirs: list[Path]) -> Curve | None:
        for path in (d / "cpu_overheads.csv" for d in dirs if (d / "cpu_overheads.csv").is_file()):
            rows = _rows(
                _read(path, [*_CPU_COLUMNS, "batch_size", "tensor_parallel_degree"]),
                {"tensor_parallel_degree": self._tp},
            )
            if len(rows):
                self.sources["cpu"] = str(path.relative_to(root))
                total = rows.reindex(columns=_CPU_COLUMNS).fillna(0).sum(axis=1) * 1e-3
                by_batch = total.groupby(rows["batch_size"]).median()
                return Curve(by_batch.index.to_numpy(), by_batch.to_numpy())
        return None

    def _load_network(self, root: Path, collective: str, match: dict[str, int]) -> Callable[[int], float]:
        hw = self.hw
        if hw.network is None:
            raise ValueError(
                f"hardware {hw.name} has network: null, but the vidur step-time model needs "
                f"network/<name>/{collective}.csv for tensor_parallel_size={self._tp}, "
                f"pipeline_parallel_size={self._pp_hops + 1}"
            )
        path = root / "network" / hw.network / f"{collective}.csv"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (hardware.network={hw.network})")
        median = f"time_stats.{collective}.median"
        table = _read(path, [median, "size", *match])
        rows = _rows(table, match)
        if rows.empty:
            have = sorted(table[list(match)].drop_duplicates().itertuples(index=False, name=None))
            raise ValueError(f"{path} has no rows for {match} (available {tuple(match)}: {have})")
        by_size = rows[median].groupby(rows["size"]).median() * 1e-3
        self.sources[collective] = str(path.relative_to(root))
        return Curve(by_size.index.to_numpy() / self._hidden_bytes, by_size.to_numpy())


def _fit_prefill(rows: pd.DataFrame) -> tuple[float, ...]:
    """Least squares on relative error of t = a + b n + c n ctx + d n^2 (n: chunk, ctx: cached tokens);
    negative coefficients are clipped so that extrapolation never shrinks with more work."""
    n = rows["prefill_chunk_size"].to_numpy(float)
    ctx = rows["kv_cache_size"].to_numpy(float)
    t = rows["time_stats.attn_prefill.median"].to_numpy(float) * 1e-3
    x = np.stack([np.ones_like(n), n, n * ctx, n * n], axis=1)
    coef = np.linalg.lstsq(x / t[:, None], np.ones_like(t), rcond=None)[0]
    return tuple(float(c) for c in np.maximum(coef, 0.0))
