"""Lifecycle and per-step records, as the `requests` and `steps` tables of ARCHITECTURE.md."""

from __future__ import annotations

from array import array
from dataclasses import dataclass, fields
from operator import attrgetter

from servebench.engine.core.request import Request

REQUEST_COLUMNS = (
    "request_id",
    "arrival_s",
    "first_scheduled_s",
    "first_token_s",
    "finish_s",
    "prompt_tokens",
    "output_tokens",
    "cached_tokens",
    "num_preemptions",
    "finish_reason",
)  # the schema every backend writes (ARCHITECTURE.md); the recorder adds `priority`


@dataclass(slots=True)
class StepRow:
    """One scheduler step: a row of the steps table, whose columns are these fields, in this order."""

    step: int
    start_s: float
    duration_s: float
    num_prefill_tokens: int
    num_decode_tokens: int
    num_running: int
    num_waiting: int
    kv_usage: float
    num_preempted: int
    prefix_hit_tokens: int
    # What a step's time depends on, beside the token counts above (README, "Trace schema"); the step-time
    # calibration (sim.calibrate) fits on these. Written by every backend that runs the shared scheduler.
    num_prefill_chunks: int
    prefill_attention: float  # sum over prefill chunks of n (c + n / 2): n new tokens after c cached ones
    prefill_context_sum: int  # sum over prefill chunks of c: cached tokens whose KV the chunks read
    decode_context_sum: int
    decode_context_max: int
    graph_batch: int  # padded CUDA-graph batch of a decode-only step; 0: eager
    graph_tokens: int  # padded token count of the CUDA graph a step that prefills replayed (FULL); 0: eager
    swap_in_blocks: int
    swap_out_blocks: int
    # from the previous step's end to when this step was scheduled (NaN for the first step); negative with
    # async scheduling while the next step is scheduled as the previous one runs
    host_gap_s: float
    device_s: float  # the device's time for the forward and sampling (CUDA events; NaN on CPU)
    # LoRA adapters loaded into GPU slots before the forward, of which read from disk, and the loads' time
    lora_loads: int
    lora_loads_from_disk: int
    lora_load_s: float


TRACE_STEP_COLUMNS = tuple(f.name for f in fields(StepRow))
LORA_STEP_COLUMNS = TRACE_STEP_COLUMNS[TRACE_STEP_COLUMNS.index("lora_loads"):]
# The columns every backend writes (the server's, empty), then the step's shape (STEP_SHAPE_COLUMNS), then
# the LoRA loads (LORA_STEP_COLUMNS).
STEP_COLUMNS = TRACE_STEP_COLUMNS[:TRACE_STEP_COLUMNS.index("num_prefill_chunks")]
STEP_SHAPE_COLUMNS = TRACE_STEP_COLUMNS[len(STEP_COLUMNS):-len(LORA_STEP_COLUMNS)]
NAN = float("nan")


def prefill_attention(chunks: list[tuple[int, int]]) -> float:
    """Attention work of prefill chunks: a chunk of n new tokens after c cached ones attends n (c + n / 2)
    (query, key) pairs (causal within the chunk)."""
    return sum(n * (c + n / 2) for n, c in chunks)


def _or_nan(x: float | None) -> float:
    return NAN if x is None else x


class TraceRecorder:
    """Rows are appended when they happen; tables are built once at the end."""

    def __init__(self) -> None:
        self.request_rows: list[tuple] = []
        self.step_rows: list[StepRow] = []
        self.itl_s = array("d")  # every inter-token gap, in seconds

    def on_finish(self, req: Request) -> None:
        """Append `req`'s row of the requests table; called once, when it finishes for any reason."""
        self.request_rows.append(
            (
                req.request_id,
                req.arrival_time,
                _or_nan(req.first_scheduled_time),
                _or_nan(req.first_token_time),
                _or_nan(req.finish_time),
                req.num_prompt_tokens,
                req.num_output_tokens,
                max(req.num_cached_tokens, 0),
                req.num_preemptions,
                req.finish_reason,
                req.priority,
            )
        )

    def on_step(self, row: StepRow) -> None:
        """Append a step's row (the scheduler builds it)."""
        self.step_rows.append(row)

    def requests_table(self) -> dict[str, list]:
        """Column name -> values, ready for a DataFrame: REQUEST_COLUMNS and `priority`."""
        return _columns((*REQUEST_COLUMNS, "priority"), self.request_rows)

    def steps_table(self) -> dict[str, list]:
        """Column name -> values, ready for a DataFrame: TRACE_STEP_COLUMNS."""
        return _columns(TRACE_STEP_COLUMNS, list(map(attrgetter(*TRACE_STEP_COLUMNS), self.step_rows)))


def _columns(names: tuple[str, ...], rows: list[tuple]) -> dict[str, list]:
    cols = list(zip(*rows)) if rows else [() for _ in names]
    return {name: list(col) for name, col in zip(names, cols)}
