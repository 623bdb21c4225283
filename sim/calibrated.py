"""Step time from a calibration: named terms fitted on the engine's own steps (sim.calibrate writes them).

A step's device time (first kernel to sampled tokens, as the engine's CUDA events time it), by how it runs:

    decode-only step replayed in the CUDA graph of batch g:
        graph_s[g] + graph_kv_s * C + graph_tail_s * C_max
    any other step (prefill chunks, mixed, or a decode batch larger than every decode graph):
        linear(T) + attention_s * A + prefill_kv_s * P + chunk_s * N + eager_kv_s * C + seq_s * S
    + swap_s * (blocks swapped in and out)

T: tokens scheduled (with cudagraph_mode FULL, the padded token count of the mixed graph the step replays
in: its matmuls run on every row), S: sequences (in a mixed graph of T tokens, the min(T, max_num_seqs) it
holds, as the engine's runner pads them: each gets its attention program and its row of logits), A: prefill
attention work
(engine.core.recorder.prefill_attention),
P: cached tokens the prefill chunks read, N: prefill chunks, C: decode context tokens, C_max: the longest.
graph_s[g]: one cost per captured graph (weights read once, g padded rows), linear between the graph sizes
fitted; linear(T): the token-linear part (matmuls, norms, LM head), piecewise linear between `knots`;
*_kv_s: the KV read per context token; graph_tail_s: the longest sequence's last attention wave (its split
programs finish after the others); chunk_s: a chunk's fixed cost (its attention launch, its sampling).

The host's time per step, which sim.simulator places on the timeline (in sync scheduling it adds to every
step; in async scheduling it overlaps the device and shows only where it is the longer):

    before the device (schedule, input preparation):          pre_s + pre_seq_s * S + pre_token_s * T
    after the tokens (update, detokenize, outputs, loop):      post_s + post_seq_s * S
    the first steps after start (buffers, allocator):          + first_steps_s[i] for step i
    the launch (input copies, graph launch), decode graph / other:  launch_graph_s / launch_eager_s

The engine opens a step's device window (its first CUDA event) before it copies the inputs and launches the
graph. On an idle device the window holds that launch: every sync step, and an async step only where the
host fell behind. Queued behind the step before (async), the launch overlaps that step and costs nothing.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from servebench.engine.core.graphs import mixed_graph_seqs
from servebench.engine.core.recorder import prefill_attention
from servebench.engine.core.scheduler_output import SchedulerOutput

CALIBRATION_FILE = "calibration.json"


def interpolate(xs: list[int], ys: list[float], x: float) -> float:
    """Piecewise linear through (xs, ys) (xs sorted), extended from the end segments beyond them."""
    if len(xs) == 1:
        return ys[0]
    j = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    return ys[j - 1] + (x - xs[j - 1]) * (ys[j] - ys[j - 1]) / (xs[j] - xs[j - 1])


@dataclass(slots=True)
class DeviceTerms:
    graph_batches: list[int]  # captured graph batches seen in the fit, sorted
    graph_s: list[float]  # the step in each at no context (interpolated between them)
    graph_kv_s: float  # per decode context token
    graph_tail_s: float  # per token of the longest decode context
    knots: list[int]  # tokens, sorted
    linear_s: list[float]  # linear(T) at each knot
    attention_s: float  # per prefill attention token pair
    prefill_kv_s: float  # per cached token a prefill chunk reads
    chunk_s: float  # per prefill chunk (its attention launch, its sampling if it ends the prompt)
    eager_kv_s: float  # per decode context token in an eager step
    seq_s: float  # per sequence in an eager step (its rows of the inputs, its sampling)
    swap_s: float  # per KV block swapped
    profile_offset_s: float = 0.0  # what the profile's timing adds (host input preparation): not predicted


@dataclass(slots=True)
class HostTerms:
    pre_s: float
    pre_seq_s: float
    pre_token_s: float
    post_s: float
    post_seq_s: float
    first_steps_s: list[float] = field(default_factory=list)
    launch_graph_s: float = 0.0
    launch_eager_s: float = 0.0

    def launch(self, out: SchedulerOutput) -> float:
        """What the step's device window holds before its first kernel when the device was idle (`out`: a
        step, or a steps-table row: its `graph_batch`)."""
        return self.launch_graph_s if out.graph_batch else self.launch_eager_s

    def pre(self, out: SchedulerOutput, step: int) -> float:
        first = self.first_steps_s[step] if step < len(self.first_steps_s) else 0.0
        return self.pre_s + self.pre_seq_s * len(out.requests) + self.pre_token_s * (
            out.total_num_scheduled_tokens) + first

    def post(self, out: SchedulerOutput) -> float:
        return self.post_s + self.post_seq_s * len(out.requests)


@dataclass(slots=True)
class Calibration:
    device: DeviceTerms
    host: HostTerms
    meta: dict = field(default_factory=dict)  # what it was fitted on, its errors, the source digest

    def device_time(self, graph_batch: int, tokens: int, seqs: int, chunks: int, attention: float,
                    cached: int, context: int, longest: int, swapped: int) -> float:
        """`tokens`: what the matmuls run on (a mixed graph's padded count, else the tokens scheduled)."""
        d = self.device
        if graph_batch:
            t = interpolate(d.graph_batches, d.graph_s, graph_batch) + d.graph_kv_s * context + (
                d.graph_tail_s * longest)
        else:
            t = interpolate(d.knots, d.linear_s, tokens) + d.attention_s * attention + (
                d.prefill_kv_s * cached + d.chunk_s * chunks + d.eager_kv_s * context + d.seq_s * seqs)
        return t + d.swap_s * swapped

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Calibration:
        if not path.is_file():
            raise ValueError(f"{path} not found: run workbench-calibrate on engine run folders of this "
                             "model and card")
        raw = json.loads(path.read_text())
        try:
            return cls(DeviceTerms(**raw["device"]), HostTerms(**raw["host"]), raw.get("meta", {}))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a calibration ({e})") from None


def padded_seqs(graph_tokens: int, seqs: int, max_num_seqs: int) -> int:
    """The sequences a step's kernels run on: those of the mixed graph it replays, as the engine's runner
    pads them, else the `seqs` scheduled."""
    return mixed_graph_seqs(graph_tokens, max_num_seqs) if graph_tokens else seqs


class CalibratedStepTime:
    """`predict`: a step's device time from a calibration; `host`: its host terms, for the engine loop."""

    def __init__(self, folder: Path, tensor_parallel_size: int = 1, mixed_graphs: bool = False,
                 max_num_seqs: int = 256) -> None:
        """`tensor_parallel_size`, `mixed_graphs` (cudagraph_mode FULL): the engine simulated, which the runs
        the calibration was fitted on must match; `max_num_seqs`: its mixed graphs' sequences."""
        self.folder = folder
        self.max_num_seqs = max_num_seqs
        self.calibration = Calibration.load(folder / CALIBRATION_FILE)
        fitted = {"tensor_parallel_size": 1, "mixed_graphs": False} | self.calibration.meta
        for what, want in (("tensor_parallel_size", tensor_parallel_size), ("mixed_graphs", mixed_graphs)):
            if fitted[what] != want:
                raise ValueError(f"{folder / CALIBRATION_FILE}: fitted on runs of {what}={fitted[what]}, "
                                 f"not {want}")
        self.host = self.calibration.host
        self.meta = self.calibration.meta  # source_digest: the engine code its runs measured
        self.sources = {"all": str(folder / CALIBRATION_FILE)}

    def predict(self, out: SchedulerOutput) -> float:
        chunks = out.prefill_chunks
        seqs = padded_seqs(out.graph_tokens, len(out.requests), self.max_num_seqs)
        return self.calibration.device_time(
            out.graph_batch, out.graph_tokens or out.total_num_scheduled_tokens, seqs,
            len(chunks), prefill_attention(chunks), sum(c for _, c in chunks), out.decode_context_tokens,
            out.decode_context_max, len(out.swap_in) + len(out.swap_out))
