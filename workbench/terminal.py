"""What a run prints: progress while it runs, and at the end the `vllm bench serve` result block, the
requests that were not served, whether the load was sustainable, and the run folder."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

WIDTH = 50
LINE_EVERY_S = 5.0  # progress lines outside a terminal (CI, nohup, a pipe)
# (section title, rows of (label, summary key)) as vLLM's benchmark prints them
BLOCK = (
    ("Serving Benchmark Result", (
        ("Successful requests:", "num_finished"),
        ("Benchmark duration (s):", "duration_s"),
        ("Total input tokens:", "total_input_tokens"),
        ("Total generated tokens:", "total_output_tokens"),
        ("Request throughput (req/s):", "request_throughput"),
        ("Request goodput (req/s):", "goodput"),
        ("Output token throughput (tok/s):", "output_throughput"),
        ("Total Token throughput (tok/s):", "total_token_throughput"),
    )),
    ("Time to First Token", (("Mean TTFT (ms):", "mean_ttft_ms"), ("Median TTFT (ms):", "median_ttft_ms"),
                             ("P99 TTFT (ms):", "p99_ttft_ms"))),
    ("Time per Output Token (excl. 1st token)", (
        ("Mean TPOT (ms):", "mean_tpot_ms"), ("Median TPOT (ms):", "median_tpot_ms"),
        ("P99 TPOT (ms):", "p99_tpot_ms"))),
    ("Inter-token Latency", (("Mean ITL (ms):", "mean_itl_ms"), ("Median ITL (ms):", "median_itl_ms"),
                             ("P99 ITL (ms):", "p99_itl_ms"))),
)


def result_block(summary: dict[str, Any], run_dir: Path) -> str:
    """The end of a run on the terminal: vLLM's block, then the not-served and load lines, then the folder."""
    lines = []
    for title, rows in BLOCK:
        fill = "=" if title == BLOCK[0][0] else "-"
        lines.append(f" {title} ".center(WIDTH, fill))
        lines += [f"{label:<40} {_value(summary.get(key))}" for label, key in rows
                  if key != "goodput" or _number(summary.get(key))]
    lines += ["=" * WIDTH, not_served_line(summary)]
    overload = overload_line(summary)
    if overload:
        lines.append(overload)
    lines.append(f"run folder: {run_dir}")
    return "\n".join(lines)


def not_served_line(summary: dict[str, Any]) -> str:
    """Every request that did not finish as asked, by reason, in one line (the reasons that occurred)."""
    reasons = (("num_rejected", f"rejected (prompt over max_model_len={summary.get('max_model_len', '?')} "
                                "or empty)"),
               ("num_shed", "shed (admission control)"), ("num_aborted", "aborted"),
               ("num_truncated", "cut short (prompt + output reached max_model_len)"))
    parts = [f"{summary[key]:,} {why}" for key, why in reasons if summary.get(key)]
    return (f"not served as asked: {', '.join(parts) or 'none'} "
            f"(of {summary.get('num_requests', 0):,} requests; {summary.get('num_finished', 0):,} finished)")


def overload_line(summary: dict[str, Any]) -> str | None:
    if not summary.get("overloaded"):
        return None
    return (f"OVERLOADED: requests arrived at {summary['arrival_rate']:.2f}/s and were served at "
            f"{summary['request_throughput']:.2f}/s; {summary['queue_at_last_arrival']:,} were still waiting "
            "when the last one arrived, so latencies grow with the run's length (lower the request rate "
            "or add capacity)")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not (isinstance(value, float) and math.isnan(value))


def _value(value: Any) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{value:.2f}" if _number(value) else "n/a"


class Progress:
    """Requests done so far: a tqdm bar on a terminal, else a line on stderr every LINE_EVERY_S seconds."""

    def __init__(self, total: int, what: str, enabled: bool = True) -> None:
        self.total, self.what, self.done = total, what, 0
        self._bar = None
        self._enabled = enabled
        self._t0 = self._last = time.monotonic()
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="req", desc=what, mininterval=0.5)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._enabled and time.monotonic() - self._last >= LINE_EVERY_S:
            self._last = time.monotonic()
            share = 100 * self.done / max(self.total, 1)
            elapsed = self._last - self._t0
            print(f"{self.what}: {self.done}/{self.total} requests ({share:.0f}%), {elapsed:.0f} s",
                  file=sys.stderr, flush=True)
