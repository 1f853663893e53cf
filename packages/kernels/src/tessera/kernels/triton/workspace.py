"""Arrival counters for kernels whose programs combine their partial results in the same launch.

A split launch (the decode GEMVs' split-K, paged decode's split context) has each program store its
partial, then bump a counter slot of its output tile; the last to arrive reads every partial, stores
the result and sets the slot back to zero. So a launch needs no memset before it and leaves the
counters as it found them, and kernels on one stream, which run in order, can share one buffer. The
buffer is allocated zeroed on first use and never freed, so a CUDA graph that captured its address
stays valid.
"""

from __future__ import annotations

import functools

import torch

#: int32 slots per (device, stream): more than any launch here uses (one per N tile of a split GEMV with
#: N <= 16384 and tiles >= 4 wide; one per (sequence, kv head) of a split paged decode, which splits only
#: while those are fewer than twice the SMs).
COUNTER_SLOTS = 4096


def stream_key(device: torch.device) -> int:
    """The current stream's raw handle, as Triton's launcher reads it (no Stream object built per call);
    0 off CUDA."""
    return torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0


@functools.cache
def _counters(device: torch.device, stream: int) -> torch.Tensor:
    return torch.zeros(COUNTER_SLOTS, dtype=torch.int32, device=device)


def counters(device: torch.device) -> torch.Tensor:
    """The current stream's counter buffer on `device` (COUNTER_SLOTS int32s, all zero between launches)."""
    return _counters(device, stream_key(device))
