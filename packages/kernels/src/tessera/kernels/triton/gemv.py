"""Decode-shape (M <= 16) dense matmuls: y = x @ w.T with w in x's dtype, split along K.

cuBLAS serves a decode step's small projections far below the copy ceiling: on an H200, with a cold
L2 inside a CUDA graph, Qwen3-0.6B's o projection (K = 2048, N = 1024, 4 MiB of bf16 weights) takes
13.7 us (0.31 TB/s) and its down projection (K = 3072, N = 1024) 7.2 us
(`benchmarks/probe_linear_gemv.py`). Both have too few output columns to fill 132 SMs without
splitting K, which this kernel does, with the int8 decode kernel's machinery (`quant_gemv`): M == 1
multiplies on the CUDA cores, 1 < M <= 16 pads M to 16 for `tl.dot`, split-K partials are combined in
the same launch in split order (deterministic, capturable, no memset), and the config is chosen per
shape by CUDA-graph time (`graph_bench`), as a decode step pays it.

Larger M is cuBLAS's: the `matmul.dense` backend here refuses it, and the registry's reference
(`F.linear`) takes it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tessera.kernels.custom_ops import matmul_custom_op, normed_custom_op
from tessera.kernels.support import FLOATS, dtype_reasons, no_grad_reasons, norm_reasons, triton_device_reasons
from tessera.kernels.triton import norm, pdl, split_k
from tessera.kernels.triton.quant_gemv import Norm, gated_k, norm_args, norm_prologue, normed, rowwise_tiles
from tessera.kernels.triton.split_k import MAX_M, config
from tessera.kernels.triton.tuned_launch import TunedLaunch
from tessera.kernels.triton.tuning import autotune, bucket, dot_precision, graph_bench
from tessera.specs import KernelRegistry

# Weight bytes per program and iteration are 2 * BN * BK: from few long rows (many programs) to
# many short ones, with split-K up to 16 for the narrow N of o and down projections.
_M1 = [config(4, 512, 1, 4, 3), config(8, 256, 1, 4, 3), config(8, 512, 1, 4, 2), config(16, 256, 1, 4, 2),
       config(16, 128, 1, 4, 3), config(4, 1024, 1, 4, 2), config(32, 128, 1, 8, 2), config(4, 512, 2, 4, 3),
       config(8, 256, 2, 4, 3), config(8, 512, 2, 4, 2), config(4, 512, 4, 4, 3), config(8, 256, 4, 4, 3),
       config(16, 256, 4, 4, 2), config(8, 256, 8, 4, 3), config(16, 128, 8, 4, 3), config(8, 128, 16, 4, 3),
       config(64, 64, 4, 4, 4, True), config(64, 128, 2, 4, 3, True), config(64, 128, 1, 4, 3, True),
       config(32, 128, 4, 4, 4, True)]
_MX = [config(16, 128, 1, 4, 4), config(16, 256, 1, 4, 3), config(32, 128, 1, 4, 4), config(32, 256, 1, 4, 3),
       config(64, 64, 1, 4, 4), config(64, 128, 1, 4, 3), config(16, 256, 2, 4, 3), config(16, 128, 4, 4, 4),
       config(32, 128, 4, 4, 4), config(64, 128, 4, 4, 3), config(32, 256, 8, 4, 3), config(64, 64, 4, 4, 4),
       config(16, 256, 8, 4, 3), config(32, 128, 2, 4, 4)]
_INTERPRET = config(16, 32, 2, 4, 1)


def _prune(configs: list, named_args: dict, **kwargs: object) -> list:
    pool = _M1 if named_args["M_BUCKET"] == 1 else _MX
    no_dot = normed(named_args, kwargs)  # the tl.dot path takes no NORM
    mine = list(dict.fromkeys(c for c in configs if c in pool and not (no_dot and c.kwargs.get("M1_DOT"))))
    return split_k.keep_splittable(split_k.fits_k(mine, named_args["K"]), named_args["N"], named_args["K"])


@triton.heuristics({"EVEN": split_k.even})
@triton.jit
def dense_gemv_kernel(X, W, Y, WS, CNT, M, N, K, UP, R, NW, H, eps, stride_xm, stride_xk, stride_wn, stride_ym,
                      M_BUCKET, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                      SPLIT_K: tl.constexpr, M1_DOT: tl.constexpr = False, EVEN: tl.constexpr = False,
                      PDL: tl.constexpr = 0, GATED: tl.constexpr = False, NORM: tl.constexpr = False):
    """y[M, N] = x[M, K] @ w[N, K].T; BM == 1 (M == 1) or 16 (M <= 16); grid (N / BN, SPLIT_K). With
    BM == 1, M1_DOT takes the tl.dot path (rows padded to 16). EVEN (BN divides N, BK divides K) drops
    the bounds masks on the weight and x tiles. PDL: the launch may overlap the previous kernel (`pdl`).
    GATED: x is silu_mul(gate, up) of a fused gate/up output [M, 2K], up UP elements after the gate. NORM (M == 1,
    not M1_DOT): x is rms_norm_residual(x, R, NW, eps)'s output [1, K], and h = x + R goes to H."""
    tl.static_assert(not NORM or (BM == 1 and not M1_DOT and not GATED), "NORM takes one row, without M1_DOT")
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    k_start, k_end = split_k.k_range(K, tl.program_id(1), BK, SPLIT_K)
    # Early weights (PDL modes 3, 4): the one-row path with whole tiles loads its first tile(s), then enters.
    EARLY: tl.constexpr = PDL >= 3 and BM == 1 and EVEN and not M1_DOT
    if not EARLY:
        pdl.enter_prefetching(PDL, W, rows, rows < N, stride_wn, k_start, k_end)
        rstd = norm_prologue(X, R, H, K, eps, NORM)
    else:
        rstd = 1.0  # the path takes it after its wait
    # W doubles as the unused scale pointer.
    if BM == 1 and M1_DOT:
        rowwise_tiles(X, W, W, Y, WS, CNT, M, N, K, UP, stride_xm, stride_xk, stride_wn, stride_ym, PREC, 16, BN,
                      BK, SPLIT_K, EVEN, False, 0, GATED)
    else:
        rowwise_tiles(X, W, W, Y, WS, CNT, M, N, K, UP, stride_xm, stride_xk, stride_wn, stride_ym, PREC, BM, BN,
                      BK, SPLIT_K, EVEN, False, PDL if EARLY else 0, GATED, R, NW, H, eps, rstd, NORM)


_tuned = autotune(_M1 + _MX, key=["M_BUCKET", "N", "K", "PREC", "GATED", "NORM"], interpret=_INTERPRET,
                  prune_configs_by={"early_config_prune": _prune}, do_bench=graph_bench)(dense_gemv_kernel)
_launch = TunedLaunch(_tuned)


def launch(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, kernel: object = None, gated: bool = False,
           norm: Norm | None = None, **meta: object) -> None:
    """y[M, N] = x @ w.T (M <= 16, w contiguous, x's dtype). `kernel` defaults to the autotuned one;
    with the raw `dense_gemv_kernel`, `meta` gives BN, BK, SPLIT_K (and launch options). `gated`: x is a
    fused gate/up output [M, 2K] and the product is of silu_mul(gate, up). `norm` (M == 1, x contiguous):
    (residual, weight, h, eps), the product of rms_norm_residual's output, h written (`quant_gemv.launch_int8`)."""
    (m, n), (k, up) = (x.shape[0], w.shape[0]), gated_k(x, gated)
    extra, is_norm = norm_args(x, norm)
    mb = bucket(m)
    split = split_k.max_split(_tuned, n) if kernel is None else int(meta["SPLIT_K"])
    ws, counters = split_k.workspace(n, split, x.device)
    args = (x, w, y, ws, counters, m, n, k, up, *extra, x.stride(0), x.stride(1), w.stride(0), y.stride(0), mb)
    consts = {"PREC": dot_precision(x.dtype), "BM": 1 if m == 1 else MAX_M, "GATED": gated, "NORM": is_norm,
              **pdl.launch_options(x.device, gemv=True)}
    if kernel is None:
        _launch((mb, n, k, x.dtype, gated, is_norm), split_k.grid(n), *args, **consts)
    else:
        kernel[split_k.grid(n)](*args, **consts, **meta)


def _dense(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    y = torch.empty((x.shape[0], w.shape[0]), dtype=x.dtype, device=x.device)
    if y.numel():
        launch(x, w, y)
    return y


_op = matmul_custom_op("matmul_dense", _dense)


def _dense_gated(gu: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    y = torch.empty((gu.shape[0], w.shape[0]), dtype=gu.dtype, device=gu.device)
    if y.numel():
        launch(gu, w, y, gated=True)
    return y


_gated_op = matmul_custom_op("matmul_dense_gated", _dense_gated)


def _dense_normed(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, w: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape[0] != 1 or not w.shape[0]:
        normed, h = norm.rms_norm_residual(x, residual, weight, eps)
        return _dense(normed, w), h
    x, residual = x.contiguous(), residual.contiguous()
    y = torch.empty((1, w.shape[0]), dtype=x.dtype, device=x.device)
    h = torch.empty_like(x)
    launch(x, w, y, norm=(residual, weight, h, eps))
    return y, h


_normed_op = normed_custom_op("matmul_dense_normed", _dense_normed)


def matmul_dense_normed(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, w: torch.Tensor,
                        eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `reference.matmul_dense_normed`, for M <= 16: one row is one GEMV launch that normalises
    x + residual as it loads x and writes h; more rows are the Triton rms_norm_residual, then the GEMV. Which of
    that and the separate launches a decode step should take is `dense.normed_linear`'s choice."""
    return _normed_op(x, residual, weight, w, float(eps))


def matmul_dense_gated(gu: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Same contract as `reference.matmul_dense_gated`, for M <= 16: one launch that reads silu_mul(gate, up)
    from the fused gate/up output gu (see `supports_gated`)."""
    return _gated_op(gu, w)


def matmul_dense(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Same contract as `reference.matmul_dense`, for M <= 16 (see `supports`)."""
    return _op(x, w)


def supports(x: torch.Tensor | None = None, w: torch.Tensor | None = None) -> list[str]:
    if x is None or w is None:
        return triton_device_reasons()
    reasons = triton_device_reasons(x, w) + dtype_reasons("x", x, FLOATS) + dtype_reasons("w", w, FLOATS)
    if x.dim() != 2 or w.dim() != 2 or x.shape[-1] != w.shape[-1]:
        return [*reasons, f"x.shape={tuple(x.shape)} and w.shape={tuple(w.shape)} are not [M, K] and [N, K]"]
    if x.dtype != w.dtype:
        reasons.append(f"w.dtype={w.dtype} is not x.dtype={x.dtype}")
    if x.shape[0] > MAX_M:
        reasons.append(f"M={x.shape[0]} > {MAX_M}: a prefill-shaped product, cuBLAS's")
    if not w.is_contiguous():
        reasons.append("w is not contiguous")
    if x.stride(-1) != 1:
        reasons.append("x's last dim is not contiguous")
    return reasons + no_grad_reasons(x, w)


def supports_gated(gu: torch.Tensor | None = None, w: torch.Tensor | None = None) -> list[str]:
    if gu is None or w is None:
        return triton_device_reasons()
    if gu.dim() != 2 or w.dim() != 2 or gu.shape[-1] != 2 * w.shape[-1]:
        return [*triton_device_reasons(gu, w), f"gu.shape={tuple(gu.shape)} and w.shape={tuple(w.shape)} are not "
                "[M, 2K] and [N, K]"]
    # The plain GEMV's conditions, on one half of gu (a view with gu's strides).
    return supports(gu[:, : w.shape[-1]], w)


def supports_normed(x: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                    weight: torch.Tensor | None = None, w: torch.Tensor | None = None, eps: float = 1e-6) -> list[str]:
    if x is None or residual is None or weight is None or w is None:
        return triton_device_reasons()
    return supports(x, w) + triton_device_reasons(residual, weight) + norm_reasons(x, residual, weight)


def register(reg: KernelRegistry) -> None:
    reg.register("matmul.dense", "triton", matmul_dense, supports=supports, priority=20)
    reg.register("matmul.dense_gated", "triton", matmul_dense_gated, supports=supports_gated, priority=20)
    reg.register("matmul.dense_normed", "triton", matmul_dense_normed, supports=supports_normed, priority=20)
