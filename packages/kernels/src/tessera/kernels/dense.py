"""`linear(x, w, bias)`: `F.linear`, except that a decode-shaped call takes whichever of cuBLAS and the
`matmul.dense` GEMV backend is faster for its shape on this GPU.

Decode-shaped means at most 16 rows of x (`gemv.MAX_M`), on CUDA, in a half dtype, without autograd
recording and outside `torch.compile` tracing; everything else is `F.linear` as it is. Neither side wins
every shape (an H200 serves Qwen3-0.6B's o projection 3x faster through the GEMV and its fused gate/up
slightly faster through cuBLAS), so the first call of each (row bucket, N, K, dtype, device) times both
as a decode step under CUDA graphs pays them (`graph_bench`: in a captured graph, L2 cold) and keeps
the faster for the rest of the process. A first call made during CUDA-graph capture cannot time
anything: it takes `F.linear` and remembers nothing, so callers warm up before capturing (the serving
engine's graphs do).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tessera.kernels.registry import registry
from tessera.kernels.support import bucket
from tessera.specs import KernelUnavailableError

log = logging.getLogger(__name__)

#: Most rows a call may have to count as decode-shaped (the GEMV backend's limit).
MAX_ROWS = 16
_HALF = (torch.bfloat16, torch.float16)

_lock = threading.Lock()
_UNSET = object()
#: (row bucket, N, K, dtype, device) -> the chosen 2-D matmul, or None for F.linear.
_choice: dict[tuple, Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None] = {}
#: What each timed key measured, in microseconds: {"cublas_us": ..., "gemv_us": ...}.
timings: dict[tuple, dict[str, float]] = {}


def _decode_shaped(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (x.is_cuda and x.dtype in _HALF and w.dtype == x.dtype and w.dim() == 2 and x.dim() >= 1
            and 0 < x.numel() <= MAX_ROWS * x.shape[-1] and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling())


def _choose(key: tuple, x2: torch.Tensor, w: torch.Tensor) -> Callable | None:
    try:
        gemv = registry.get("matmul.dense", x2, w, backend="triton")
    except KernelUnavailableError:
        return None
    from tessera.kernels.triton.tuning import graph_bench

    start = time.perf_counter()
    gemv(x2, w)  # tunes its tiles first, so the timing below is of the tuned kernel
    t_blas = graph_bench(lambda: F.linear(x2, w)) * 1e3
    t_gemv = graph_bench(lambda: gemv(x2, w)) * 1e3
    timings[key] = {"cublas_us": t_blas, "gemv_us": t_gemv}
    # Each new shape costs a tuning sweep (seconds with a cold Triton cache): say so, since a serving
    # engine's start-up spends most of its time here.
    log.info("decode linear, rows <= %d, N=%d, K=%d, %s: cuBLAS %.1f us, GEMV %.1f us -> %s (tuned in %.1f s)",
             key[0], key[1], key[2], str(key[3]).removeprefix("torch."), t_blas, t_gemv,
             "GEMV" if t_gemv < t_blas else "cuBLAS", time.perf_counter() - start)
    return gemv.fn if t_gemv < t_blas else None


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, w, bias)`; decode-shaped calls take the faster of cuBLAS and the GEMV for the shape."""
    if not _decode_shaped(x, w):
        return F.linear(x, w, bias)
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1 or not w.is_contiguous():
        return F.linear(x, w, bias)
    key = (bucket(x2.shape[0]), w.shape[0], k, x.dtype, x.device)
    fn = _choice.get(key, _UNSET)
    if fn is _UNSET:
        if torch.cuda.is_current_stream_capturing():
            return F.linear(x, w, bias)  # inside a capture an unchosen shape stays on cuBLAS
        with _lock:
            if key not in _choice:
                _choice[key] = _choose(key, x2, w)
            fn = _choice[key]
    if fn is None:
        return F.linear(x, w, bias)
    y = fn(x2, w).view(*x.shape[:-1], w.shape[0])
    return y if bias is None else y + bias


def choices() -> dict[str, dict[str, object]]:
    """Per timed shape ('M<=b N=n K=k dtype'): the backend chosen ('gemv' or 'cublas') and both timings."""
    return {f"M<={b} N={n} K={k} {str(dt).removeprefix('torch.')}":
            {"backend": "cublas" if fn is None else "gemv", **timings.get((b, n, k, dt, dev), {})}
            for (b, n, k, dt, dev), fn in _choice.items()}
