"""Host data onto the device without waiting for the device.

A CUDA copy from pageable host memory first waits for every kernel queued on the stream: in a step's launch
that made the host wait for the step before (or, after the forward, for this one), which undid async
scheduling for any step that copied so: eager steps (their inputs, the sampled rows), sampling with a
temperature, LoRA rows, a changed decode batch's pending tokens. From pinned memory the copy is queued like a
kernel, and the caching host allocator keeps the pinned block until the copy has run.
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(data: np.ndarray | list, device: torch.device, dtype: torch.dtype | None = None
              ) -> torch.Tensor:
    """`data` as a tensor on `device` (of `dtype` if given), queued behind the stream's work on CUDA."""
    t = torch.from_numpy(data) if isinstance(data, np.ndarray) else torch.tensor(data, dtype=dtype)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
