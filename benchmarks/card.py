"""The card in hand and its measured ceilings, which every bound in the benchmarks is computed from.

    python benchmarks/card.py       # prints the card's name, copy bandwidth and bf16 GEMM rate

A datasheet figure is wrong for a card of another kind (an H100's bound on an H200 reads as 125 % of a bound)
and for the clocks a card runs at here, so the benchmarks measure once per process, before loading a model:
  copy  a device-to-device copy of COPY_BYTES, counting bytes read and written (the memory bound of a
        streaming kernel: it reads weights and writes little);
  gemm  an 8192 x 8192 x 8192 bf16 matrix product on random data (zeros run faster: less switching power).
Each is the median of REPS timed calls (CUDA events) after WARMUP untimed ones.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

COPY_BYTES = 1 << 30  # 1 GiB each way: twenty times the L2, so the copy streams from HBM
GEMM_N = 8192
WARMUP, REPS = 3, 10


@dataclass(frozen=True, slots=True)
class Card:
    name: str
    copy_bytes_per_s: float  # read + written
    gemm_flops_per_s: float  # bf16, dense

    def __str__(self) -> str:
        return (f"{self.name}: copy {self.copy_bytes_per_s / 1e12:.2f} TB/s, "
                f"bf16 GEMM {self.gemm_flops_per_s / 1e12:.0f} TFLOP/s (measured)")

    def read_seconds(self, nbytes: float) -> float:
        return nbytes / self.copy_bytes_per_s

    def compute_seconds(self, flops: float) -> float:
        return flops / self.gemm_flops_per_s


def _median_seconds(fn: Callable[[], object]) -> float:
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(REPS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _copy_bytes_per_s() -> float:
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * COPY_BYTES / _median_seconds(lambda: dst.copy_(src))


def _gemm_flops_per_s() -> float:
    a, b = (torch.randn(GEMM_N, GEMM_N, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    out = torch.empty_like(a)
    return 2 * GEMM_N**3 / _median_seconds(lambda: torch.mm(a, b, out=out))


@functools.cache
def card() -> Card:
    """This process's card, measured at the first call (a second or two); its buffers are freed again."""
    if not torch.cuda.is_available():
        raise SystemExit("the card's ceilings are measured on a CUDA GPU: none is visible")
    measured = Card(torch.cuda.get_device_name(), _copy_bytes_per_s(), _gemm_flops_per_s())
    torch.cuda.empty_cache()
    return measured


if __name__ == "__main__":
    print(card())
