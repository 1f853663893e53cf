"""FlashAttention forward and backward in Triton for `attention.prefill` (packed varlen, causal, GQA).

Forward: one program per (query block, query head, sequence); online softmax in base 2 over key
blocks, split into the blocks every query of the tile sees in full (no mask work) and the diagonal
band (masked). K/V rows are read at head h // (Hq // Hkv): grouped-query attention never repeats them.
It stores the base-2 log-sum-exp per row for the backward.

Backward (FlashAttention-2): dK/dV per (key block, kv head, sequence), looping over the query heads
of its group, so nothing is accumulated atomically; dQ per (query block, query head, sequence).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from tessera.kernels.custom_ops import eager_bypass
from tessera.kernels.support import FLOATS, dtype_reasons, same_dtype_reasons, triton_device_reasons
from tessera.kernels.triton.tiles import divide
from tessera.kernels.triton.tuning import autotune, bucket, dot_precision
from tessera.specs import KernelRegistry

LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 32, 64, 128, 256)


def _prune(configs: list, named_args: dict, **kwargs: object) -> list:
    # Large tiles at head dim 256 exceed shared memory; BLOCK_M must be a multiple of BLOCK_N
    # for the causal split into full and diagonal blocks.
    # float32 (IEEE dots) is a correctness path, not a fast one: one small tile, no tuning.
    d = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
    small = d is None or d > 128 or kwargs.get("PREC", named_args.get("PREC")) == "ieee"
    kept = [c for c in configs if c.kwargs["BLOCK_M"] % c.kwargs["BLOCK_N"] == 0
            and (not small or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64)]
    return kept or configs[:1]


_INTERPRET = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)
_FWD_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
]


@triton.jit
def _fwd_block(acc, l_i, m_i, q, K, V, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, L, lo, hi,
               scale_log2, MASKED: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr,
               BLOCK_N: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            k = tl.load(K + k_base + cols[None, :].to(tl.int64) * stride_kn + offs_d[:, None],
                        mask=cols[None, :] < L, other=0.0)
        else:
            k = tl.load(K + k_base + cols[None, :].to(tl.int64) * stride_kn + offs_d[:, None])
        qk = tl.dot(q, k, input_precision=PREC) * scale_log2
        if MASKED:
            valid = cols[None, :] < L
            if CAUSAL:
                valid = valid & (offs_m[:, None] >= cols[None, :])
            qk = tl.where(valid, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(V + v_base + cols[:, None].to(tl.int64) * stride_vn + offs_d[None, :],
                        mask=cols[:, None] < L, other=0.0)
        else:
            v = tl.load(V + v_base + cols[:, None].to(tl.int64) * stride_vn + offs_d[None, :])
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@autotune(_FWD_CONFIGS, key=["SEQ_BUCKET", "HEAD_DIM", "N_REP", "CAUSAL", "PREC"], interpret=_INTERPRET,
          prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, CU, scale_log2, stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
                stride_on, stride_oh, stride_lh, SEQ_BUCKET, N_REP: tl.constexpr, HEAD_DIM: tl.constexpr,
                CAUSAL: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Highest query blocks first: under the causal mask they carry the most work.
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    bos = tl.load(CU + seq).to(tl.int64)
    L = (tl.load(CU + seq + 1) - bos).to(tl.int32)
    if start_m * BLOCK_M >= L:
        return
    kv_head = head // N_REP
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < L
    q = tl.load(Q + (bos + offs_m[:, None]) * stride_qn + head * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    k_base = bos * stride_kn + kv_head * stride_kh
    v_base = bos * stride_vn + kv_head * stride_vh
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    if CAUSAL:
        full_end = start_m * BLOCK_M
        hi = tl.minimum((start_m + 1) * BLOCK_M, L)
    else:
        full_end = (L // BLOCK_N) * BLOCK_N
        hi = L
    acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, K, V, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, L,
                               0, full_end, scale_log2, False, CAUSAL, PREC, BLOCK_N)
    acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, K, V, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, L,
                               full_end, hi, scale_log2, True, CAUSAL, PREC, BLOCK_N)
    acc = divide(acc, l_i[:, None], PREC == "ieee")  # correctly rounded for float32 data (`tiles`)
    tl.store(O + (bos + offs_m[:, None]) * stride_on + head * stride_oh + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + head * stride_lh + bos + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU, scale_log2, sm_scale,
                     stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_don, stride_doh,
                     stride_dkn, stride_dkh, stride_dvn, stride_dvh, stride_lh,
                     N_REP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    kv_head = tl.program_id(1)
    seq = tl.program_id(2)
    bos = tl.load(CU + seq).to(tl.int64)
    L = (tl.load(CU + seq + 1) - bos).to(tl.int32)
    if start_n >= L:
        return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < L
    k = tl.load(K + (bos + offs_n[:, None]) * stride_kn + kv_head * stride_kh + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)
    v = tl.load(V + (bos + offs_n[:, None]) * stride_vn + kv_head * stride_vh + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)
    dk = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    lo = (start_n // BLOCK_M) * BLOCK_M if CAUSAL else 0
    for r in range(N_REP):
        head = kv_head * N_REP + r
        for start_m in range(lo, L, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < L
            q = tl.load(Q + (bos + offs_m[:, None]) * stride_qn + head * stride_qh + offs_d[None, :],
                        mask=row_ok[:, None], other=0.0)
            do = tl.load(DO + (bos + offs_m[:, None]) * stride_don + head * stride_doh + offs_d[None, :],
                         mask=row_ok[:, None], other=0.0)
            lse = tl.load(LSE + head * stride_lh + bos + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + head * stride_lh + bos + offs_m, mask=row_ok, other=0.0)
            qk_t = tl.dot(k, tl.trans(q), input_precision=PREC) * scale_log2
            valid = col_ok[:, None] & row_ok[None, :]
            if CAUSAL:
                valid = valid & (offs_m[None, :] >= offs_n[:, None])
            p_t = tl.where(valid, tl.math.exp2(qk_t - lse[None, :]), 0.0)
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PREC)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
            ds_t = p_t * (dp_t - delta[None, :])
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PREC)
    tl.store(DK + (bos + offs_n[:, None]) * stride_dkn + kv_head * stride_dkh + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + (bos + offs_n[:, None]) * stride_dvn + kv_head * stride_dvh + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU, scale_log2, sm_scale,
                   stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_don, stride_doh,
                   stride_dqn, stride_dqh, stride_lh,
                   N_REP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1)
    seq = tl.program_id(2)
    bos = tl.load(CU + seq).to(tl.int64)
    L = (tl.load(CU + seq + 1) - bos).to(tl.int32)
    if start_m >= L:
        return
    kv_head = head // N_REP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < L
    q = tl.load(Q + (bos + offs_m[:, None]) * stride_qn + head * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + (bos + offs_m[:, None]) * stride_don + head * stride_doh + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + head * stride_lh + bos + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + head * stride_lh + bos + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    hi = tl.minimum(start_m + BLOCK_M, L) if CAUSAL else L
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < L
        k = tl.load(K + (bos + offs_n[:, None]) * stride_kn + kv_head * stride_kh + offs_d[None, :],
                    mask=col_ok[:, None], other=0.0)
        v = tl.load(V + (bos + offs_n[:, None]) * stride_vn + kv_head * stride_vh + offs_d[None, :],
                    mask=col_ok[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
        valid = row_ok[:, None] & col_ok[None, :]
        if CAUSAL:
            valid = valid & (offs_m[:, None] >= offs_n[None, :])
        p = tl.where(valid, tl.math.exp2(qk - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)
    tl.store(DQ + (bos + offs_m[:, None]) * stride_dqn + head * stride_dqh + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _max_seqlen(cu_seqlens: torch.Tensor, max_seqlen: int) -> int:
    # -1 means unknown: read it from cu_seqlens (one host sync, only when the caller did not say).
    return int(cu_seqlens.diff().max()) if max_seqlen < 0 else max_seqlen


def _flash_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
               causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """o [N, Hq, D] and the base-2 log-sum-exp of the scaled scores, lse [Hq, N] float32."""
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    n, hq, d = q.shape
    o = torch.empty_like(q)
    lse = torch.empty((hq, n), dtype=torch.float32, device=q.device)
    b = cu_seqlens.shape[0] - 1
    if n == 0 or b == 0:
        return o, lse
    t = _max_seqlen(cu_seqlens, max_seqlen)
    grid = lambda meta: (triton.cdiv(t, meta["BLOCK_M"]), hq, b)  # noqa: E731
    _fwd_kernel[grid](q, k, v, o, lse, cu_seqlens, scale * LOG2E, q.stride(0), q.stride(1), k.stride(0),
                      k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1), lse.stride(0), bucket(t),
                      N_REP=hq // k.shape[1], HEAD_DIM=d, CAUSAL=causal, PREC=dot_precision(q.dtype))
    return o, lse


flash_attn_fwd = torch.library.custom_op("tessera::flash_attn_fwd", _flash_fwd, mutates_args=())


@flash_attn_fwd.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, causal: bool,
      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


def _bwd_blocks(d: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, warps, stages) for the backward kernels; small tiles under the interpreter."""
    from tessera.kernels.support import triton_interpreting

    if triton_interpreting():
        return 16, 16, 4, 1
    if dtype == torch.float32 or d > 128:
        return 32, 32, 4, 1
    return (64, 64, 8, 2) if d > 64 else (64, 64, 4, 2)


@torch.library.custom_op("tessera::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                   lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, causal: bool,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `flash_attn_fwd`, each in its input's shape and dtype."""
    do, q, k, v = (_last_dim_contiguous(x) for x in (do, q, k, v))
    n, hq, d = q.shape
    hkv = k.shape[1]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    b = cu_seqlens.shape[0] - 1
    if n == 0 or b == 0:
        return dq, dk, dv
    t = _max_seqlen(cu_seqlens, max_seqlen)
    delta = (o.float() * do.float()).sum(-1).transpose(0, 1).contiguous()
    bm, bn, warps, stages = _bwd_blocks(d, q.dtype)
    common = dict(N_REP=hq // hkv, HEAD_DIM=d, CAUSAL=causal, PREC=dot_precision(q.dtype), BLOCK_M=bm, BLOCK_N=bn,
                  num_warps=warps, num_stages=stages)
    _bwd_dkdv_kernel[(triton.cdiv(t, bn), hkv, b)](
        q, k, v, do, lse, delta, dk, dv, cu_seqlens, scale * LOG2E, scale, q.stride(0), q.stride(1), k.stride(0),
        k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), dv.stride(0),
        dv.stride(1), lse.stride(0), **common)
    _bwd_dq_kernel[(triton.cdiv(t, bm), hq, b)](
        q, k, v, do, lse, delta, dq, cu_seqlens, scale * LOG2E, scale, q.stride(0), q.stride(1), k.stride(0),
        k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1), dq.stride(0), dq.stride(1),
        lse.stride(0), **common)
    return dq, dk, dv


@flash_attn_bwd.register_fake
def _(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
      cu_seqlens: torch.Tensor, max_seqlen: int, causal: bool,
      scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


class FlashAttention(torch.autograd.Function):
    """Differentiable packed varlen attention; saves q, k, v, o and the log-sum-exp, not the scores."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                cu_seqlens: torch.Tensor, max_seqlen: int, causal: bool, scale: float) -> torch.Tensor:
        o, lse = flash_attn_fwd(q, k, v, cu_seqlens, max_seqlen, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
        ctx.max_seqlen, ctx.causal, ctx.scale = max_seqlen, causal, scale
        return o

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, do: torch.Tensor) -> tuple:
        q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = flash_attn_bwd(do, q, k, v, o, lse, cu_seqlens, ctx.max_seqlen, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None, None, None


def _flash_out(*args: object) -> torch.Tensor:
    return _flash_fwd(*args)[0]


# Nothing to record and nothing tracing: the autograd function and the op's dispatcher would only cost
# host time (a prefill of a 16-layer model spends milliseconds there).
_attention_call = eager_bypass(FlashAttention.apply, _flash_out)


def attention_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                      max_seqlen: int | None = None, causal: bool = True, scale: float | None = None) -> torch.Tensor:
    """Same contract as `reference.attention_prefill`; differentiable in q, k and v."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _attention_call(q, k, v, cu_seqlens, -1 if max_seqlen is None else int(max_seqlen), bool(causal), scale)


def attention_reasons(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[str]:
    """Shape and dtype checks shared by the flash and paged kernels."""
    reasons = dtype_reasons("q", q, FLOATS) + same_dtype_reasons(q=q, k=k, v=v)
    d = q.shape[-1]
    if d not in HEAD_DIMS:
        reasons.append(f"head dim {d} not in {HEAD_DIMS}")
    if k.shape[-1] != d or v.shape[-1] != d:
        reasons.append(f"head dims differ: q {d}, k {k.shape[-1]}, v {v.shape[-1]}")
    hq, hkv = q.shape[-2], k.shape[-2]
    if hkv == 0 or hq % hkv:
        reasons.append(f"Hq={hq} is not a multiple of Hkv={hkv}")
    return reasons


def supports(q: torch.Tensor | None = None, k: torch.Tensor | None = None, v: torch.Tensor | None = None,
             cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None, causal: bool = True,
             scale: float | None = None) -> list[str]:
    if q is None or k is None or v is None or cu_seqlens is None:
        return triton_device_reasons()
    reasons = triton_device_reasons(q, k, v, cu_seqlens) + attention_reasons(q, k, v)
    if q.dim() != 3 or k.shape[0] != q.shape[0] or v.shape != k.shape:
        reasons.append(f"shapes q={tuple(q.shape)} k={tuple(k.shape)} v={tuple(v.shape)} are not [N, H, D]")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        reasons.append(f"cu_seqlens.dtype={cu_seqlens.dtype} not int32/int64")
    if scale is not None and not math.isfinite(scale):
        reasons.append(f"scale={scale} is not finite")
    return reasons


def register(reg: KernelRegistry) -> None:
    reg.register("attention.prefill", "triton", attention_prefill, supports=supports, priority=20)
