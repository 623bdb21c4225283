"""Step time from the engine's own whole-step profiles (engine.profile, in data/profiles/<hw>/<model>).

A step of prefill chunks (n_i new tokens after c_i cached ones) and b decodes of total context C costs

    decode only:   D(b, c_eff) x loop(b)                         measured grid, bilinear in (b, context)
    with prefill:  L(T) + sum_i A(n_i, c_i) + m0 b + m1 C          T = all tokens of the step
    + cpu(requests) + swapped blocks x measured copy time

L is the token-linear part (matmuls, norms, LM head: `linear` points, interpolated in T); A(n, c) = a0 +
a1 n (c + n/2) + a2 (c + n) is prefill attention, least squares on `prefill` points minus L; m0, m1 price the
decode rows of a mixed (eager) step, least squares on `mixed` points minus L and A; cpu is the host's
overhead per step in the engine loop (schedule, update, detokenize), by the number of scheduled requests.

Decode steps run in CUDA graphs whose attention kernel gives each (sequence, kv head, split) one program; the
profile's contexts are uniform, a served batch's are not. While the programs fit on the GPU at once (`slots`
of them) the step waits for the longest context; with many waves only the total counts. So the grid is read
at c_eff = max(C / b, c_max x min(1, slots / programs)), programs counted on the padded graph batch with the
kernel's split rule; `slots` is fitted on the profile's `decode_skew` points (one long context, the rest
short), else a card default. loop(b) = execute time of decode steps in the real engine loop (cpu.csv) over
the isolated grid's: what serving adds to the same forward.
Steps outside the profiled ranges (more tokens, longer contexts, bigger batches) fall back to the roofline
model and are counted in `num_outside` (summary.json: num_steps_outside_profile).
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from servebench.engine.core.scheduler_output import SchedulerOutput
from servebench.sim.csv_file import read_csv
from servebench.sim.curve import Curve
from servebench.sim.specs import HardwareSpec, ModelSpec, ParallelSpec
from servebench.sim.step_time import RooflineStepTime

DEFAULT_PROFILE_ROOT = Path(__file__).resolve().parents[1] / "data" / "profiles"
# kernels.attention's flash-decoding rule (the simulator imports no Triton): split a context until about
# SPLIT_PROGRAMS programs run, keeping at least MIN_SPLIT_KEYS keys per split
SPLIT_PROGRAMS, MIN_SPLIT_KEYS = 512, 256
# decode-attention programs resident at once on an H100 (132 SMs x 4) until a profile's decode_skew points
# measure it
DEFAULT_DECODE_SLOTS = 528
SHAPE_KEYS = {  # ModelSpec field -> HF config.json key the profile's meta.json records
    "num_layers": "num_hidden_layers",
    "hidden_size": "hidden_size",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads",
    "intermediate_size": "intermediate_size",
    "vocab_size": "vocab_size",
}


def profile_dir(model: ModelSpec, hw: HardwareSpec, parallel: ParallelSpec,
                root: Path | str = DEFAULT_PROFILE_ROOT) -> Path:
    """`root`/<hardware>/<model>: the engine's profile and calibration of one GPU; <model>_tp<N> of a
    tensor-parallel engine's N GPUs (its steps measured whole, all-reduces included)."""
    if parallel.pipeline_parallel_size > 1:
        raise ValueError(f"parallel.pipeline_parallel_size={parallel.pipeline_parallel_size}: the engine "
                         "runs no pipeline stages, so it has no profile of them (vidur, roofline price them)")
    tp = parallel.tensor_parallel_size
    return Path(root) / hw.name / (model.name if tp == 1 else f"{model.name}_tp{tp}")


class _DecodeGrid:
    """D(b, mean context) from rows of profiled batch sizes, each linear in mean context up to its own longest
    context (big batches fit only short contexts in the KV cache); linear in b between rows."""

    __slots__ = ("_batches", "_ctx", "_t")

    def __init__(self, rows: pd.DataFrame) -> None:
        self._batches: list[int] = []
        self._ctx: list[list[float]] = []
        self._t: list[list[float]] = []
        for b, row in rows.groupby("batch"):
            row = row.sort_values("context")
            self._batches.append(int(b))
            self._ctx.append(row["context"].astype(float).tolist())
            self._t.append(row["median_s"].tolist())

    def __call__(self, batch: int, context_tokens: int) -> float | None:
        """Seconds, or None outside the grid."""
        batches = self._batches
        j = bisect.bisect_left(batches, batch)
        if j == len(batches):
            return None
        x = context_tokens / batch
        if batches[j] == batch or j == 0:
            return self._row(j, x)
        lo, hi = self._row(j - 1, x), self._row(j, x)
        if lo is None or hi is None:
            return None
        w = (batch - batches[j - 1]) / (batches[j] - batches[j - 1])
        return lo + w * (hi - lo)

    def _row(self, j: int, x: float) -> float | None:
        ctx, t = self._ctx[j], self._t[j]
        if x > ctx[-1]:
            return None
        if x <= ctx[0] or len(ctx) == 1:
            return t[0]
        i = bisect.bisect_left(ctx, x)
        return t[i - 1] + (x - ctx[i - 1]) * (t[i] - t[i - 1]) / (ctx[i] - ctx[i - 1])


def _lstsq_relative(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Coefficients minimising the relative error of x @ coef against t, clipped at 0 (no negative costs)."""
    scale = np.maximum(np.abs(t), 1e-6)
    coef = np.linalg.lstsq(x / scale[:, None], t / scale, rcond=None)[0]
    return np.maximum(coef, 0.0)


class ProfileStepTime(RooflineStepTime):
    """The profile tables of one model on one card, or on the tensor-parallel cards that profile_dir names;
    roofline outside them."""

    def __init__(self, model: ModelSpec, hw: HardwareSpec, parallel: ParallelSpec, block_size: int,
                 profile_root: Path | str = DEFAULT_PROFILE_ROOT) -> None:
        super().__init__(model, hw, parallel, block_size)
        folder = profile_dir(model, hw, parallel, profile_root)
        self.meta = self._read_meta(folder, model)
        profiled_tp = self.meta.get("engine", {}).get("tensor_parallel_size", 1)
        if profiled_tp != parallel.tensor_parallel_size:
            raise ValueError(f"{folder / 'meta.json'}: profiled at tensor_parallel_size={profiled_tp}, not "
                             f"{parallel.tensor_parallel_size}")
        remedy = "rerun python -m servebench.engine.profile for this model"
        steps = read_csv(folder / "steps.csv", ("kind", "tokens", "chunk", "chunk_context", "batch",
                                                "context", "median_s"), remedy)
        cpu = read_csv(folder / "cpu.csv", ("batch", "overhead_s"), remedy)
        self.folder = folder
        self.sources = {"all": str(folder), "outside": "roofline"}
        self.num_outside = 0
        self._fit(steps, cpu)
        self.fit_error = self._fit_error(steps)

    @staticmethod
    def _read_meta(folder: Path, model: ModelSpec) -> dict:
        path = folder / "meta.json"
        if not path.is_file():
            have = sorted(p.parent.name for p in folder.parent.glob("*/meta.json"))
            raise ValueError(f"no profile for model {model.name}: {path} not found "
                             f"(profiled under {folder.parent}: {', '.join(have) or 'none'})")
        meta = json.loads(path.read_text())
        hf = meta.get("hf_config", {})
        for field, key in SHAPE_KEYS.items():
            if hf.get(key) != getattr(model, field):
                raise ValueError(f"{path}: hf_config.{key}={hf.get(key)} but model.{field}="
                                 f"{getattr(model, field)}: the profile is of another model shape")
        return meta

    def _fit(self, steps: pd.DataFrame, cpu: pd.DataFrame) -> None:
        by_kind = {k: g for k, g in steps.groupby("kind")}
        linear = by_kind.get("linear")
        if linear is None or by_kind.get("decode") is None:
            raise ValueError(f"{self.folder / 'steps.csv'}: needs 'linear' and 'decode' rows")
        self._linear = Curve(linear["tokens"].to_numpy(), linear["median_s"].to_numpy())
        self._max_tokens = int(linear["tokens"].max())
        self._decode = _DecodeGrid(by_kind["decode"])
        self._max_batch = int(by_kind["decode"]["batch"].max())
        self._max_len = int(self.meta.get("engine", {}).get("max_model_len", self.model.max_model_len))
        self.decode_slots = self._fit_slots(by_kind.get("decode_skew"))
        self._wave = [min(1.0, self.decode_slots / self._programs(b)) for b in range(self._max_batch + 1)]
        self._loop = self._fit_loop(cpu)
        self._attn = self._fit_attention(by_kind.get("prefill"))
        self._mixed = self._fit_mixed(by_kind.get("mixed"))
        self._cpu = Curve(cpu["batch"].to_numpy(), cpu["overhead_s"].to_numpy())
        self._swap_out = self._fit_swap(by_kind.get("swap_out"), self._swap_s_per_block)
        self._swap_in = self._fit_swap(by_kind.get("swap_in"), self._swap_s_per_block)

    def _programs(self, batch: int) -> int:
        """Decode-attention programs of a batch: padded to its CUDA graph (powers of two), split as the
        kernel splits it in the graph (captured at max_model_len)."""
        graph = 1 << (batch - 1).bit_length()
        programs = graph * self.model.num_key_value_heads
        splits = min(-(-SPLIT_PROGRAMS // programs), self._max_len // MIN_SPLIT_KEYS)
        return programs * (1 << (splits.bit_length() - 1) if splits > 1 else 1)

    def _skew_time(self, batch: int, mean: float, longest: float, slots: int) -> float | None:
        context = max(mean, longest * min(1.0, slots / self._programs(batch)))
        return self._decode(batch, round(batch * context))

    def _fit_slots(self, rows: pd.DataFrame | None) -> int:
        """The resident-program count that best prices the profile's skewed decode batches."""
        if rows is None or rows.empty:
            return DEFAULT_DECODE_SLOTS
        points = [(int(r.batch), r.context, r.max_context, r.median_s) for r in rows.itertuples(index=False)]

        def error(slots: int) -> float:
            times = [(self._skew_time(b, c, x, slots), m) for b, c, x, m in points]
            errs = [abs(t / m - 1) for t, m in times if t is not None]
            return float(np.mean(errs)) if errs else float("inf")

        return min(range(32, 4097, 16), key=error)

    def _fit_loop(self, cpu: pd.DataFrame) -> Curve:
        """Execute time of decode steps in the engine loop over the isolated grid's at the loop's context, by
        batch (1 where the profile predates the `context` column or the grid lacks the point)."""
        if "context" not in cpu.columns:
            return Curve(np.array([1]), np.array([1.0]))
        if "execute_s" not in cpu.columns:
            raise ValueError(f"{self.folder / 'cpu.csv'}: missing column 'execute_s' (it has 'context')")
        grid = [self._decode(int(b), int(b * c)) for b, c in zip(cpu["batch"], cpu["context"])]
        ratio = [e / g if g else 1.0 for e, g in zip(cpu["execute_s"], grid)]
        return Curve(cpu["batch"].to_numpy(), np.asarray(ratio))

    def _decode_step(self, out: SchedulerOutput) -> float | None:
        """D at the effective context of the batch (see the module doc) times the engine loop's factor."""
        b = out.num_decode_tokens
        context = out.decode_context_tokens / b
        wave = self._wave[b] if b <= self._max_batch else 0.0
        # the longest context matters only if it can exceed the mean: skip the O(b) scan otherwise
        if out.requests and wave * self._max_len > context:
            context = max(context, wave * (max(r.num_computed_tokens for r in out.requests) + 1))
        t = self._decode(b, round(b * context))
        return None if t is None else t * self._loop(b)

    def _fit_attention(self, rows: pd.DataFrame | None) -> tuple[float, float, float]:
        if rows is None or len(rows) < 3:
            return (0.0, 0.0, 0.0)
        n, c = rows["chunk"].to_numpy(float), rows["chunk_context"].to_numpy(float)
        t = rows["median_s"].to_numpy() - [self._linear(int(x)) for x in n]
        x = np.stack([np.ones_like(n), n * (c + n / 2), c + n], axis=1)
        return tuple(float(v) for v in _lstsq_relative(x, np.maximum(t, 1e-6)))

    def _fit_mixed(self, rows: pd.DataFrame | None) -> tuple[float, float]:
        if rows is None or len(rows) < 2:
            return (0.0, 0.0)
        b, ctx = rows["batch"].to_numpy(float), rows["context"].to_numpy(float)
        rest = [self._linear(int(tok)) + self._attention(((int(n), int(c)),))
                for tok, n, c in zip(rows["tokens"], rows["chunk"], rows["chunk_context"])]
        t = rows["median_s"].to_numpy() - np.asarray(rest)
        return tuple(float(v) for v in _lstsq_relative(np.stack([b, b * ctx], axis=1), np.maximum(t, 1e-6)))

    @staticmethod
    def _fit_swap(rows: pd.DataFrame | None, fallback: float) -> float:
        if rows is None or rows.empty:
            return fallback
        return float(np.median(rows["median_s"].to_numpy() / rows["blocks"].to_numpy()))

    def _attention(self, chunks: Iterable[tuple[int, int]]) -> float:
        a0, a1, a2 = self._attn
        t = 0.0
        for n, c in chunks:
            t += a0 + a1 * n * (c + 0.5 * n) + a2 * (c + n)
        return t

    def _gpu_time(self, out: SchedulerOutput) -> float | None:
        """The profiled execute time of the step's forward, or None outside the profile."""
        b, chunks = out.num_decode_tokens, out.prefill_chunks
        if not chunks:
            return self._decode_step(out) if b else 0.0
        tokens = out.num_prefill_tokens + b
        if tokens > self._max_tokens or b > self._max_batch or any(n + c > self._max_len for n, c in chunks):
            return None
        m0, m1 = self._mixed
        return self._linear(tokens) + self._attention(chunks) + m0 * b + m1 * out.decode_context_tokens

    def predict(self, out: SchedulerOutput) -> float:
        gpu = self._gpu_time(out)
        if gpu is None:
            self.num_outside += 1
            return super().predict(out)
        swaps = len(out.swap_out) * self._swap_out + len(out.swap_in) * self._swap_in
        return gpu + swaps + self._cpu(out.num_decode_tokens + len(out.prefill_chunks))

    def _fit_error(self, steps: pd.DataFrame) -> dict[str, float]:
        """Mean |relative error| of the model on its own profile points, by kind (linear is exact)."""
        errors: dict[str, list[float]] = {}
        for row in steps[steps["kind"].isin(("prefill", "decode", "mixed"))].itertuples(index=False):
            b, n = int(row.batch), int(row.chunk)
            chunks = [(n, int(row.chunk_context))] if n else []
            out = SchedulerOutput(num_decode_tokens=b, decode_context_tokens=b * int(row.context),
                                  num_prefill_tokens=n, prefill_chunks=chunks)
            gpu = self._gpu_time(out)
            if gpu is not None:
                errors.setdefault(row.kind, []).append(abs(gpu / row.median_s - 1))
        return {k: round(float(np.mean(v)), 4) for k, v in errors.items()}
