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

`gated_linear(gu, w, bias)` is SwiGLU's down projection on the fused gate/up output: `linear` of
silu_mul(gate, up). A decode-shaped call times that (the silu_mul op, then `linear`'s choice) against
the gated GEMV (`matmul.dense_gated`), which reads silu_mul(gate, up) as it loads x and so saves the
silu_mul launch, and keeps the faster per shape, in the same way.
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

_lock = threading.RLock()  # reentrant: choosing a gated shape times `linear`, which may choose its own
_UNSET = object()
#: (row bucket, N, K, dtype, device) -> the chosen 2-D matmul, or None for F.linear.
_choice: dict[tuple, Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None] = {}
#: What each timed key measured, in microseconds: {"cublas_us": ..., "gemv_us": ...}.
timings: dict[tuple, dict[str, float]] = {}


def _decode_shaped(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (x.is_cuda and x.dtype in _HALF and w.dtype == x.dtype and w.dim() == 2 and x.dim() >= 1
            and 0 < x.numel() <= MAX_ROWS * x.shape[-1] and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling())


def _faster(key: tuple, what: str, start: float, table: dict[tuple, dict[str, float]],
            baseline: tuple[str, Callable[[], object]], candidate: tuple[str, Callable[[], object]]) -> bool:
    """Whether `candidate` beats `baseline` (both tuned already) as a decode step pays them (`graph_bench`);
    records both times in `table[key]` (us, under their names) and logs the pick."""
    from tessera.kernels.triton.tuning import graph_bench

    (base_name, base), (cand_name, cand) = baseline, candidate
    t_base, t_cand = graph_bench(base) * 1e3, graph_bench(cand) * 1e3
    table[key] = {f"{base_name}_us": t_base, f"{cand_name}_us": t_cand}
    # Each new shape costs a tuning sweep (seconds with a cold Triton cache): say so, since a serving
    # engine's start-up spends most of its time here.
    log.info("%s, rows <= %d, N=%d, K=%d, %s: %s %.1f us, %s %.1f us -> %s (tuned in %.1f s)", what, key[0], key[1],
             key[2], str(key[3]).removeprefix("torch."), base_name, t_base, cand_name, t_cand,
             cand_name if t_cand < t_base else base_name, time.perf_counter() - start)
    return t_cand < t_base


def _remembered(table: dict[tuple, object], key: tuple, choose: Callable[[], object]) -> object:
    """table[key], made by `choose()` at the key's first call (under the lock); `_UNSET` while the stream
    captures a CUDA graph and the key has no choice yet (a capture cannot time anything)."""
    fn = table.get(key, _UNSET)
    if fn is _UNSET and not torch.cuda.is_current_stream_capturing():
        with _lock:
            if key not in table:
                table[key] = choose()
            fn = table[key]
    return fn


def _choose(key: tuple, x2: torch.Tensor, w: torch.Tensor) -> Callable | None:
    try:
        gemv = registry.get("matmul.dense", x2, w, backend="triton")
    except KernelUnavailableError:
        return None
    start = time.perf_counter()
    gemv(x2, w)  # tunes its tiles first, so the timing below is of the tuned kernel
    won = _faster(key, "decode linear", start, timings, ("cublas", lambda: F.linear(x2, w)),
                  ("gemv", lambda: gemv(x2, w)))
    return gemv.fn if won else None


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, w, bias)`; decode-shaped calls take the faster of cuBLAS and the GEMV for the shape."""
    if not _decode_shaped(x, w):
        return F.linear(x, w, bias)
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1 or not w.is_contiguous():
        return F.linear(x, w, bias)
    key = (bucket(x2.shape[0]), w.shape[0], k, x.dtype, x.device)
    fn = _remembered(_choice, key, lambda: _choose(key, x2, w))
    if fn is None or fn is _UNSET:  # inside a capture an unchosen shape stays on cuBLAS
        return F.linear(x, w, bias)
    y = fn(x2, w).view(*x.shape[:-1], w.shape[0])
    return y if bias is None else y + bias


#: (row bucket, N, K, dtype, device) -> the gated GEMV for `gated_linear`, or None for silu_mul + `linear`.
_gated_choice: dict[tuple, Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None] = {}
#: What each timed gated key measured, in microseconds: {"unfused_us": ..., "gated_us": ...}.
gated_timings: dict[tuple, dict[str, float]] = {}


def _unfused(gu: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    k = w.shape[-1]
    gu2 = gu.reshape(-1, 2 * k)
    act = registry("silu_mul", gu2[:, :k], gu2[:, k:])
    return linear(act.view(*gu.shape[:-1], k), w, bias)


def _choose_gated(key: tuple, gu2: torch.Tensor, w: torch.Tensor) -> Callable | None:
    try:
        gated = registry.get("matmul.dense_gated", gu2, w, backend="triton")
    except KernelUnavailableError:
        return None
    start = time.perf_counter()
    gated(gu2, w)  # tunes the gated tiles; the unfused side tunes (and chooses) its own
    _unfused(gu2, w, None)
    won = _faster(key, "decode down projection", start, gated_timings, ("unfused", lambda: _unfused(gu2, w, None)),
                  ("gated", lambda: gated(gu2, w)))
    return gated.fn if won else None


def gated_linear(gu: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`linear(silu_mul(gu[..., :K], gu[..., K:]), w, bias)` for a fused gate/up output gu [..., 2K] and w [N, K];
    decode-shaped calls take the faster of that and the gated GEMV for the shape (one launch fewer)."""
    k = w.shape[-1]
    if gu.shape[-1] != 2 * k:
        raise ValueError(f"gated_linear: gu.shape={tuple(gu.shape)} is not [..., 2 * K] for w.shape={tuple(w.shape)}")
    if not _decode_shaped(gu, w):
        return _unfused(gu, w, bias)
    gu2 = gu.reshape(-1, 2 * k)
    if gu2.stride(-1) != 1 or not w.is_contiguous():
        return _unfused(gu, w, bias)
    key = (bucket(gu2.shape[0]), w.shape[0], k, gu.dtype, gu.device)
    fn = _remembered(_gated_choice, key, lambda: _choose_gated(key, gu2, w))
    if fn is None or fn is _UNSET:  # inside a capture an unchosen shape stays unfused
        return _unfused(gu, w, bias)
    y = fn(gu2, w).view(*gu.shape[:-1], w.shape[0])
    return y if bias is None else y + bias


def choices() -> dict[str, dict[str, object]]:
    """Per timed shape ('M<=b N=n K=k dtype', with ' gated' for `gated_linear`'s): the backend chosen ('gemv' or
    'cublas'; 'gated' or 'unfused') and the timings."""
    out = {f"M<={b} N={n} K={k} {str(dt).removeprefix('torch.')}":
           {"backend": "cublas" if fn is None else "gemv", **timings.get((b, n, k, dt, dev), {})}
           for (b, n, k, dt, dev), fn in _choice.items()}
    out |= {f"M<={b} N={n} K={k} {str(dt).removeprefix('torch.')} gated":
            {"backend": "unfused" if fn is None else "gated", **gated_timings.get((b, n, k, dt, dev), {})}
            for (b, n, k, dt, dev), fn in _gated_choice.items()}
    return out
