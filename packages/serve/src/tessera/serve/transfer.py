"""Host values to the device in as few copies as possible."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def upload(parts: Sequence[Sequence[int | float | bool]], dtype: torch.dtype,
           device: torch.device | str) -> list[torch.Tensor]:
    """Host lists as 1-D tensors on `device`, one per part, through a single host-to-device copy.

    On CUDA the values go through pinned memory and the copy is asynchronous. A `torch.tensor(values,
    device="cuda")` per list would instead copy from pageable memory and wait for the stream to drain
    each time: a dozen such waits in a speculative round serialise the host with the device."""
    dev = torch.device(device)
    host = torch.tensor([v for part in parts for v in part], dtype=dtype, pin_memory=dev.type == "cuda")
    if dev.type != "cpu":
        host = host.to(dev, non_blocking=dev.type == "cuda")
    return list(host.split([len(part) for part in parts]))


def fetch(tensors: Sequence[torch.Tensor | None]) -> tuple[list[torch.Tensor | None], torch.cuda.Event | None]:
    """Device tensors copied to the host asynchronously (pinned memory), and the event after which the
    copies are complete; off CUDA the tensors themselves and None. Reading a CUDA tensor with `.tolist()`
    would wait for everything queued on the stream since, not only for the work that made it."""
    if not any(t is not None and t.is_cuda for t in tensors):
        return list(tensors), None
    host = [None if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
            for t in tensors]
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


def take_rows(x: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """x[rows] along the first dimension: `x` itself when `rows` are all of its rows in order, else a
    gather whose index goes through `upload` (indexing with a list copies it from pageable memory,
    a wait for the stream on CUDA)."""
    rows = list(rows)
    if len(rows) == x.shape[0] and rows == list(range(len(rows))):
        return x
    return x.index_select(0, upload([rows], torch.int64, x.device)[0])
