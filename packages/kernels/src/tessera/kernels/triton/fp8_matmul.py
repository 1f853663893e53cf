"""`matmul.fp8` in Triton: E4M3 x E4M3 on Hopper's fp8 tensor cores, float32 accumulation.

Two launches: a row kernel quantizes x per row (scale amax / 448, the reference's rounding), then a
GEMM multiplies the fp8 operands and applies both scales in the epilogue (per-tensor or per-row
weight scale), writing x's dtype. w_q [N, K] is already K-major, the layout fp8 MMA wants for B.

Two GEMMs: above `TMA_MIN_ROWS` rows (prefill, training-sized batches) a persistent kernel that
moves tiles with TMA descriptors (one program per SM walking the output tiles in grouped order, no
address or mask arithmetic in the K loop); below it (decode) a pointer kernel with small-M tiles.
Both promote the tensor cores' partial sums into the float32 accumulator after every K tile
(`max_num_imprecise_acc`), so accumulation is float32 as the contract says, not fp8-MMA precision.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from tessera.kernels.custom_ops import matmul_custom_op
from tessera.kernels.support import HALF, dtype_reasons, no_grad_reasons, triton_device_reasons, triton_interpreting
from tessera.kernels.triton.tiles import grouped_tile
from tessera.kernels.triton.tuned_launch import TunedLaunch
from tessera.kernels.triton.tuning import autotune, bucket
from tessera.specs import KernelRegistry

FP8_MAX = 448.0


@triton.jit
def _quantize_stored(x, XQ, row, offs, mask, stride_qm, scale):
    # IEEE division (plain `/` is approximate on GPU): x_q must round exactly as the reference's.
    xq = tl.clamp(tl.math.div_rn(x, scale), -448.0, 448.0)
    tl.store(XQ + row * stride_qm + offs, xq.to(XQ.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)


@triton.jit
def _row_scale(amax):
    return tl.maximum(tl.max(amax, 0), 1e-12) / 448.0  # FP8_MAX: E4M3's largest finite value


@triton.jit
def _quantize_rows_kernel(X, XQ, XS, K, stride_xm, stride_qm, BLOCK_K: tl.constexpr):
    """One program a row: scale = amax / 448, x_q = x / scale. A row that
    fits one block is read once; a longer one twice (for the amax, then for the values)."""
    row = tl.program_id(0).to(tl.int64)
    if BLOCK_K >= K:
        offs = tl.arange(0, BLOCK_K)
        x = tl.load(X + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
        scale = _row_scale(tl.abs(x))
        _quantize_stored(x, XQ, row, offs, offs < K, stride_qm, scale)
    else:
        amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(X + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = _row_scale(amax)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(X + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
            _quantize_stored(x, XQ, row, offs, offs < K, stride_qm, scale)
    tl.store(XS + row, scale)


def _row_launch(k: int) -> dict[str, int]:
    """Block and warps of the row kernel: the whole row in one block up to 8192 (64 under the
    interpreter), else 2048-wide blocks (32)."""
    whole = triton.next_power_of_2(k)
    one, loop = (64, 32) if triton_interpreting() else (8192, 2048)
    block = whole if whole <= one else loop
    return {"BLOCK_K": block, "num_warps": 8 if block >= 4096 else 4}


_INTERPRET = triton.Config({"BM": 16, "BN": 16, "BK": 32, "GROUP_M": 8}, num_warps=4, num_stages=1)
_CONFIGS = [
    triton.Config({"BM": 128, "BN": 256, "BK": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BM": 128, "BN": 128, "BK": 128, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BM": 128, "BN": 256, "BK": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BM": 256, "BN": 128, "BK": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BM": 64, "BN": 128, "BK": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BM": 16, "BN": 64, "BK": 256, "GROUP_M": 8}, num_warps=4, num_stages=4),
]


@autotune(_CONFIGS, key=["M_BUCKET", "N", "K", "PER_ROW"], interpret=_INTERPRET)
@triton.jit
def _fp8_gemm_kernel(A, B, AS, BS, Y, M, N, K, stride_am, stride_bn, stride_ym, M_BUCKET, PER_ROW: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_ptrs = A + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    b_ptrs = B + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k_ok = (k0 + offs_k) < K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        # Hopper's fp8 MMA accumulates with reduced precision; promote to the fp32 accumulator every tile.
        acc = tl.dot(a, b, acc, max_num_imprecise_acc=BK)
        a_ptrs += BK
        b_ptrs += BK
    a_scale = tl.load(AS + offs_m, mask=m_ok, other=0.0)
    if PER_ROW:
        b_scale = tl.load(BS + offs_n, mask=n_ok, other=0.0)
    else:
        b_scale = tl.load(BS + offs_n * 0)
    y = acc * a_scale[:, None] * b_scale[None, :]
    tl.store(Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], y.to(Y.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _tma_blocks(nargs: dict) -> None:
    """Autotune pre-hook: size the host descriptors' boxes for the config being launched."""
    bm, bn, bk = nargs["BM"], nargs["BN"], nargs["BK"]
    nargs["a_desc"].block_shape = [bm, bk]
    nargs["b_desc"].block_shape = [bn, bk]
    nargs["y_desc"].block_shape = [bm, bn]


def _tma_config(bm: int, bn: int, bk: int, warps: int, stages: int, flatten: bool) -> triton.Config:
    return triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8, "FLATTEN": flatten}, num_warps=warps,
                         num_stages=stages, pre_hook=_tma_blocks)


# Measured at 8192^3 on an H200 (promotion every 128-wide K tile): 256x128 tiles with 8 warps ran at
# ~1125 TFLOP/s, 128x128 and 128x256 at ~1000; 4 warps or a 64-wide K tile did worse.
_TMA_INTERPRET = _tma_config(16, 16, 32, 4, 1, False)
_TMA_CONFIGS = [
    _tma_config(256, 128, 128, 8, 3, True),
    _tma_config(256, 128, 128, 8, 3, False),
    _tma_config(128, 256, 128, 8, 3, False),
    _tma_config(128, 128, 128, 8, 4, False),
]
#: Row count from which the persistent TMA kernel runs (below it the small-M pointer kernel does).
TMA_MIN_ROWS = 128


@autotune(_TMA_CONFIGS, key=["M_BUCKET", "N", "K", "PER_ROW"], interpret=_TMA_INTERPRET)
@triton.jit
def _fp8_gemm_tma_kernel(a_desc, b_desc, y_desc, AS, BS, M, N, K, M_BUCKET, NUM_SMS: tl.constexpr,
                         PER_ROW: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                         GROUP_M: tl.constexpr, FLATTEN: tl.constexpr):
    num_m, num_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    k_tiles = tl.cdiv(K, BK)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS, flatten=FLATTEN):
        pid_m, pid_n = grouped_tile(tile, num_m, num_n, GROUP_M)
        om, on = pid_m * BM, pid_n * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for ki in range(k_tiles):  # out-of-range rows/columns of a box read as zeros
            a = a_desc.load([om, ki * BK])
            b = b_desc.load([on, ki * BK])
            acc = tl.dot(a, b.T, acc, max_num_imprecise_acc=BK)
        offs_m = om + tl.arange(0, BM)
        offs_n = on + tl.arange(0, BN)
        a_scale = tl.load(AS + offs_m, mask=offs_m < M, other=0.0)
        if PER_ROW:
            b_scale = tl.load(BS + offs_n, mask=offs_n < N, other=0.0)
        else:
            b_scale = tl.load(BS + offs_n * 0)
        y = acc * a_scale[:, None] * b_scale[None, :]
        y_desc.store([om, on], y.to(y_desc.dtype))  # the box is clipped to [M, N]


def _num_sms(device: torch.device) -> int:
    if triton_interpreting() or device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _tma_ok(xq: torch.Tensor, w_q: torch.Tensor, y: torch.Tensor) -> bool:
    """TMA boxes need 16-byte aligned bases and row strides (contiguous operands here)."""
    return all(t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 for t in (xq, w_q, y))


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `reference.quantize_fp8_rows`, one launch: (x_q [M, K] float8_e4m3fn, contiguous;
    scale [M] float32). x's last dim must be contiguous."""
    m, k = x.shape
    xq = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    xs = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m:
        _quantize_rows_kernel[(m,)](x, xq, xs, k, x.stride(0), xq.stride(0), **_row_launch(k))
    return xq, xs


def _grid(m: int, n: int):
    return lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)


def _persistent_grid(m: int, n: int, sms: int):
    return lambda meta: (min(sms, triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"])),)


def _fp8(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    m, k = x.shape
    n = w_q.shape[0]
    x = x if x.stride(-1) == 1 else x.contiguous()
    w_q, w_scale = w_q.contiguous(), w_scale.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m and n:
        xq, xs = quantize_rows(x)
        mb, per_row = bucket(m), w_scale.numel() > 1
        if m >= TMA_MIN_ROWS and _tma_ok(xq, w_q, y):
            sms = _num_sms(x.device)
            # Placeholder boxes: the config's pre-hook sizes them before every launch.
            descs = [TensorDescriptor.from_tensor(t, [16, 16]) for t in (xq, w_q, y)]
            _tma_launch((mb, n, k, per_row, x.dtype, sms), _persistent_grid(m, n, sms), *descs, xs, w_scale,
                        m, n, k, mb, NUM_SMS=sms, PER_ROW=per_row)
            return y
        _gemm_launch((mb, n, k, per_row, x.dtype), _grid(m, n), xq, w_q, xs, w_scale, y, m, n, k, xq.stride(0),
                     w_q.stride(0), y.stride(0), mb, PER_ROW=per_row)
    return y


_gemm_launch = TunedLaunch(_fp8_gemm_kernel)
_tma_launch = TunedLaunch(_fp8_gemm_tma_kernel)
_fp8_op = matmul_custom_op("matmul_fp8", _fp8)


def matmul_fp8(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """Same contract as `reference.matmul_fp8`."""
    return _fp8_op(x, w_q, w_scale)


def supports(x: torch.Tensor | None = None, w_q: torch.Tensor | None = None,
             w_scale: torch.Tensor | None = None) -> list[str]:
    if x is None or w_q is None or w_scale is None:
        reasons = triton_device_reasons()
    else:
        # float32 x would promise float32-exact results, which Hopper's fp8 MMA (reduced-precision
        # accumulation inside each tile) cannot keep at the catalogue's float32 tolerance.
        reasons = triton_device_reasons(x, w_q, w_scale) + dtype_reasons("x", x, HALF)
        reasons += dtype_reasons("w_q", w_q, (torch.float8_e4m3fn,)) + dtype_reasons("w_scale", w_scale,
                                                                                     (torch.float32,))
        if x.dim() != 2 or w_q.dim() != 2 or x.shape[1] != w_q.shape[1]:
            reasons.append(f"shapes x={tuple(x.shape)} w_q={tuple(w_q.shape)} are not [M, K], [N, K]")
        elif w_scale.shape not in ((1,), (w_q.shape[0],)):
            reasons.append(f"w_scale.shape={tuple(w_scale.shape)} is neither [1] nor [N={w_q.shape[0]}]")
        if x.shape[-1] % 16:
            reasons.append(f"K={x.shape[-1]} is not a multiple of 16 (fp8 MMA)")
        reasons += no_grad_reasons(x)
        if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) < (8, 9):
            reasons.append(f"{torch.cuda.get_device_name(x.device)} has no fp8 tensor cores (needs sm_89+)")
    return reasons


def register(reg: KernelRegistry) -> None:
    reg.register("matmul.fp8", "triton", matmul_fp8, supports=supports, priority=20)
