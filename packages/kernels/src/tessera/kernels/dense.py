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

`normed_linear(x, residual, weight, eps, w, bias)` is a decoder layer's residual add and RMSNorm followed by its
fused q/k/v or gate/up projection; a one-row decode call times the two launches against the normalised GEMV
(`matmul.dense_normed`, which normalises x + residual as it loads x and writes h) and keeps the faster, again
per shape.

`float32_sum_blocks(32)` (a context manager) makes float32 calls of both sum each output over K in blocks:
one matmul per block of `block` consecutive products, and the partial results added pairwise
(`blocked_linear`). A BLAS float32 GEMM adds its K products into one running sum in long runs, and over
K = 2048 to 8192 that rounding is most of a float32 forward's error against float64; blocks and a pairwise
tree cut it two- to threefold (one GEMM, a whole model's logits, on a CPU), at several times the time.
It is for float32 reference runs (parity against other implementations, which sum the same way), not for
speed; half dtypes are unaffected.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

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
            name: str, fusion: bool = False) -> Callable | shape_choice.Fusion | None:
    """The Triton backend of `op` (its plain function) where it beats `baseline` at this shape, both tuned
    first; None where the baseline wins or the backend cannot take `args`. `fusion` (a fused launch against the
    separate ones): a `shape_choice.Fusion` of the function and whether it won, whichever did."""
    try:
        impl = registry.get(op, *args, backend="triton")
    except KernelUnavailableError:
        return None
    start = time.perf_counter()
    impl(*args)  # each side tunes its tiles first, so the timings are of tuned kernels
    baseline[1]()
    label = f"{what}, rows <= {key[0]}, N={key[1]}, K={key[2]}, {str(key[3]).removeprefix('torch.')}"
    won = shape_choice.faster(label, start, table, key, baseline, (name, lambda: impl(*args)))
    if fusion:
        return shape_choice.Fusion(impl.fn, won)
    return impl.fn if won else None


#: Most bytes of partial sums `blocked_linear` holds at once (it walks N in slices to stay under it).
_PARTIALS_BYTES = 1 << 28
_sum_block = threading.local()


@contextmanager
def float32_sum_blocks(block: int = 32) -> Iterator[None]:
    """Inside the block (this thread), float32 `linear` and `gated_linear` calls sum over K in blocks of
    `block` products added pairwise (`blocked_linear`); restores the previous setting on exit."""
    if not isinstance(block, int) or isinstance(block, bool) or block < 1:
        raise ValueError(f"float32_sum_blocks: block={block!r} is not a positive int")
    previous = getattr(_sum_block, "value", None)
    _sum_block.value = block
    try:
        yield
    finally:
        _sum_block.value = previous


def float32_sum_block() -> int | None:
    """The block size `float32_sum_blocks` set for this thread, or None (plain `F.linear`)."""
    return getattr(_sum_block, "value", None)


def _pairwise(parts: torch.Tensor) -> torch.Tensor:
    """Sum of `parts [B, ...]` over B as a balanced tree: halves summed recursively, then added."""
    if parts.shape[0] == 1:
        return parts[0]
    mid = (parts.shape[0] + 1) // 2
    return _pairwise(parts[:mid]) + _pairwise(parts[mid:])


def blocked_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, block: int = 32) -> torch.Tensor:
    """`F.linear(x, w, bias)` with each output summed over K as the pairwise sum of `ceil(K / block)` partial
    matmuls of `block` consecutive products each (the last block zero-padded); differentiable. Its rounding
    error grows with `block + log2(K / block)` products rather than K's run lengths inside a BLAS kernel."""
    if block < 1:
        raise ValueError(f"blocked_linear: block={block} is not positive")
    if x.shape[-1] != w.shape[-1] or w.dim() != 2:
        raise ValueError(f"blocked_linear: x.shape={tuple(x.shape)} and w.shape={tuple(w.shape)} are not [..., K], "
                         "[N, K]")
    k, n = w.shape[1], w.shape[0]
    x2 = x.reshape(-1, k)
    pad = -k % block
    if pad:
        x2, w = F.pad(x2, (0, pad)), F.pad(w, (0, pad))
    blocks = (k + pad) // block
    xb = x2.reshape(x2.shape[0], blocks, block).transpose(0, 1)  # [blocks, M, block]
    wb = w.reshape(n, blocks, block).permute(1, 2, 0)  # [blocks, block, N]
    step = max(1, _PARTIALS_BYTES // max(1, blocks * x2.shape[0] * x2.element_size()))
    y = torch.cat([_pairwise(torch.bmm(xb, wb[..., i : i + step])) for i in range(0, n, step)], dim=-1)
    y = y.view(*x.shape[:-1], n)
    return y if bias is None else y + bias


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, w, bias)`; decode-shaped calls take the faster of cuBLAS and the GEMV for the shape, and
    float32 calls inside `float32_sum_blocks` sum in blocks (`blocked_linear`)."""
    if x.dtype == torch.float32 and (block := float32_sum_block()) is not None:
        return blocked_linear(x, w, bias, block)
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


#: (row bucket, N, K, dtype, device) -> the gated GEMV's `shape_choice.Fusion` against silu_mul + `linear`, or None
#: where the GEMV cannot take the shape.
_gated_choice: dict[tuple, shape_choice.Fusion | None] = {}
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
    fn = shape_choice.take(shape_choice.remembered(_gated_choice, key, lambda: _choose(
        gated_timings, key, "decode down projection", "matmul.dense_gated", (gu2, w),
        ("unfused", lambda: _unfused(gu2, w, None)), "gated", fusion=True)))
    if fn is None or fn is shape_choice.UNSET:  # inside a capture an unchosen shape stays unfused
        return _unfused(gu, w, bias)
    y = fn(gu2, w).view(*gu.shape[:-1], w.shape[0])
    return y if bias is None else y + bias


#: (N, K, dtype, device) -> the normalised GEMV's `shape_choice.Fusion` against rms_norm_residual + `linear`, or None
#: where the GEMV cannot take the shape.
_normed_choice: dict[tuple, shape_choice.Fusion | None] = {}
#: What each timed normalised key measured, in microseconds: {"unfused_us": ..., "normed_us": ...}.
normed_timings: dict[tuple, dict[str, float]] = {}


def _norm_then_linear(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, w: torch.Tensor,
                      bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    normed, h = registry("rms_norm_residual", x, residual, weight, eps)
    return linear(normed, w, bias), h


def normed_linear(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, w: torch.Tensor,
                  bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(linear(y, w, bias), h)` for `y, h = rms_norm_residual(x, residual, weight, eps)`: a decoder layer's
    residual add and norm, then its fused q/k/v or gate/up projection. A decode step of one row (CUDA, half
    dtype, no autograd) takes the faster of that and the normalised GEMV (`matmul.dense_normed`), which
    normalises x + residual as it loads x and writes h itself: one launch fewer."""
    if residual.shape != x.shape:
        raise ValueError(f"normed_linear: residual.shape={tuple(residual.shape)} is not x.shape={tuple(x.shape)}")
    k = x.shape[-1]
    if not (_decode_shaped(x, w) and x.numel() == k and w.is_contiguous() and w.shape[1] == k):
        return _norm_then_linear(x, residual, weight, eps, w, bias)
    x2, r2 = x.reshape(1, k), residual.reshape(1, k)
    key = (w.shape[0], k, x.dtype, x.device)
    fn = shape_choice.take(shape_choice.remembered(_normed_choice, key, lambda: _choose(
        normed_timings, (1, *key), "decode normalised projection", "matmul.dense_normed", (x2, r2, weight, w, eps),
        ("unfused", lambda: _norm_then_linear(x2, r2, weight, eps, w, None)), "normed", fusion=True)))
    if fn is None or fn is shape_choice.UNSET:  # inside a capture an unchosen shape stays unfused
        return _norm_then_linear(x, residual, weight, eps, w, bias)
    y, h = fn(x2, r2, weight, w, eps)
    y = y.view(*x.shape[:-1], w.shape[0])
    return (y if bias is None else y + bias), h.view(x.shape)


def choices() -> dict[str, dict[str, object]]:
    """Per timed shape ('M<=b N=n K=k dtype', with ' gated' for `gated_linear`'s and ' normed' for
    `normed_linear`'s): the backend chosen ('gemv' or 'cublas'; 'gated', 'normed' or 'unfused') and the timings."""
    out = {f"M<={b} N={n} K={k} {str(dt).removeprefix('torch.')}":
           {"backend": "cublas" if fn is None else "gemv", **timings.get((b, n, k, dt, dev), {})}
           for (b, n, k, dt, dev), fn in _choice.items()}
    out |= {f"M<={b} N={n} K={k} {str(dt).removeprefix('torch.')} gated":
            {"backend": "gated" if choice is not None and choice.won else "unfused",
             **gated_timings.get((b, n, k, dt, dev), {})}
            for (b, n, k, dt, dev), choice in _gated_choice.items()}
    out |= {f"M<=1 N={n} K={k} {str(dt).removeprefix('torch.')} normed":
            {"backend": "normed" if choice is not None and choice.won else "unfused",
             **normed_timings.get((1, n, k, dt, dev), {})}
            for (n, k, dt, dev), choice in _normed_choice.items()}
    return out
