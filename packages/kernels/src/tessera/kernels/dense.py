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

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tessera.kernels import shape_choice
from tessera.kernels.registry import registry
from tessera.kernels.support import bucket
from tessera.specs import KernelUnavailableError

#: Most rows a call may have to count as decode-shaped (the GEMV backend's limit).
MAX_ROWS = 16
_HALF = (torch.bfloat16, torch.float16)

#: (row bucket, N, K, dtype, device) -> the chosen 2-D matmul, or None for F.linear.
_choice: dict[tuple, Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None] = {}
#: What each timed key measured, in microseconds: {"cublas_us": ..., "gemv_us": ...}.
timings: dict[tuple, dict[str, float]] = {}


def _decode_shaped(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (x.is_cuda and x.dtype in _HALF and w.dtype == x.dtype and w.dim() == 2 and x.dim() >= 1
            and 0 < x.numel() <= MAX_ROWS * x.shape[-1] and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling())


def _choose(table: dict, key: tuple, what: str, op: str, args: tuple, baseline: tuple[str, Callable[[], object]],
            name: str) -> Callable | None:
    """The Triton backend of `op` (its plain function) where it beats `baseline` at this shape, both tuned
    first; None where the baseline wins or the backend cannot take `args`."""
    try:
        impl = registry.get(op, *args, backend="triton")
    except KernelUnavailableError:
        return None
    start = time.perf_counter()
    impl(*args)  # each side tunes its tiles first, so the timings are of tuned kernels
    baseline[1]()
    label = f"{what}, rows <= {key[0]}, N={key[1]}, K={key[2]}, {str(key[3]).removeprefix('torch.')}"
    return impl.fn if shape_choice.faster(label, start, table, key, baseline, (name, lambda: impl(*args))) else None


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, w, bias)`; decode-shaped calls take the faster of cuBLAS and the GEMV for the shape."""
    if not _decode_shaped(x, w):
        return F.linear(x, w, bias)
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1 or not w.is_contiguous():
        return F.linear(x, w, bias)
    key = (bucket(x2.shape[0]), w.shape[0], k, x.dtype, x.device)
    fn = shape_choice.remembered(_choice, key, lambda: _choose(timings, key, "decode linear", "matmul.dense", (x2, w),
                                                          ("cublas", lambda: F.linear(x2, w)), "gemv"))
    if fn is None or fn is shape_choice.UNSET:  # inside a capture an unchosen shape stays on cuBLAS
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
    fn = shape_choice.remembered(_gated_choice, key, lambda: _choose(
        gated_timings, key, "decode down projection", "matmul.dense_gated", (gu2, w),
        ("unfused", lambda: _unfused(gu2, w, None)), "gated"))
    if fn is None or fn is shape_choice.UNSET:  # inside a capture an unchosen shape stays unfused
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
