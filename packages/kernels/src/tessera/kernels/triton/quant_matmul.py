"""Weight-only quantized matmuls in Triton: int8 per-channel and AWQ-style int4 with group scales/zeros.

The tiled kernels here dequantize inside the K loop, so the full-precision weight never exists in
memory: they stream 1 (int8) or 0.5 (int4) bytes per weight, which is the point at small M. int8:
the per-output-channel scale factors out of the K sum and is applied once in the epilogue. int4:
every weight is dequantized with the scale and zero of its own group (gathered per k, k // group_size),
so a K tile that spans several groups, or a K that is not a multiple of the tile, never applies one
group's scale to another group's weights.

Three paths by M, same op, same results: decode shapes (M <= 16; int4 also needs a group of whole
32-wide tiles) go to `quant_gemv`'s split-K GEMV kernels, built to stream weights at HBM bandwidth (on an
sm_90 GPU, int8 and int4 with groups of 128 go instead to the CUDA tensor-core GEMVs,
`tessera.kernels.cuda.int8_gemv` and `int4_gemv`, where a CUDA-graph timing of the shape favours them);
prefill shapes (M > 64, half-precision x) to `quant_dequant` (dequantize the weight once, then cuBLAS);
the tiled kernels here serve the rest (16 < M <= 64, float32 x, int4 groups the GEMV does not take).

Eager calls run the Python implementation directly; under torch.compile the same implementation is
reached through its `torch.library.custom_op`, so tracing sees one opaque op.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from tessera.kernels import reference, shape_choice
from tessera.kernels.custom_ops import matmul_custom_op, normed_custom_op
from tessera.kernels.support import (
    FLOATS,
    dtype_reasons,
    no_grad_reasons,
    norm_reasons,
    triton_device_reasons,
    triton_interpreting,
)
from tessera.kernels.triton import kv_cache, norm, pdl, quant_dequant, quant_gemv, rope, swiglu
from tessera.kernels.triton.tuned_launch import TunedLaunch
from tessera.kernels.triton.tuning import autotune, bucket, dot_precision
from tessera.specs import KernelRegistry

log = logging.getLogger(__name__)

_INTERPRET = triton.Config({"BM": 16, "BN": 16, "BK": 32}, num_warps=4, num_stages=1)
_CONFIGS = [
    triton.Config({"BM": 16, "BN": 16, "BK": 1024}, num_warps=8, num_stages=3),
    triton.Config({"BM": 16, "BN": 32, "BK": 1024}, num_warps=8, num_stages=3),
    triton.Config({"BM": 16, "BN": 32, "BK": 256}, num_warps=4, num_stages=4),
    triton.Config({"BM": 16, "BN": 64, "BK": 256}, num_warps=4, num_stages=4),
    triton.Config({"BM": 16, "BN": 16, "BK": 512}, num_warps=4, num_stages=3),
    triton.Config({"BM": 16, "BN": 32, "BK": 512}, num_warps=4, num_stages=3),
    triton.Config({"BM": 32, "BN": 64, "BK": 128}, num_warps=4, num_stages=4),
    triton.Config({"BM": 64, "BN": 128, "BK": 64}, num_warps=4, num_stages=4),
    triton.Config({"BM": 128, "BN": 128, "BK": 64}, num_warps=8, num_stages=3),
]


def _prune_by_m(configs: list, named_args: dict, **kwargs: object) -> list:
    # Small M (decode) wants thin M tiles and long K tiles; large M wants square tiles.
    m = named_args["M_BUCKET"]
    kept = [c for c in configs if (c.kwargs["BM"] <= 32) == (m <= 32)]
    return kept or configs[:1]


@autotune(_CONFIGS, key=["M_BUCKET", "N", "K", "PREC"], interpret=_INTERPRET,
          prune_configs_by={"early_config_prune": _prune_by_m})
@triton.jit
def _int8_kernel(X, W, S, Y, M, N, K, stride_xm, stride_xk, stride_wn, stride_ym, M_BUCKET, PREC: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k_ok = (k0 + offs_k) < K
        x = tl.load(X + offs_m[:, None].to(tl.int64) * stride_xm + (k0 + offs_k)[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(W + offs_n[None, :].to(tl.int64) * stride_wn + (k0 + offs_k)[:, None],
                    mask=n_ok[None, :] & k_ok[:, None], other=0)
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=PREC)
    scale = tl.load(S + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    y = acc * scale[None, :]
    tl.store(Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], y.to(Y.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _grid(m: int, n: int):
    return lambda meta: (triton.cdiv(n, meta["BN"]), triton.cdiv(m, meta["BM"]))


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _int8(x: torch.Tensor, w_q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    m, k = x.shape
    n = w_q.shape[0]
    w_q, scale = w_q.contiguous(), scale.contiguous()
    if m and n and quant_dequant.serves(m, x.dtype):
        return quant_dequant.int8_mm(x, w_q, scale)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m and n and quant_gemv.serves_int8(m):
        _int8_gemv(x, w_q, scale, y)
    elif m and n:
        mb = bucket(m)
        _int8_launch((mb, n, k, x.dtype, scale.dtype), _grid(m, n), x, w_q, scale, y, m, n, k, x.stride(0),
                     x.stride(1), w_q.stride(0), y.stride(0), mb, PREC=dot_precision(x.dtype))
    return y


_int8_launch = TunedLaunch(_int8_kernel)
_int8_op = matmul_custom_op("matmul_int8_weight_only", _int8)


def matmul_int8_weight_only(x: torch.Tensor, w_q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Same contract as `reference.matmul_int8_weight_only`."""
    return _int8_op(x, w_q, scale)


@autotune(_CONFIGS, key=["M_BUCKET", "N", "K", "GROUP", "PREC"], interpret=_INTERPRET,
          prune_configs_by={"early_config_prune": _prune_by_m})
@triton.jit
def _int4_kernel(X, QW, S, Z, Y, M, N, K, stride_xm, stride_xk, stride_qn, stride_sn, stride_zn, stride_ym,
                 M_BUCKET, GROUP: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 BK: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    m_ok = offs_m < M
    n_ok = offs_n < N
    n64 = offs_n.to(tl.int64)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + offs_k
        k_ok = ks < K
        x = tl.load(X + offs_m[:, None].to(tl.int64) * stride_xm + ks[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        packed = tl.load(QW + n64[None, :] * stride_qn + (ks // 2)[:, None], mask=n_ok[None, :] & k_ok[:, None],
                         other=0)
        q = ((packed >> ((ks % 2) * 4)[:, None].to(tl.uint8)) & 0xF).to(tl.float32)
        g = (ks // GROUP)[:, None]
        gmask = n_ok[None, :] & k_ok[:, None]
        s = tl.load(S + n64[None, :] * stride_sn + g, mask=gmask, other=0.0).to(tl.float32)
        z = tl.load(Z + n64[None, :] * stride_zn + g, mask=gmask, other=0.0).to(tl.float32)
        w = (q - z) * s
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=PREC)
    tl.store(Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _int4(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
          group_size: int) -> torch.Tensor:
    m, k = x.shape
    n = qweight.shape[0]
    qweight, scales, zeros = _rows(qweight), _rows(scales), _rows(zeros)
    if m and n and quant_dequant.serves(m, x.dtype):
        return quant_dequant.int4_mm(x, qweight, scales, zeros, group_size)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m and n and quant_gemv.serves_int4(m, group_size):
        _int4_gemv(x, qweight, scales, zeros, group_size, y)
    elif m and n:
        mb = bucket(m)
        _int4_launch((mb, n, k, group_size, x.dtype, scales.dtype, zeros.dtype), _grid(m, n), x, qweight, scales,
                     zeros, y, m, n, k, x.stride(0), x.stride(1), qweight.stride(0), scales.stride(0), zeros.stride(0),
                     y.stride(0), mb, GROUP=group_size, PREC=dot_precision(x.dtype))
    return y


_int4_launch = TunedLaunch(_int4_kernel)
_int4_op = matmul_custom_op("matmul_int4_awq", _int4)

#: How closely a CUDA GEMV must agree with the Triton one on a shape before it is taken: the ops' tolerances
#: (`matmul.int8_weight_only`, `matmul.int4_awq`), per dtype.
_CUDA_AGREEMENT = {torch.bfloat16: 3e-2, torch.float16: 1e-2}
#: Per decode shape (`_shape_key`: int8 or int4, M bucket, N, K, int4's group, dtype): the (rows_per_block, warps,
#: loop) of the CUDA tensor-core GEMV where it beat the Triton GEMV, else None; and the times (us) of the two.
_cuda_gemv: dict[tuple, tuple[int, int, bool] | None] = {}
cuda_gemv_timings: dict[tuple, dict[str, float]] = {}

#: A decode GEMV launcher writing into y: the Triton one takes y; the CUDA one y, a config and its `pdl`.
TritonGemv = Callable[[torch.Tensor], None]
CudaGemv = Callable[[torch.Tensor, tuple[int, int, bool], int], None]


def _shape_key(op: str, m: int, n: int, k: int, dtype: torch.dtype, group_size: int | None = None) -> tuple:
    """A decode shape's key in the per-shape choice tables ('int8'/'int4', M bucket, N, K, int4's group, dtype);
    `_label` prints it."""
    group = () if group_size is None else (f"g={group_size}",)
    return (op, f"M<={bucket(m)}", f"N={n}", f"K={k}", *group, dtype)


def _cuda_pdl(device: torch.device) -> int:
    """The CUDA GEMV's `pdl` argument for the PDL mode a Triton GEMV would launch with here: 3 (weights
    before the wait) for modes 3 and 4, 1 for modes 1 and 2, else 0."""
    mode = int(pdl.launch_options(device, gemv=True)["PDL"])
    return 3 if mode >= pdl.EARLY else (1 if mode else 0)


def _int8_gemv(x: torch.Tensor, w_q: torch.Tensor, scale: torch.Tensor, y: torch.Tensor) -> None:
    """y = the M <= 16 int8 product: the Triton GEMV or the CUDA tensor-core one (`_decode_gemv`)."""
    from tessera.kernels import cuda

    _decode_gemv(_shape_key("int8", x.shape[0], w_q.shape[0], x.shape[1], x.dtype), x,
                 lambda: cuda.int8_gemv_reasons(x, w_q, scale), lambda: cuda.int8_gemv_configs(*x.shape),
                 lambda out: quant_gemv.launch_int8(x, w_q, scale, out),
                 lambda out, config, mode: cuda.int8_gemv(x, w_q, scale, out, *config, pdl=mode), y)


def _int4_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
               y: torch.Tensor, gated: bool = False, norm: quant_gemv.Norm | None = None) -> None:
    """y = the M <= 16 int4 product: the Triton GEMV or the CUDA tensor-core one (`_decode_gemv`). The x multiplied
    may be formed as the GEMV loads it: gated (x a fused gate/up output) or normalised (`norm`); the CUDA GEMV
    takes those for one row, and their choices are keyed 'int4 gated' / 'int4 normed', apart from the plain one's."""
    from tessera.kernels import cuda

    k = 2 * qweight.shape[1]  # the product's K (two codes a byte), half a gated x's width
    op = "int4 gated" if gated else "int4 normed" if norm is not None else "int4"
    key = _shape_key(op, x.shape[0], qweight.shape[0], k, x.dtype, group_size)
    _decode_gemv(key, x, lambda: cuda.int4_gemv_reasons(x, qweight, scales, zeros, group_size, gated, norm),
                 lambda: cuda.int4_gemv_configs(x.shape[0], k),
                 lambda out: quant_gemv.launch_int4(x, qweight, scales, zeros, group_size, out, gated=gated, norm=norm),
                 lambda out, config, mode: cuda.int4_gemv(x, qweight, scales, zeros, out, *config, pdl=mode,
                                                          gated=gated, norm=norm), y)


def _decode_gemv(key: tuple, x: torch.Tensor, cuda_reasons: Callable[[], list[str]],
                 cuda_configs: Callable[[], tuple[tuple[int, int, bool], ...]], triton_gemv: TritonGemv,
                 cuda_gemv: CudaGemv, y: torch.Tensor) -> None:
    """Writes y with the Triton GEMV (`quant_gemv`), or with the CUDA tensor-core GEMV (`tessera.kernels.cuda`)
    where it takes the inputs (sm_90, ...) and a CUDA-graph timing of the shape, made at its first call outside
    a capture, favoured it."""
    if x.is_cuda and not triton_interpreting():
        # a shape decided for the Triton GEMV skips the CUDA kernel's input checks
        if _cuda_gemv.get(key, shape_choice.UNSET) is not None and not cuda_reasons():
            config = shape_choice.remembered(
                _cuda_gemv, key, lambda: _choose_cuda_gemv(key, x, cuda_configs(), _filling(triton_gemv, y), cuda_gemv,
                                                           y))
            if config is not shape_choice.UNSET and config is not None:
                cuda_gemv(y, config, _cuda_pdl(x.device))
                return
    triton_gemv(y)


def _filling(gemv: TritonGemv, like: torch.Tensor) -> Callable[[], torch.Tensor]:
    """`gemv` as a baseline for `_choose_cuda_gemv`: it fills a tensor of its own (made once), which it returns."""
    out = torch.empty_like(like)

    def run() -> torch.Tensor:
        gemv(out)
        return out

    return run


def _choose_cuda_gemv(key: tuple, x: torch.Tensor, configs: tuple[tuple[int, int, bool], ...],
                      baseline: Callable[[], torch.Tensor], cuda_gemv: CudaGemv, y: torch.Tensor,
                      names: tuple[str, str] = ("triton", "cuda"), baseline_timed: Callable[[], object] | None = None,
                      fusion: bool = False) -> tuple[int, int, bool] | shape_choice.Fusion | None:
    """The CUDA GEMV's fastest config for this shape if it beats `baseline` (the tuned Triton GEMV, or what
    else computes y; it returns its result) in CUDA-graph time, else None; None too, with a warning, when the
    extension does not build or the GEMV disagrees. `fusion` (a GEMV that replaces several launches): a
    `shape_choice.Fusion` of the config and whether it won, whichever did. `baseline_timed`, where given, is what
    is timed instead of `baseline` (the same launches without assembling y). The times go to `cuda_gemv_timings`
    under `names` (the baseline's, the CUDA GEMV's)."""
    from tessera.kernels import cuda
    from tessera.kernels.triton.tuning import graph_bench

    what = f"decode GEMV {_label(key)}"
    start = time.perf_counter()
    try:
        cuda.load()
    except Exception as exc:  # any build failure leaves the Triton GEMV in place
        log.warning("%s: the CUDA extension did not build (%s); the Triton GEMV stays", what, exc)
        return None
    mode = _cuda_pdl(x.device)
    times = {c: graph_bench(lambda c=c: cuda_gemv(y, c, mode)) for c in configs}
    best = min(times, key=times.get)
    # A kernel that disagrees with the baseline on this shape is never taken, whatever its time.
    want = baseline()
    cuda_gemv(y, best, mode)
    tol = _CUDA_AGREEMENT[x.dtype]
    if not torch.allclose(y, want, atol=tol, rtol=tol):
        log.warning("%s: the CUDA GEMV differs from the %s path by up to %.3g; not taken", what, names[0],
                    (y.float() - want.float()).abs().max().item())
        return None
    won = shape_choice.faster(what, start, cuda_gemv_timings, key, (names[0], baseline_timed or baseline),
                              (names[1], lambda: cuda_gemv(y, best, mode)))
    cuda_gemv_timings[key]["cuda_config"] = list(best)
    if fusion:
        return shape_choice.Fusion(best, won)
    return best if won else None


def cuda_gemv_choices() -> dict[str, dict[str, object]]:
    """Per timed int8 and int4 decode shape: 'cuda' (the tensor-core GEMV) or 'triton', and the times; per timed
    SwiGLU shape ('int4 swiglu ...'): 'cuda' (silu_mul stored by the GEMV) or 'unfused' (GEMV, then silu_mul); per
    timed q/k/v shape with rope ('int4 qkv rope ...'): 'cuda' (rope and cache write in the GEMV) or 'unfused'."""
    out = {_label(key): {"backend": "triton" if config is None else "cuda", **cuda_gemv_timings.get(key, {})}
           for key, config in _cuda_gemv.items() if config is not shape_choice.UNSET}
    out.update({_label(key): {"backend": "cuda" if choice is not None and choice.won else "unfused",
                              **cuda_gemv_timings.get(key, {})}
                for table in (_swiglu_gemv, _rope_gemv) for key, choice in table.items()})
    return out


def matmul_int4_awq(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int) -> torch.Tensor:
    """Same contract as `reference.matmul_int4_awq` (any positive group_size)."""
    return _int4_op(x, qweight, scales, zeros, int(group_size))


def _halves(gu: torch.Tensor) -> torch.Tensor:
    """silu_mul of a fused gate/up output's halves (the Triton op): what a gated matmul multiplies."""
    k = gu.shape[1] // 2
    return swiglu.silu_mul(gu[:, :k], gu[:, k:])


#: Per decode shape: the gated GEMV's `shape_choice.Fusion` against silu_mul + the plain GEMV, and both times (us).
_gated_wins: dict[tuple, shape_choice.Fusion] = {}
gated_timings: dict[tuple, dict[str, float]] = {}
#: Per decode shape: the normalised GEMV's Fusion against rms_norm_residual + the plain GEMV, and both times (us).
_normed_wins: dict[tuple, shape_choice.Fusion] = {}
normed_timings: dict[tuple, dict[str, float]] = {}


def _label(key: tuple) -> str:
    return " ".join(str(v) for v in key[:-1]) + f" {str(key[-1]).removeprefix('torch.')}"


def _prefer_fused(wins: dict, timings: dict, what: str, names: tuple[str, str], key: tuple, device: torch.device,
                  fused: Callable[[], object], unfused: Callable[[], object]) -> bool:
    """Whether a decode shape takes a fused GEMV (gated or normalised, `names`[1]) rather than the separate
    launches (`names`[0]): the faster of the two (`shape_choice`), chosen at the shape's first call and kept
    in `wins` (a `shape_choice.Fusion`), the times in `timings`; the fused one under the "always" fusion policy
    (`shape_choice.take`). Always fused off CUDA (the interpreter, for tests); never chosen inside a capture, where
    the shape stays unfused."""
    if device.type != "cuda":
        return True

    def choose() -> shape_choice.Fusion:
        start = time.perf_counter()
        fused()
        unfused()  # both tuned before they are timed
        return shape_choice.Fusion(True, shape_choice.faster(f"{what}, {_label(key)}", start, timings, key,
                                                             (names[0], unfused), (names[1], fused)))

    return shape_choice.take(shape_choice.remembered(wins, key, choose)) is True


def gated_choices() -> dict[str, dict[str, object]]:
    """Per timed shape ('int8 M<=b N=n K=k', 'int4 ... g=G'): gated GEMV or silu_mul + GEMV, and the times."""
    return {_label(key): {"backend": "gated" if choice.won else "unfused", **gated_timings.get(key, {})}
            for key, choice in _gated_wins.items()}


def normed_choices() -> dict[str, dict[str, object]]:
    """Per timed shape: normalised GEMV or rms_norm_residual + GEMV ('normed' or 'unfused'), and the times."""
    return {_label(key): {"backend": "normed" if choice.won else "unfused", **normed_timings.get(key, {})}
            for key, choice in _normed_wins.items()}


def _gated_or_unfused(gu: torch.Tensor, n: int, key: tuple, launch: Callable[[torch.Tensor], None],
                      plain: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """A decode-shaped gated matmul: `launch(y)` fills y [M, N] through the gated GEMV, `plain(x)` is the plain
    op; whichever `_prefer_fused` picks for `key` runs."""
    y = torch.empty((gu.shape[0], n), dtype=gu.dtype, device=gu.device)

    def gated() -> torch.Tensor:
        launch(y)
        return y

    def unfused() -> torch.Tensor:
        return plain(_halves(gu))

    fused = _prefer_fused(_gated_wins, gated_timings, "decode down projection", ("unfused", "gated"), key,
                          gu.device, gated, unfused)
    return gated() if fused else unfused()


#: Per SwiGLU decode shape ('int4 swiglu', M bucket, 2N, K, group, dtype): the CUDA GEMV's `shape_choice.Fusion`
#: (its config, and whether storing silu_mul from it beat the GEMV and a silu_mul launch), or None where it cannot
#: run (times in `cuda_gemv_timings`).
_swiglu_gemv: dict[tuple, shape_choice.Fusion | None] = {}


def _int4_swiglu(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int) -> torch.Tensor:
    """silu_mul of the halves of x's int4 product with a fused gate/up weight: at a decode shape on sm_90, the
    CUDA tensor-core GEMV storing it where a CUDA-graph timing of the shape (made at its first call outside a
    capture) favours that over the plain op and the Triton silu_mul; else those two."""
    m, n2 = x.shape[0], qweight.shape[0]
    if n2 % 2:
        raise ValueError(f"qweight.shape={tuple(qweight.shape)}: a fused gate/up weight has an even row count")

    def unfused() -> torch.Tensor:
        return _halves(_int4(x, qweight, scales, zeros, group_size))

    if not (m and n2 and x.is_cuda and not triton_interpreting() and quant_gemv.serves_int4(m, group_size)):
        return unfused()
    from tessera.kernels import cuda

    qweight, scales, zeros = _rows(qweight), _rows(scales), _rows(zeros)
    key = _shape_key("int4 swiglu", m, n2, 2 * qweight.shape[1], x.dtype, group_size)
    # a shape decided for the two launches skips the CUDA kernel's input checks
    if shape_choice.take(_swiglu_gemv.get(key, shape_choice.UNSET)) is None or cuda.int4_gemv_reasons(
            x, qweight, scales, zeros, group_size, swiglu=True):
        return unfused()
    y = torch.empty((m, n2 // 2), dtype=x.dtype, device=x.device)

    def launch(out: torch.Tensor, config: tuple[int, int, bool], mode: int) -> None:
        cuda.int4_gemv(x, qweight, scales, zeros, out, *config, pdl=mode, swiglu=True)

    config = shape_choice.take(shape_choice.remembered(
        _swiglu_gemv, key, lambda: _choose_cuda_gemv(key, x, cuda.int4_gemv_configs(*x.shape), unfused, launch, y,
                                                     ("unfused", "cuda"), fusion=True)))
    if config is shape_choice.UNSET or config is None:
        return unfused()
    launch(y, config, _cuda_pdl(x.device))
    return y


_int4_swiglu_op = matmul_custom_op("matmul_int4_awq_swiglu", _int4_swiglu, rows_per_output=2)


def matmul_int4_awq_swiglu(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                           group_size: int) -> torch.Tensor:
    """Same contract as `reference.matmul_int4_awq_swiglu` (see `_int4_swiglu`)."""
    return _int4_swiglu_op(x, qweight, scales, zeros, int(group_size))


#: Per decode shape of the q/k/v GEMV with rope and the cache write ('int4 qkv rope', M bucket, N, K, group, dtype):
#: the CUDA GEMV's `shape_choice.Fusion` against the GEMV, the rope and the cache-write launches, or None where it
#: cannot run (times in `cuda_gemv_timings`).
_rope_gemv: dict[tuple, shape_choice.Fusion | None] = {}


def _int4_qkv_rope(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   group_size: int, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slot_mapping: torch.Tensor, n_q_heads: int, n_kv_heads: int) -> torch.Tensor:
    """The rotated q of a fused q/k/v int4 projection, its k and v rotated and written to the caches: at a decode
    shape on sm_90, the CUDA tensor-core GEMV doing the rope and the write in its epilogue where a CUDA-graph
    timing of the shape (at its first call outside a capture) favours that over the plain op, the Triton rope and
    the Triton cache write; else those three."""
    m, n = x.shape[0], qweight.shape[0]
    if n_q_heads < 0 or n_kv_heads < 1 or n % (n_q_heads + 2 * n_kv_heads):
        raise ValueError(f"qweight.shape={tuple(qweight.shape)} is not [(n_q_heads + 2 n_kv_heads) * head_dim, K / 2] "
                         f"for n_q_heads={n_q_heads}, n_kv_heads={n_kv_heads}")

    def unfused_heads() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = reference.qkv_heads(_int4(x, qweight, scales, zeros, group_size), n_q_heads, n_kv_heads)
        q, k = rope.rope(q, k, cos, sin)
        kv_cache.kv_cache_write(k, v, k_cache, v_cache, slot_mapping)
        return q, k, v

    def unfused() -> torch.Tensor:
        return unfused_heads()[0]

    if not (m and x.is_cuda and not triton_interpreting() and quant_gemv.serves_int4(m, group_size)):
        return unfused()
    from tessera.kernels import cuda

    qweight, scales, zeros = _rows(qweight), _rows(scales), _rows(zeros)
    key = _shape_key("int4 qkv rope", m, n, 2 * qweight.shape[1], x.dtype, group_size)
    # a shape decided for the separate launches skips the CUDA kernel's input checks
    if shape_choice.take(_rope_gemv.get(key, shape_choice.UNSET)) is None or cuda.int4_gemv_rope_reasons(
            x, qweight, scales, zeros, cos, sin, k_cache, v_cache, slot_mapping, n_q_heads, n_kv_heads):
        return unfused()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)

    def launch(out: torch.Tensor, config: tuple[int, int, bool], mode: int) -> None:
        cuda.int4_gemv_rope(x, qweight, scales, zeros, out, cos, sin, k_cache, v_cache, slot_mapping, n_q_heads,
                            n_kv_heads, *config, pdl=mode)

    def whole_unfused() -> torch.Tensor:  # what the GEMV's y is checked against: q, and k and v as written
        return torch.cat(unfused_heads(), dim=1).view(m, n)

    def choose() -> shape_choice.Fusion | None:
        configs = cuda.int4_gemv_configs(*x.shape)
        if not _rope_writes_agree(x, qweight, scales, zeros, group_size, cos, sin, k_cache, n_q_heads, n_kv_heads,
                                  configs, key):
            return None
        return _choose_cuda_gemv(key, x, configs, whole_unfused, launch, y, ("unfused", "cuda"), baseline_timed=unfused,
                                 fusion=True)

    config = shape_choice.take(shape_choice.remembered(_rope_gemv, key, choose))
    if config is shape_choice.UNSET or config is None:
        return unfused()
    launch(y, config, _cuda_pdl(x.device))
    return reference.qkv_heads(y, n_q_heads, n_kv_heads)[0]


def _rope_writes_agree(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                       group_size: int, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, n_q_heads: int,
                       n_kv_heads: int, configs: tuple[tuple[int, int, bool], ...], key: tuple) -> bool:
    """Whether every config of the CUDA q/k/v rope GEMV writes what the separate ops write, and nothing else, into
    scratch caches of one block a token (slot t for token t, padded with rows that must stay zero): the choice's
    agreement check compares y only, and a write to a wrong slot of the real cache would corrupt another sequence
    unseen. Logs and returns False on the first difference."""
    from tessera.kernels import cuda

    m = x.shape[0]
    d = k_cache.shape[-1]
    shape = (m + 1, 2, n_kv_heads, d)  # two rows a block: every odd row and the last block stay untouched
    slots = torch.arange(m, device=x.device, dtype=torch.int64) * 2
    want_k, want_v = torch.zeros(shape, dtype=x.dtype, device=x.device), torch.zeros(shape, dtype=x.dtype,
                                                                                       device=x.device)
    q, k, v = reference.qkv_heads(_int4(x, qweight, scales, zeros, group_size), n_q_heads, n_kv_heads)
    q, k = rope.rope(q, k, cos, sin)
    kv_cache.kv_cache_write(k, v, want_k, want_v, slots)
    y = torch.empty((m, qweight.shape[0]), dtype=x.dtype, device=x.device)
    tol = _CUDA_AGREEMENT[x.dtype]
    for config in configs:
        got_k, got_v = torch.zeros_like(want_k), torch.zeros_like(want_v)
        cuda.int4_gemv_rope(x, qweight, scales, zeros, y, cos, sin, got_k, got_v, slots, n_q_heads, n_kv_heads,
                            *config, pdl=0)
        for name, got, want in (("k_cache", got_k, want_k), ("v_cache", got_v, want_v)):
            if not torch.allclose(got, want, atol=tol, rtol=tol) or bool((got[:, 1:] != 0).any()) or bool(
                    (got[m:] != 0).any()):
                log.warning("decode GEMV %s, config %s: the %s it writes differs from the separate ops' by up to %.3g; "
                            "not taken", _label(key), config, name, (got.float() - want.float()).abs().max().item())
                return False
    return True


def matmul_int4_awq_qkv_rope(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                             group_size: int, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                             v_cache: torch.Tensor, slot_mapping: torch.Tensor, n_q_heads: int,
                             n_kv_heads: int) -> torch.Tensor:
    """Same contract as `reference.matmul_int4_awq_qkv_rope` (see `_int4_qkv_rope`)."""
    return _int4_qkv_rope(x, qweight, scales, zeros, int(group_size), cos, sin, k_cache, v_cache, slot_mapping,
                          int(n_q_heads), int(n_kv_heads))


#: Per decode shape of the int8 q/k/v GEMV with rope and the cache write ('int8 qkv rope', M bucket, N, K, dtype):
#: whether it beat the plain op, the Triton rope and the Triton cache write, and both times (us).
_rope_wins: dict[tuple, shape_choice.Fusion] = {}
rope_timings: dict[tuple, dict[str, float]] = {}


def _int8_qkv_rope(x: torch.Tensor, w_q: torch.Tensor, scale: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, n_q_heads: int,
                   n_kv_heads: int) -> torch.Tensor:
    """The rotated q of a fused q/k/v int8 projection, its k and v rotated and written to the caches: at a decode
    shape, the Triton GEMV doing the rope and the write in its epilogue (`quant_gemv.combine_and_rope`) where a
    CUDA-graph timing of the shape (`_prefer_fused`) favours it over the plain op, the Triton rope and the Triton
    cache write; else those three."""
    m, n = x.shape[0], w_q.shape[0]
    if n_q_heads < 0 or n_kv_heads < 1 or n % (n_q_heads + 2 * n_kv_heads):
        raise ValueError(f"w_q.shape={tuple(w_q.shape)} is not [(n_q_heads + 2 n_kv_heads) * head_dim, K] for "
                         f"n_q_heads={n_q_heads}, n_kv_heads={n_kv_heads}")

    def unfused() -> torch.Tensor:
        q, k, v = reference.qkv_heads(_int8(x, w_q, scale), n_q_heads, n_kv_heads)
        q, k = rope.rope(q, k, cos, sin)
        kv_cache.kv_cache_write(k, v, k_cache, v_cache, slot_mapping)
        return q

    heads = (cos, sin, k_cache, v_cache, slot_mapping, n_q_heads, n_kv_heads)
    if not (m and quant_gemv.serves_int8(m)) or quant_gemv.rope_reasons(x, n, heads):
        return unfused()
    w_q, scale = w_q.contiguous(), scale.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)

    def fused() -> torch.Tensor:
        quant_gemv.launch_int8(x, w_q, scale, y, rope=heads)
        return reference.qkv_heads(y, n_q_heads, n_kv_heads)[0]

    key = _shape_key("int8 qkv rope", m, n, w_q.shape[1], x.dtype)
    if _prefer_fused(_rope_wins, rope_timings, "decode q/k/v projection with rope", ("unfused", "rope"), key,
                     x.device, fused, unfused):
        return fused()
    return unfused()


def matmul_int8_weight_only_qkv_rope(x: torch.Tensor, w_q: torch.Tensor, scale: torch.Tensor, cos: torch.Tensor,
                                     sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                     slot_mapping: torch.Tensor, n_q_heads: int, n_kv_heads: int) -> torch.Tensor:
    """Same contract as `reference.matmul_int8_weight_only_qkv_rope` (see `_int8_qkv_rope`)."""
    return _int8_qkv_rope(x, w_q, scale, cos, sin, k_cache, v_cache, slot_mapping, int(n_q_heads), int(n_kv_heads))


def rope_choices() -> dict[str, dict[str, object]]:
    """Per timed int8 q/k/v shape ('int8 qkv rope M<=b N=n K=k dtype'): the GEMV with rope and the cache write in
    its epilogue ('rope') or the separate launches ('unfused'), and the times."""
    return {_label(key): {"backend": "rope" if choice.won else "unfused", **rope_timings.get(key, {})}
            for key, choice in _rope_wins.items()}


def _int8_gated(gu: torch.Tensor, w_q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    m, n = gu.shape[0], w_q.shape[0]
    if not (m and n and quant_gemv.serves_int8(m)):
        return _int8(_halves(gu), w_q, scale)
    w_q, scale = w_q.contiguous(), scale.contiguous()
    key = _shape_key("int8", m, n, w_q.shape[1], gu.dtype)
    return _gated_or_unfused(gu, n, key, lambda y: quant_gemv.launch_int8(gu, w_q, scale, y, gated=True),
                             lambda x: _int8(x, w_q, scale))


def _int4_gated(gu: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int) -> torch.Tensor:
    m, n = gu.shape[0], qweight.shape[0]
    if not (m and n and quant_gemv.serves_int4(m, group_size)):
        return _int4(_halves(gu), qweight, scales, zeros, group_size)
    qweight, scales, zeros = _rows(qweight), _rows(scales), _rows(zeros)
    key = _shape_key("int4", m, n, 2 * qweight.shape[1], gu.dtype, group_size)
    return _gated_or_unfused(
        gu, n, key, lambda y: _int4_gemv(gu, qweight, scales, zeros, group_size, y, gated=True),
        lambda x: _int4(x, qweight, scales, zeros, group_size))


_int8_gated_op = matmul_custom_op("matmul_int8_weight_only_gated", _int8_gated)
_int4_gated_op = matmul_custom_op("matmul_int4_awq_gated", _int4_gated)


def matmul_int8_weight_only_gated(gu: torch.Tensor, w_q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Same contract as `reference.matmul_int8_weight_only_gated`: at decode shapes one GEMV launch that reads
    silu_mul(gate, up) from gu where that beats silu_mul + the plain GEMV (`_prefer_fused`), else the Triton
    silu_mul and then the plain op."""
    return _int8_gated_op(gu, w_q, scale)


def matmul_int4_awq_gated(gu: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                          group_size: int) -> torch.Tensor:
    """Same contract as `reference.matmul_int4_awq_gated` (see `matmul_int8_weight_only_gated`)."""
    return _int4_gated_op(gu, qweight, scales, zeros, int(group_size))


def _normed_or_unfused(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, n: int, key: tuple,
                       launch: Callable[[torch.Tensor, quant_gemv.Norm], None] | None,
                       plain: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(plain(rms_norm_residual(x, residual, weight, eps)'s output), h): with `launch` (a one-row decode
    shape), `launch(y, norm)` fills y [1, N] and h through the normalised GEMV where that beats the Triton
    rms_norm_residual + `plain` for `key`; without it, always the two launches."""

    def unfused() -> tuple[torch.Tensor, torch.Tensor]:
        normed, h = norm.rms_norm_residual(x, residual, weight, eps)
        return plain(normed), h

    if launch is None:
        return unfused()
    x, residual = x.contiguous(), residual.contiguous()
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    h = torch.empty_like(x)

    def fused() -> tuple[torch.Tensor, torch.Tensor]:
        launch(y, (residual, weight, h, eps))
        return y, h

    chosen = _prefer_fused(_normed_wins, normed_timings, "decode normalised projection", ("unfused", "normed"),
                           key, x.device, fused, unfused)
    return fused() if chosen else unfused()


def _int8_normed(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, w_q: torch.Tensor,
                 scale: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    m, n = x.shape[0], w_q.shape[0]
    w_q, scale = w_q.contiguous(), scale.contiguous()
    key = _shape_key("int8", m, n, w_q.shape[1], x.dtype)
    one_row = m == 1 and n > 0 and quant_gemv.serves_int8(m)
    return _normed_or_unfused(
        x, residual, weight, eps, n, key,
        (lambda y, nm: quant_gemv.launch_int8(x, w_q, scale, y, norm=nm)) if one_row else None,
        lambda xn: _int8(xn, w_q, scale))


def _int4_normed(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, qweight: torch.Tensor,
                 scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    m, n = x.shape[0], qweight.shape[0]
    qweight, scales, zeros = _rows(qweight), _rows(scales), _rows(zeros)
    key = _shape_key("int4", m, n, 2 * qweight.shape[1], x.dtype, group_size)
    one_row = m == 1 and n > 0 and quant_gemv.serves_int4(m, group_size)
    return _normed_or_unfused(
        x, residual, weight, eps, n, key,
        (lambda y, nm: _int4_gemv(x, qweight, scales, zeros, group_size, y, norm=nm)) if one_row else None,
        lambda xn: _int4(xn, qweight, scales, zeros, group_size))


_int8_normed_op = normed_custom_op("matmul_int8_weight_only_normed", _int8_normed)
_int4_normed_op = normed_custom_op("matmul_int4_awq_normed", _int4_normed)


def matmul_int8_weight_only_normed(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, w_q: torch.Tensor,
                                   scale: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `reference.matmul_int8_weight_only_normed`: for one row, one GEMV launch that normalises
    x + residual as it loads x (and writes h) where that beats the Triton rms_norm_residual + the plain op
    (`_prefer_fused`); else those two."""
    return _int8_normed_op(x, residual, weight, w_q, scale, float(eps))


def matmul_int4_awq_normed(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, qweight: torch.Tensor,
                           scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                           eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `reference.matmul_int4_awq_normed` (see `matmul_int8_weight_only_normed`)."""
    return _int4_normed_op(x, residual, weight, qweight, scales, zeros, int(group_size), float(eps))


def _x_reasons(x: torch.Tensor, n_k: int, gated: bool = False) -> list[str]:
    name = "gu" if gated else "x"
    reasons = dtype_reasons(name, x, FLOATS)
    width = 2 * n_k if gated else n_k
    if x.dim() != 2 or x.shape[1] != width:
        reasons.append(f"{name}.shape={tuple(x.shape)} is not [M, {width}]")
    return reasons


def supports_int8(x: torch.Tensor | None = None, w_q: torch.Tensor | None = None,
                  scale: torch.Tensor | None = None, gated: bool = False) -> list[str]:
    if x is None or w_q is None or scale is None:
        return triton_device_reasons()
    reasons = triton_device_reasons(x, w_q, scale) + dtype_reasons("w_q", w_q, (torch.int8,))
    reasons += _x_reasons(x, w_q.shape[-1], gated) + dtype_reasons("scale", scale, FLOATS)
    if scale.shape != w_q.shape[:1]:
        reasons.append(f"scale.shape={tuple(scale.shape)} is not [N={w_q.shape[0]}]")
    return reasons + no_grad_reasons(x)


def supports_int4(x: torch.Tensor | None = None, qweight: torch.Tensor | None = None,
                  scales: torch.Tensor | None = None, zeros: torch.Tensor | None = None,
                  group_size: int = 128, gated: bool = False) -> list[str]:
    if x is None or qweight is None or scales is None or zeros is None:
        return triton_device_reasons()
    reasons = triton_device_reasons(x, qweight, scales, zeros) + dtype_reasons("qweight", qweight, (torch.uint8,))
    k = 2 * qweight.shape[-1]
    reasons += _x_reasons(x, k, gated)
    if group_size < 1:
        reasons.append(f"group_size={group_size} is not positive")
    else:
        groups = -(-k // group_size)
        for name, t in (("scales", scales), ("zeros", zeros)):
            if t.shape != (qweight.shape[0], groups):
                reasons.append(f"{name}.shape={tuple(t.shape)} is not [N, ceil(K / group_size)={groups}]")
    return reasons + no_grad_reasons(x)


def supports_int4_swiglu(x: torch.Tensor | None = None, qweight: torch.Tensor | None = None,
                         scales: torch.Tensor | None = None, zeros: torch.Tensor | None = None,
                         group_size: int = 128) -> list[str]:
    reasons = supports_int4(x, qweight, scales, zeros, group_size)
    if qweight is not None and qweight.shape[0] % 2:
        reasons.append(f"qweight.shape={tuple(qweight.shape)} is not a fused gate/up weight (an even row count)")
    return reasons


def _qkv_rope_reasons(x: torch.Tensor, rows: int, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slot_mapping: torch.Tensor, n_q_heads: int, n_kv_heads: int) -> list[str]:
    """Why a fused q/k/v weight of `rows` rows and these rope tables, caches and slots do not fit together."""
    reasons = triton_device_reasons(cos, sin, k_cache, v_cache, slot_mapping)
    heads = n_q_heads + 2 * n_kv_heads
    if n_q_heads < 0 or n_kv_heads < 1 or rows % heads:
        return [*reasons, f"the weight's {rows} rows are not (n_q_heads + 2 n_kv_heads) * head_dim for "
                f"n_q_heads={n_q_heads}, n_kv_heads={n_kv_heads}"]
    d = rows // heads
    if d % 2 or cos.shape != (x.shape[0], d) or sin.shape != cos.shape:
        reasons.append(f"cos/sin {tuple(cos.shape)}/{tuple(sin.shape)} are not [M={x.shape[0]}, head_dim={d}] "
                       "(an even head_dim)")
    if k_cache.shape != v_cache.shape or tuple(k_cache.shape[-2:]) != (n_kv_heads, d):
        reasons.append(f"k_cache/v_cache {tuple(k_cache.shape)}/{tuple(v_cache.shape)} are not [..., "
                       f"n_kv_heads={n_kv_heads}, head_dim={d}]")
    if slot_mapping.dtype != torch.int64 or slot_mapping.shape != (x.shape[0],):
        reasons.append(f"slot_mapping {tuple(slot_mapping.shape)}/{slot_mapping.dtype} is not int64 [M={x.shape[0]}]")
    return reasons


def supports_int4_qkv_rope(x: torch.Tensor | None = None, qweight: torch.Tensor | None = None,
                           scales: torch.Tensor | None = None, zeros: torch.Tensor | None = None, group_size: int = 128,
                           cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                           k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None,
                           slot_mapping: torch.Tensor | None = None, n_q_heads: int = 0,
                           n_kv_heads: int = 1) -> list[str]:
    if cos is None or sin is None or k_cache is None or v_cache is None or slot_mapping is None:
        return triton_device_reasons()
    return supports_int4(x, qweight, scales, zeros, group_size) + _qkv_rope_reasons(
        x, qweight.shape[0], cos, sin, k_cache, v_cache, slot_mapping, n_q_heads, n_kv_heads)


def supports_int8_qkv_rope(x: torch.Tensor | None = None, w_q: torch.Tensor | None = None,
                           scale: torch.Tensor | None = None, cos: torch.Tensor | None = None,
                           sin: torch.Tensor | None = None, k_cache: torch.Tensor | None = None,
                           v_cache: torch.Tensor | None = None, slot_mapping: torch.Tensor | None = None,
                           n_q_heads: int = 0, n_kv_heads: int = 1) -> list[str]:
    if cos is None or sin is None or k_cache is None or v_cache is None or slot_mapping is None:
        return triton_device_reasons()
    return supports_int8(x, w_q, scale) + _qkv_rope_reasons(x, w_q.shape[0], cos, sin, k_cache, v_cache,
                                                            slot_mapping, n_q_heads, n_kv_heads)


def supports_int8_gated(gu: torch.Tensor | None = None, w_q: torch.Tensor | None = None,
                        scale: torch.Tensor | None = None) -> list[str]:
    return supports_int8(gu, w_q, scale, gated=True)


def supports_int4_gated(gu: torch.Tensor | None = None, qweight: torch.Tensor | None = None,
                        scales: torch.Tensor | None = None, zeros: torch.Tensor | None = None,
                        group_size: int = 128) -> list[str]:
    return supports_int4(gu, qweight, scales, zeros, group_size, gated=True)


def supports_int8_normed(x: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                         weight: torch.Tensor | None = None, w_q: torch.Tensor | None = None,
                         scale: torch.Tensor | None = None, eps: float = 1e-6) -> list[str]:
    if residual is None or weight is None:
        return triton_device_reasons()
    return supports_int8(x, w_q, scale) + triton_device_reasons(residual, weight) + norm_reasons(x, residual, weight)


def supports_int4_normed(x: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                         weight: torch.Tensor | None = None, qweight: torch.Tensor | None = None,
                         scales: torch.Tensor | None = None, zeros: torch.Tensor | None = None,
                         group_size: int = 128, eps: float = 1e-6) -> list[str]:
    if residual is None or weight is None:
        return triton_device_reasons()
    return (supports_int4(x, qweight, scales, zeros, group_size) + triton_device_reasons(residual, weight)
            + norm_reasons(x, residual, weight))


def register(reg: KernelRegistry) -> None:
    reg.register("matmul.int8_weight_only", "triton", matmul_int8_weight_only, supports=supports_int8, priority=20)
    reg.register("matmul.int4_awq", "triton", matmul_int4_awq, supports=supports_int4, priority=20)
    reg.register("matmul.int8_weight_only_gated", "triton", matmul_int8_weight_only_gated,
                 supports=supports_int8_gated, priority=20)
    reg.register("matmul.int4_awq_gated", "triton", matmul_int4_awq_gated, supports=supports_int4_gated,
                 priority=20)
    reg.register("matmul.int4_awq_swiglu", "triton", matmul_int4_awq_swiglu, supports=supports_int4_swiglu,
                 priority=20)
    reg.register("matmul.int4_awq_qkv_rope", "triton", matmul_int4_awq_qkv_rope, supports=supports_int4_qkv_rope,
                 priority=20)
    reg.register("matmul.int8_weight_only_qkv_rope", "triton", matmul_int8_weight_only_qkv_rope,
                 supports=supports_int8_qkv_rope, priority=20)
    reg.register("matmul.int8_weight_only_normed", "triton", matmul_int8_weight_only_normed,
                 supports=supports_int8_normed, priority=20)
    reg.register("matmul.int4_awq_normed", "triton", matmul_int4_awq_normed, supports=supports_int4_normed,
                 priority=20)
