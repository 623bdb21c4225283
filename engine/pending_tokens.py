"""Async scheduling's PENDING input tokens, filled on the device from the previous launch's sampled tokens."""

from __future__ import annotations

import numpy as np
import torch
from servebench.engine.core.request import Request
from servebench.engine.host_to_device import to_device


class PendingTokens:
    """The last launch's sampled tokens, kept on the device. With async scheduling the next step is prepared
    before they reach the host, so its decode rows hold PENDING there; the device fills those rows from
    here, and the host never waits for the tokens to schedule the next step."""

    def __init__(self) -> None:
        self._last: tuple[list[Request], list[int], torch.Tensor] | None = None

    def remember(self, requests: list[Request], rows: list[int], tokens: torch.Tensor) -> None:
        """A launch's sampled `tokens` (on the device): row j is that of `requests[rows[j]]`."""
        self._last = (requests, rows, tokens)

    def source_rows(self, reqs: list[Request]) -> np.ndarray:
        """Rows of the previous launch's sampled tokens that belong to `reqs`."""
        prev_reqs, prev_rows, _ = self._last
        row_of = {prev_reqs[i].request_id: j for j, i in enumerate(prev_rows)}
        return np.fromiter((row_of[r.request_id] for r in reqs), dtype=np.int64, count=len(reqs))

    def fill(self, input_ids: torch.Tensor, rows: np.ndarray, source_rows: np.ndarray) -> None:
        """Write the previous launch's sampled tokens `source_rows` (still on the device) into the PENDING
        input rows `rows`."""
        prev = self._last[2]
        m = len(rows)
        if np.array_equal(rows, source_rows) and rows[-1] == m - 1:  # the steady decode batch: the same rows
            input_ids[:m].copy_(prev[:m])
            return
        dev = input_ids.device
        input_ids[to_device(rows, dev)] = prev[to_device(source_rows, dev)]
