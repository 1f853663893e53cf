"""CUDA C++ backends (pybind11): `rms_norm`, `rms_norm_residual` and `attention.prefill` (forward only), and
the tensor-core weight-only decode GEMVs (`int4_gemv` for AWQ int4, `int8_gemv` for int8).

The ops are registered whenever torch sees a CUDA device and a CUDA toolkit is present; the extension
compiles on first use (cached) or ahead of time with `python -m tessera.kernels.cuda.build`. Priority sits
below Triton, so these run when forced (`backend="cuda"`, `TESSERA_KERNELS=rms_norm=cuda`) or when Triton
is missing. The GEMVs are not ops of their own: the Triton `matmul.int4_awq` and `matmul.int8_weight_only` take
them for a decode shape where a CUDA-graph timing of the shape favours them over the Triton GEMV
(`quant_matmul`).
"""

from __future__ import annotations

import functools

import torch

from tessera.kernels.cuda.build import load, nvcc_path
from tessera.kernels.support import FLOATS, device_reasons, dtype_reasons, no_grad_reasons, qkv_rope_epilogue_reasons
from tessera.specs import KernelRegistry

MAX_HEAD_DIM = 128


def _base_reasons(*tensors: torch.Tensor) -> list[str]:
    reasons = device_reasons(tensors)
    if nvcc_path() is None:
        reasons.append("no nvcc to build the CUDA extension (set CUDA_HOME)")
    return reasons


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return load().rms_norm(x, weight, float(eps))


def rms_norm_residual(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                      eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    return load().rms_norm_residual(x, residual, weight, float(eps))


def attention_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                      max_seqlen: int | None = None, causal: bool = True, scale: float | None = None) -> torch.Tensor:
    if max_seqlen is None:
        max_seqlen = int(cu_seqlens.diff().max())
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return load().attention_prefill(q, k, v, cu_seqlens, int(max_seqlen), bool(causal), scale)


#: (rows_per_block, warps, loop) of the quantized GEMVs' launches (csrc/quant_gemv.cu): a block a row tile, or
#: (loop) a resident grid stepping through them; 16 warps only at 16 rows and M <= 8.
GEMV_CONFIGS = tuple((rows, warps, loop) for loop in (False, True)
                     for rows, warps in ((16, 4), (16, 8), (16, 16), (32, 4), (32, 8)))
INT4_GEMV_GROUP = 128
#: k of one of the int8 GEMV's work items (64 bytes of a row); K must be a multiple of it.
INT8_GEMV_ITEM = 64


def _gemv_configs(m: int, items: int) -> tuple[tuple[int, int, bool], ...]:
    # a looping grid needs the items of a row tile a multiple of the warps (every warp the same share)
    return tuple(c for c in GEMV_CONFIGS if (c[1] < 16 or m <= 8) and (not c[2] or items % c[1] == 0))


def int4_gemv_configs(m: int, k: int) -> tuple[tuple[int, int, bool], ...]:
    """The launch configs the int4 GEMV takes for x [m, k]: a looping grid needs k / 128 groups a multiple of
    the warps (every warp the same share of a tile)."""
    return _gemv_configs(m, k // INT4_GEMV_GROUP)


def int8_gemv_configs(m: int, k: int) -> tuple[tuple[int, int, bool], ...]:
    """The launch configs the int8 GEMV takes for x [m, k]: a looping grid needs k / 64 a multiple of the warps."""
    return _gemv_configs(m, k // INT8_GEMV_ITEM)


def _gemv_x_reasons(x: torch.Tensor, *tensors: torch.Tensor) -> list[str]:
    """The quantized GEMVs' common conditions: CUDA tensors on a device of compute capability 9.0 (the
    extension is built for sm_90a), bf16 or fp16 x of 1 to 16 rows."""
    reasons = _base_reasons(x, *tensors)
    if not reasons and _capability(x.device.index) != (9, 0):
        reasons.append(f"compute capability {_capability(x.device.index)} is not (9, 0) (sm_90a)")
    reasons += dtype_reasons("x", x, (torch.float16, torch.bfloat16))
    if not _rows_ok(x):
        reasons.append(f"x.shape={tuple(x.shape)} is not [M, K] with 1 <= M <= 16")
    return reasons


@functools.cache
def _capability(index: int | None) -> tuple[int, int]:
    """A device's compute capability, looked up once: the GEMV ops ask at every eager decode call."""
    return torch.cuda.get_device_capability(index)


def _rows_ok(x: torch.Tensor) -> bool:
    return x.dim() == 2 and 1 <= x.shape[0] <= 16


def _aligned_rows_reasons(**tensors: torch.Tensor) -> list[str]:
    return [f"{name} rows are not contiguous and 16-byte aligned" for name, t in tensors.items()
            if t.dim() == 2 and (t.stride(-1) != 1 or t.data_ptr() % 16 or (t.stride(0) * t.element_size()) % 16)]


#: The longest row a gated or normalised int4 GEMV forms (in shared memory, csrc/kernels.h kMaxFormedBytes).
FORMED_MAX_K = 16384

#: A normalised GEMV's norm: (residual, weight, h, eps), as the Triton GEMVs take it (`quant_gemv.Norm`).
Norm = tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]


def _product_k(x: torch.Tensor, gated: bool) -> int:
    """The product's K: x's width, or half of it for a fused gate/up output (`gated`)."""
    return x.shape[1] // 2 if gated else x.shape[1]


def _formed_reasons(x: torch.Tensor, k: int, gated: bool, norm: Norm | None) -> list[str]:
    """Why the int4 GEMV cannot form this x as it loads it: one row, K <= 16384; gated, x [1, 2K]; normalised,
    x contiguous and residual/weight/h contiguous 16-byte aligned rows of K in x's dtype."""
    if not gated and norm is None:
        return []
    if gated and norm is not None:
        return ["gated and norm are exclusive"]
    what = "gated" if gated else "norm"
    reasons = []
    if x.shape[0] != 1 or (norm is not None and not x.is_contiguous()):
        reasons.append(f"{what}: x {tuple(x.shape)} (strides {x.stride()}) is not one"
                       f"{'' if gated else ' contiguous'} row")
    if gated and x.shape[1] % 2:
        reasons.append(f"gated: x.shape={tuple(x.shape)} has an odd width, not [1, 2 * K]")
    if k > FORMED_MAX_K:
        reasons.append(f"{what}: K={k} is more than {FORMED_MAX_K}")
    if norm is not None:
        residual, weight, h, _ = norm
        for name, t in (("residual", residual), ("weight", weight), ("h", h)):
            if (t.dtype != x.dtype or t.numel() != k or not t.is_contiguous() or t.data_ptr() % 16
                    or t.device != x.device):
                reasons.append(f"norm: {name} {tuple(t.shape)}/{t.dtype} is not a contiguous 16-byte aligned row of "
                               f"K={k} in x's dtype {x.dtype} on {x.device}")
    return reasons


def _swiglu_reasons(qweight: torch.Tensor, gated: bool, norm: Norm | None) -> list[str]:
    """Why the int4 GEMV cannot store SwiGLU's output for this weight: a plain x, and a fused gate/up weight of
    an even row count."""
    reasons = ["swiglu takes a plain x: not with gated or norm"] if gated or norm is not None else []
    if qweight.dim() != 2 or qweight.shape[0] % 2:
        reasons.append(f"swiglu: qweight.shape={tuple(qweight.shape)} is not a fused gate/up weight [2N, K / 2]")
    return reasons


def int4_gemv_reasons(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      group_size: int, gated: bool = False, norm: Norm | None = None,
                      swiglu: bool = False) -> list[str]:
    """Why `int4_gemv` cannot take these inputs (empty when it can): a CUDA device of compute capability 9.0
    (the extension is built for sm_90a), bf16 or fp16 x of 1 to 16 rows, group_size 128 and K a multiple of it,
    contiguous 16-byte aligned rows; `gated`, `norm` and `swiglu` as `int4_gemv` takes them."""
    reasons = _gemv_x_reasons(x, qweight, scales, zeros)
    if swiglu:
        reasons += _swiglu_reasons(qweight, gated, norm)
    if not _rows_ok(x):
        return reasons  # nothing below can be told without K
    k = _product_k(x, gated)
    reasons += _formed_reasons(x, k, gated, norm)
    if group_size != INT4_GEMV_GROUP or k % INT4_GEMV_GROUP:
        reasons.append(f"group_size={group_size}, K={k}: needs group_size {INT4_GEMV_GROUP} dividing K")
    elif qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.shape[1] * 2 != k:
        reasons.append(f"qweight {tuple(qweight.shape)}/{qweight.dtype} is not uint8 [N, K / 2 = {k // 2}]")
    else:
        groups = k // INT4_GEMV_GROUP
        for name, t in (("scales", scales), ("zeros", zeros)):
            if t.dtype != torch.float32 or t.shape != (qweight.shape[0], groups):
                reasons.append(f"{name} {tuple(t.shape)}/{t.dtype} is not float32 [N, K / 128 = {groups}]")
    reasons += _aligned_rows_reasons(x=x, qweight=qweight)
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t.dim() == 2 and t.stride(-1) != 1:
            reasons.append(f"{name} rows are not contiguous")
    return reasons


def int8_gemv_reasons(x: torch.Tensor, w_q: torch.Tensor, scale: torch.Tensor) -> list[str]:
    """Why `int8_gemv` cannot take these inputs (empty when it can): as `int4_gemv_reasons` for the device and
    x; K a multiple of 64, int8 w_q [N, K] and a contiguous float32 scale [N], rows contiguous and 16-byte
    aligned."""
    reasons = _gemv_x_reasons(x, w_q, scale)
    if not _rows_ok(x):
        return reasons
    if x.shape[1] % INT8_GEMV_ITEM:
        reasons.append(f"K={x.shape[1]} is not a multiple of {INT8_GEMV_ITEM}")
    elif w_q.dtype != torch.int8 or w_q.dim() != 2 or w_q.shape[1] != x.shape[1]:
        reasons.append(f"w_q {tuple(w_q.shape)}/{w_q.dtype} is not int8 [N, K = {x.shape[1]}]")
    elif scale.dtype != torch.float32 or scale.shape != (w_q.shape[0],) or scale.stride(0) != 1:
        reasons.append(f"scale {tuple(scale.shape)}/{scale.dtype} is not a contiguous float32 [N = {w_q.shape[0]}]")
    return reasons + _aligned_rows_reasons(x=x, w_q=w_q)


def _check_launch(config: tuple[int, int, bool], configs: tuple[tuple[int, int, bool], ...], x: torch.Tensor,
                  pdl: int) -> None:
    if config not in configs:
        raise ValueError(f"(rows_per_block, warps, loop)={config} is not one of {configs} for "
                         f"x.shape={tuple(x.shape)}")
    if pdl not in (0, 1, 3):
        raise ValueError(f"pdl={pdl} is not 0, 1 or 3")


def int4_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, y: torch.Tensor,
              rows_per_block: int = 16, warps: int = 8, loop: bool = False, pdl: int = 0, gated: bool = False,
              norm: Norm | None = None, swiglu: bool = False) -> torch.Tensor:
    """y[M, N] = x @ W.T, W[n, k] = (q - zeros) * scales per group of 128 (`reference.matmul_int4_awq`), on the
    tensor cores; y is written in place and returned. `loop`: a resident grid whose blocks step through the
    row tiles. `pdl`: 0 a plain launch, 1 a programmatic dependent launch, 3 the same with the first weights
    loaded before the wait (only where nothing launched just before writes them). The x multiplied may be
    formed as it loads, saving a launch, for one row of x (K <= 16384): `gated`, x is a fused gate/up output
    [1, 2K] and the product is of silu_mul of its halves (`reference.matmul_int4_awq_gated`); `norm` =
    (residual, weight, h, eps), the product is of rms_norm_residual(x, residual, weight, eps)'s output and
    h = x + residual is written (`reference.matmul_int4_awq_normed`). `swiglu`: qweight (with scales and zeros) is
    a fused gate/up weight [2N, K / 2], gate rows first, and y [M, N] is silu_mul of the product's halves
    (`reference.matmul_int4_awq_swiglu`), stored by the GEMV so that no silu_mul launch follows; rows_per_block
    counts weight rows. Inputs as `int4_gemv_reasons` asks; the extension checks them again."""
    k = _product_k(x, gated)
    if bad := _formed_reasons(x, k, gated, norm) + (_swiglu_reasons(qweight, gated, norm) if swiglu else []):
        raise ValueError(bad[0])
    _check_launch((rows_per_block, warps, bool(loop)), int4_gemv_configs(x.shape[0], k), x, pdl)
    residual, weight, h, eps = norm if norm is not None else (None, None, None, 1e-6)
    load().int4_gemv(x, qweight, scales, zeros, y, rows_per_block, warps, bool(loop), pdl, bool(gated), residual,
                     weight, h, float(eps), bool(swiglu))
    return y


def int4_gemv_rope_reasons(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                           cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           slots: torch.Tensor, n_q_heads: int, n_kv_heads: int) -> list[str]:
    """Why `int4_gemv_rope` cannot take these inputs (empty when it can): `int4_gemv_reasons` for the product; a
    fused q/k/v weight of (n_q_heads + 2 n_kv_heads) heads of a head_dim that is a multiple of 16; cos/sin
    [M, head_dim] and the caches [..., n_kv_heads, head_dim] (contiguous) in x's dtype; slots contiguous int64 [M]."""
    reasons = int4_gemv_reasons(x, qweight, scales, zeros, INT4_GEMV_GROUP)
    if qweight.dim() != 2:
        return reasons
    reasons += qkv_rope_epilogue_reasons(x, qweight.shape[0], cos, sin, k_cache, v_cache, slots, n_q_heads,
                                         n_kv_heads)
    reasons += device_reasons([x, cos, sin, k_cache, v_cache, slots])
    return reasons


def int4_gemv_rope(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slots: torch.Tensor, n_q_heads: int, n_kv_heads: int,
                   rows_per_block: int = 16, warps: int = 8, loop: bool = False, pdl: int = 0) -> torch.Tensor:
    """y [M, N] = x @ W.T for a fused q/k/v int4 weight (`int4_gemv`), with q and k rotated by rope (cos/sin of
    each token's position, `reference.rope`) and the rotated k and v rows also stored at `slots` of the caches
    (`reference.kv_cache_write`; a negative slot stores nothing): the rope and cache-write launches of a decode
    step done in the GEMV's epilogue (`reference.matmul_int4_awq_qkv_rope`). rows_per_block counts weight rows.
    Inputs as `int4_gemv_rope_reasons` asks; the extension checks them again."""
    _check_launch((rows_per_block, warps, bool(loop)), int4_gemv_configs(*x.shape), x, pdl)
    load().int4_gemv_rope(x, qweight, scales, zeros, y, rows_per_block, warps, bool(loop), pdl, cos, sin, k_cache,
                          v_cache, slots, int(n_q_heads), int(n_kv_heads))
    return y


def int8_gemv(x: torch.Tensor, w_q: torch.Tensor, scale: torch.Tensor, y: torch.Tensor, rows_per_block: int = 16,
              warps: int = 8, loop: bool = False, pdl: int = 0) -> torch.Tensor:
    """y[M, N] = x @ (w_q * scale[:, None]).T (`reference.matmul_int8_weight_only`) on the tensor cores, each
    byte multiplied as its two nibbles; y is written in place and returned. `loop` and `pdl` as in `int4_gemv`;
    inputs as `int8_gemv_reasons` asks (the extension checks them again)."""
    _check_launch((rows_per_block, warps, bool(loop)), int8_gemv_configs(*x.shape), x, pdl)
    load().int8_gemv(x, w_q, scale, y, rows_per_block, warps, bool(loop), pdl)
    return y


def supports_rms_norm(x: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                      eps: float = 1e-6) -> list[str]:
    if x is None or weight is None:
        return _base_reasons()
    reasons = _base_reasons(x, weight) + dtype_reasons("x", x, FLOATS) + dtype_reasons("weight", weight, FLOATS)
    if weight.shape != x.shape[-1:]:
        reasons.append(f"weight.shape={tuple(weight.shape)} does not match x's last dim {x.shape[-1]}")
    return reasons + no_grad_reasons(x, weight)


def supports_rms_norm_residual(x: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                               weight: torch.Tensor | None = None, eps: float = 1e-6) -> list[str]:
    if x is None or residual is None or weight is None:
        return _base_reasons()
    reasons = supports_rms_norm(x, weight) + device_reasons([residual, x])
    if residual.shape != x.shape or residual.dtype != x.dtype:
        reasons.append(f"residual {tuple(residual.shape)}/{residual.dtype} differs from x {tuple(x.shape)}/{x.dtype}")
    return reasons + no_grad_reasons(residual)


def supports_attention(q: torch.Tensor | None = None, k: torch.Tensor | None = None, v: torch.Tensor | None = None,
                       cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None, causal: bool = True,
                       scale: float | None = None) -> list[str]:
    if q is None or k is None or v is None or cu_seqlens is None:
        return _base_reasons()
    reasons = _base_reasons(q, k, v, cu_seqlens) + dtype_reasons("q", q, FLOATS)
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        reasons.append(f"shapes q={tuple(q.shape)} k={tuple(k.shape)} v={tuple(v.shape)} are not [N, H, D]")
    elif q.shape[-1] > MAX_HEAD_DIM:
        reasons.append(f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}")
    elif k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        reasons.append(f"Hq={q.shape[1]} is not a multiple of Hkv={k.shape[1]}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        reasons.append(f"dtypes differ: q={q.dtype} k={k.dtype} v={v.dtype}")
    return reasons + no_grad_reasons(q, k, v)


def register(reg: KernelRegistry) -> None:
    reg.register("rms_norm", "cuda", rms_norm, supports=supports_rms_norm, priority=10)
    reg.register("rms_norm_residual", "cuda", rms_norm_residual, supports=supports_rms_norm_residual, priority=10)
    reg.register("attention.prefill", "cuda", attention_prefill, supports=supports_attention, priority=10)
