"""Attention over a paged KV cache in Triton: `attention.decode_paged`, `attention.prefill_paged`, and the decode
kernel's fused variants: `attention.decode_paged_write` (the step's k/v rows written in the same launch) and
`attention.decode_paged_rope` (q and the new k rotated there too).

Cache layout [num_blocks, block_size, Hkv, D]; token t of sequence b sits in physical row
block_tables[b, t // block_size] * block_size + t % block_size. Keys are gathered a tile at a time.

Decode is GQA-aware: one program serves all Hq / Hkv query heads of a kv head, so each cached byte
is read once, and the context is split across programs (split-K) when the batch alone cannot fill
the GPU; a second kernel merges the splits by their log-sum-exp. The split count comes from the
block table's width, never from context_lens, so decode needs no host sync (CUDA-graph capturable).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tessera.kernels.support import no_grad_reasons, triton_device_reasons, triton_interpreting
from tessera.kernels.triton import pdl
from tessera.kernels.triton.flash_attention import LOG2E, attention_reasons
from tessera.kernels.triton.rope import rotate_halves
from tessera.kernels.triton.tiles import divide
from tessera.kernels.triton.tuning import dot_precision
from tessera.specs import KernelRegistry


@triton.jit
def _decode_kernel(Q, K, V, O, O_PART, ML_PART, TABLES, CTX, K_NEW, V_NEW, SLOTS, COS, SIN, QW, KW, scale_log2,
                   stride_qb, stride_qh, stride_kr, stride_kh, stride_vr, stride_vh, stride_ob, stride_oh, stride_tb,
                   stride_knb, stride_knh, stride_vnb, stride_vnh, stride_cb, stride_sb, eps,
                   N_REP: tl.constexpr, G: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
                   SPLITS: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr = 0,
                   WRITE: tl.constexpr = False, ROPE: tl.constexpr = 0):
    """WRITE: first store the step's k/v rows (K_NEW, V_NEW) to their SLOTS. ROPE (with WRITE): q and the new
    k arrive unrotated and are rotated here by the row's COS/SIN, after a per-head RMSNorm (QW, KW) when
    ROPE == 2, as the `rope` / `rope_qk_norm` kernel computes them (`rope.rotate_halves`), rounded once."""
    pdl.enter(PDL)
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(CTX + b)
    offs_g = tl.arange(0, G)
    offs_d = tl.arange(0, HEAD_DIM)
    HALF: tl.constexpr = HEAD_DIM // 2
    offs_h = tl.arange(0, HALF)
    h_ok = offs_h < HALF
    if ROPE > 0:
        c1 = tl.load(COS + b.to(tl.int64) * stride_cb + offs_h).to(tl.float32)
        c2 = tl.load(COS + b.to(tl.int64) * stride_cb + HALF + offs_h).to(tl.float32)
        s1 = tl.load(SIN + b.to(tl.int64) * stride_sb + offs_h).to(tl.float32)
        s2 = tl.load(SIN + b.to(tl.int64) * stride_sb + HALF + offs_h).to(tl.float32)
    if WRITE:
        # The step's own k/v row (position ctx - 1) goes to its slot first, by the one program whose tiles
        # hold that position: the only reader of the slot in this launch, after the barrier below.
        slot = tl.load(SLOTS + b)
        if (ctx > 0) & (slot >= 0) & ((ctx - 1) // BLOCK_N % SPLITS == split):
            k_row = K_NEW + b.to(tl.int64) * stride_knb + kv_head * stride_knh
            k_dst = K + slot * stride_kr + kv_head * stride_kh
            if ROPE > 0:
                k1 = tl.load(k_row + offs_h).to(tl.float32)[None, :]
                k2 = tl.load(k_row + HALF + offs_h).to(tl.float32)[None, :]
                r1, r2 = rotate_halves(k1, k2, KW, offs_h, h_ok, c1, c2, s1, s2, eps, HALF, ROPE == 2, PREC == "ieee")
                tl.store(k_dst + offs_h[None, :], r1.to(K.dtype.element_ty))
                tl.store(k_dst + HALF + offs_h[None, :], r2.to(K.dtype.element_ty))
            else:
                tl.store(k_dst + offs_d, tl.load(k_row + offs_d).to(K.dtype.element_ty))
            v_new = tl.load(V_NEW + b.to(tl.int64) * stride_vnb + kv_head * stride_vnh + offs_d)
            tl.store(V + slot * stride_vr + kv_head * stride_vh + offs_d, v_new.to(V.dtype.element_ty))
        tl.debug_barrier()
    heads = kv_head * N_REP + offs_g
    g_ok = offs_g < N_REP
    q_rows = Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh
    if ROPE > 0:
        q1 = tl.load(q_rows + offs_h[None, :], mask=g_ok[:, None], other=0.0).to(tl.float32)
        q2 = tl.load(q_rows + HALF + offs_h[None, :], mask=g_ok[:, None], other=0.0).to(tl.float32)
        r1, r2 = rotate_halves(q1, q2, QW, offs_h, h_ok, c1, c2, s1, s2, eps, HALF, ROPE == 2, PREC == "ieee")
        dt = Q.dtype.element_ty
        # [G, HALF] halves side by side as [G, HEAD_DIM]: join -> [G, HALF, 2] -> [G, 2, HALF] -> reshape.
        q = tl.reshape(tl.permute(tl.join(r1.to(dt), r2.to(dt)), (0, 2, 1)), (G, HEAD_DIM))
    else:
        q = tl.load(q_rows + offs_d[None, :], mask=g_ok[:, None], other=0.0)
    m_i = tl.full((G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((G,), dtype=tl.float32)
    acc = tl.zeros((G, HEAD_DIM), dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    # Split s takes tiles s, s + SPLITS, ...: however short the context against the table's width, its
    # tiles spread over all splits instead of queueing in the first few.
    for start in range(split * BLOCK_N, ctx, SPLITS * BLOCK_N):
        tok = start + offs_n
        tok_ok = tok < ctx
        page = tl.load(TABLES + b.to(tl.int64) * stride_tb + tok // PAGE, mask=tok_ok, other=0)
        row = page.to(tl.int64) * PAGE + tok % PAGE
        k = tl.load(K + row[None, :] * stride_kr + kv_head * stride_kh + offs_d[:, None], mask=tok_ok[None, :],
                    other=0.0)
        qk = tl.dot(q, k, input_precision=PREC) * scale_log2
        qk = tl.where(tok_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + row[:, None] * stride_vr + kv_head * stride_vh + offs_d[None, :], mask=tok_ok[:, None],
                    other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new
    if SPLITS == 1:
        out = tl.where(l_i[:, None] > 0, divide(acc, l_i[:, None], PREC == "ieee"), 0.0)
        tl.store(O + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=g_ok[:, None])
    else:
        # Partials [B, Hq, SPLITS, D] (unnormalised) and [B, Hq, SPLITS, 2] (running max, sum).
        part = (b.to(tl.int64) * tl.num_programs(1) * N_REP + heads) * SPLITS + split
        tl.store(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_ok[:, None])
        tl.store(ML_PART + part * 2, m_i, mask=g_ok)
        tl.store(ML_PART + part * 2 + 1, l_i, mask=g_ok)


@triton.jit
def _merge_kernel(O, O_PART, ML_PART, stride_ob, stride_oh, HQ, HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr,
                  S_BLOCK: tl.constexpr, PDL: tl.constexpr = 0, PRECISE: tl.constexpr = False):
    pdl.enter(PDL)
    b = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, S_BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    s_ok = offs_s < SPLITS
    part = (b.to(tl.int64) * HQ + head) * SPLITS + offs_s
    m = tl.load(ML_PART + part * 2, mask=s_ok, other=float("-inf"))
    l = tl.load(ML_PART + part * 2 + 1, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(l > 0, tl.math.exp2(m - m_max), 0.0)
    total = tl.sum(w * l, 0)
    acc = tl.load(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], 0)
    out = tl.where(total > 0, divide(out, total, PRECISE), 0.0)
    tl.store(O + b.to(tl.int64) * stride_ob + head * stride_oh + offs_d, out.to(O.dtype.element_ty))


def _decode_plan(batch: int, hkv: int, max_ctx: int, block_n: int) -> int:
    """Splits of the context: enough programs to fill the GPU twice over, at most one per tile of the
    table's width. Tiles are dealt to splits round-robin, so a context much shorter than the table
    still gets one tile per split, not the first splits' long runs."""
    if triton_interpreting():
        target = 1 if max_ctx <= 2 * block_n else 3
    else:
        sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
        target = triton.cdiv(2 * sms, batch * hkv)
    return max(1, min(target, triton.cdiv(max_ctx, block_n), 64))


def _cache_strides(cache: torch.Tensor) -> tuple[int, int]:
    """(row stride, head stride) treating [NB, BS, H, D] as rows of the flattened first two dims."""
    return cache.stride(1), cache.stride(2)


def _paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  context_lens: torch.Tensor, scale: float,
                  new: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                  rotary: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, float] | None
                  = None) -> torch.Tensor:
    """Decode attention; with `new` = (k, v, slot_mapping) the launch first writes each sequence's k/v row
    to its slot (`attention.decode_paged_write`); with `rotary` = (cos, sin, q_weight, k_weight, eps) too, q
    and the new k are rotated (after QK-norm when the weights are given) in the launch
    (`attention.decode_paged_rope`)."""
    batch, hq, d = q.shape
    page, hkv = k_cache.shape[1], k_cache.shape[2]
    n_rep = hq // hkv
    o = torch.empty_like(q)
    if batch == 0:
        return o
    block_n = 16 if triton_interpreting() else 64
    splits = _decode_plan(batch, hkv, block_tables.shape[1] * page, block_n)
    if splits > 1:
        o_part = torch.empty((batch, hq, splits, d), dtype=torch.float32, device=q.device)
        ml_part = torch.empty((batch, hq, splits, 2), dtype=torch.float32, device=q.device)
    else:
        o_part = ml_part = o
    krs, khs = _cache_strides(k_cache)
    vrs, vhs = _cache_strides(v_cache)
    launch = pdl.launch_options(q.device)
    k_new, v_new, slots = new if new is not None else (q, q, context_lens)  # unread without WRITE
    cos, sin, q_weight, k_weight, eps = rotary if rotary is not None else (q[:, 0], q[:, 0], None, None, 0.0)
    rope_mode = 0 if rotary is None else 1 if q_weight is None else 2
    _decode_kernel[(batch, hkv, splits)](
        q, k_cache, v_cache, o, o_part, ml_part, block_tables, context_lens, k_new, v_new, slots, cos, sin,
        q if q_weight is None else q_weight, q if k_weight is None else k_weight, scale * LOG2E,
        q.stride(0), q.stride(1), krs, khs, vrs, vhs, o.stride(0), o.stride(1), block_tables.stride(0),
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1), cos.stride(0), sin.stride(0), eps,
        N_REP=n_rep, G=max(16, triton.next_power_of_2(n_rep)), HEAD_DIM=d, PAGE=page, SPLITS=splits,
        PREC=dot_precision(q.dtype), BLOCK_N=block_n, WRITE=new is not None, ROPE=rope_mode, num_warps=4,
        num_stages=2, **launch)
    if splits > 1:
        _merge_kernel[(batch, hq)](o, o_part, ml_part, o.stride(0), o.stride(1), hq, HEAD_DIM=d, SPLITS=splits,
                                   S_BLOCK=triton.next_power_of_2(splits), PRECISE=q.dtype == torch.float32,
                                   num_warps=4, **launch)
    return o


@torch.library.custom_op("tessera::paged_decode", mutates_args=())
def _paged_decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    return _paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale)


@_paged_decode_op.register_fake
def _(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
      context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    return q.new_empty(q.shape)


@torch.library.custom_op("tessera::paged_decode_write", mutates_args=("k_cache", "v_cache"))
def _paged_decode_write_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    return _paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale, (k, v, slot_mapping))


@_paged_decode_write_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
      slot_mapping: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    return q.new_empty(q.shape)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def attention_decode_paged(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Same contract as `reference.attention_decode_paged` (a sequence with no context yields zeros)."""
    q = _last_dim_contiguous(q)
    return _paged_decode_op(q, k_cache, v_cache, block_tables, context_lens,
                            q.shape[-1] ** -0.5 if scale is None else float(scale))


@torch.library.custom_op("tessera::paged_decode_rope", mutates_args=("k_cache", "v_cache"))
def _paged_decode_rope_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                          block_tables: torch.Tensor, context_lens: torch.Tensor, q_weight: torch.Tensor | None,
                          k_weight: torch.Tensor | None, eps: float, scale: float) -> torch.Tensor:
    return _paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale, (k, v, slot_mapping),
                         (cos, sin, q_weight, k_weight, eps))


@_paged_decode_rope_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
      v_cache: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
      q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float, scale: float) -> torch.Tensor:
    return q.new_empty(q.shape)


def attention_decode_paged_rope(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                                sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                slot_mapping: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                                q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None,
                                eps: float = 1e-6, scale: float | None = None) -> torch.Tensor:
    """Same contract as `reference.attention_decode_paged_rope`: rope (after QK-norm with weights), the cache
    write and paged decode in one launch."""
    q, k, v, cos, sin = (_last_dim_contiguous(t) for t in (q, k, v, cos, sin))
    return _paged_decode_rope_op(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, block_tables, context_lens,
                                 q_weight, k_weight, float(eps), q.shape[-1] ** -0.5 if scale is None else float(scale))


def attention_decode_paged_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                                 v_cache: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                                 context_lens: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Same contract as `reference.attention_decode_paged_write`: `kv_cache.write` and `attention.decode_paged`
    in one launch (a decode step's cache write no longer needs its own)."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    return _paged_decode_write_op(q, k, v, k_cache, v_cache, slot_mapping, block_tables, context_lens,
                                  q.shape[-1] ** -0.5 if scale is None else float(scale))


@triton.jit
def _prefill_paged_kernel(Q, K, V, O, TABLES, CU_Q, CTX, scale_log2, stride_qn, stride_qh, stride_kr, stride_kh,
                          stride_vr, stride_vh, stride_on, stride_oh, stride_tb, N_REP: tl.constexpr,
                          HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1)
    seq = tl.program_id(2)
    bos = tl.load(CU_Q + seq).to(tl.int64)
    q_len = (tl.load(CU_Q + seq + 1) - bos).to(tl.int32)
    if start_m >= q_len:
        return
    ctx = tl.load(CTX + seq)
    kv_head = head // N_REP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < q_len
    # Query row i is the token at cache position ctx - q_len + i.
    pos = ctx - q_len + offs_m
    q = tl.load(Q + (bos + offs_m[:, None]) * stride_qn + head * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    hi = tl.minimum(ctx, ctx - q_len + start_m + BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    table = TABLES + seq.to(tl.int64) * stride_tb
    for start in range(0, hi, BLOCK_N):
        tok = start + offs_n
        tok_ok = tok < hi
        page = tl.load(table + tok // PAGE, mask=tok_ok, other=0)
        row = page.to(tl.int64) * PAGE + tok % PAGE
        k = tl.load(K + row[None, :] * stride_kr + kv_head * stride_kh + offs_d[:, None], mask=tok_ok[None, :],
                    other=0.0)
        qk = tl.dot(q, k, input_precision=PREC) * scale_log2
        qk = tl.where(tok_ok[None, :] & (tok[None, :] <= pos[:, None]), qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # Padding rows past q_len can see no key in a tile; keep their max finite so no NaN arises.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + row[:, None] * stride_vr + kv_head * stride_vh + offs_d[None, :], mask=tok_ok[:, None],
                    other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new
    out = tl.where(l_i[:, None] > 0, divide(acc, l_i[:, None], PREC == "ieee"), 0.0)
    tl.store(O + (bos + offs_m[:, None]) * stride_on + head * stride_oh + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None])


@torch.library.custom_op("tessera::paged_prefill", mutates_args=())
def _paged_prefill_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, max_seqlen_q: int,
                      scale: float) -> torch.Tensor:
    n, hq, d = q.shape
    page, hkv = k_cache.shape[1], k_cache.shape[2]
    o = torch.empty_like(q)
    b = cu_seqlens_q.shape[0] - 1
    if n == 0 or b == 0:
        return o
    t = int(cu_seqlens_q.diff().max()) if max_seqlen_q < 0 else max_seqlen_q
    if triton_interpreting():
        bm, bn, warps, stages = 16, 16, 4, 1
    else:
        bm, bn, warps, stages = (64, 64, 4, 2) if d <= 128 and q.dtype != torch.float32 else (32, 32, 4, 1)
    krs, khs = _cache_strides(k_cache)
    vrs, vhs = _cache_strides(v_cache)
    _prefill_paged_kernel[(triton.cdiv(t, bm), hq, b)](
        q, k_cache, v_cache, o, block_tables, cu_seqlens_q, context_lens, scale * LOG2E, q.stride(0), q.stride(1),
        krs, khs, vrs, vhs, o.stride(0), o.stride(1), block_tables.stride(0), N_REP=hq // hkv, HEAD_DIM=d,
        PAGE=page, PREC=dot_precision(q.dtype), BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    return o


@_paged_prefill_op.register_fake
def _(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
      cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, max_seqlen_q: int, scale: float) -> torch.Tensor:
    return q.new_empty(q.shape)


def attention_prefill_paged(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                            max_seqlen_q: int | None = None, scale: float | None = None) -> torch.Tensor:
    """Same contract as `reference.attention_prefill_paged`."""
    q = q if q.stride(-1) == 1 else q.contiguous()
    return _paged_prefill_op(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens,
                             -1 if max_seqlen_q is None else int(max_seqlen_q),
                             q.shape[-1] ** -0.5 if scale is None else float(scale))


def _cache_reasons(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   block_tables: torch.Tensor, context_lens: torch.Tensor) -> list[str]:
    reasons = attention_reasons(q, k_cache, v_cache)
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        reasons.append(f"caches k={tuple(k_cache.shape)} v={tuple(v_cache.shape)} are not one [NB, BS, Hkv, D]")
        return reasons
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.stride(-1) != 1 or c.stride(0) != c.shape[1] * c.stride(1):
            reasons.append(f"{name} strides {c.stride()} do not let blocks be addressed as rows")
    page = k_cache.shape[1]
    if page & (page - 1):
        reasons.append(f"block_size={page} is not a power of two")
    for name, t in (("block_tables", block_tables), ("context_lens", context_lens)):
        if t.dtype != torch.int32:
            reasons.append(f"{name}.dtype={t.dtype} is not int32")
    if block_tables.stride(-1) != 1:
        reasons.append("block_tables' last dim is not contiguous")
    return reasons


def supports_decode(q: torch.Tensor | None = None, k_cache: torch.Tensor | None = None,
                    v_cache: torch.Tensor | None = None, block_tables: torch.Tensor | None = None,
                    context_lens: torch.Tensor | None = None, scale: float | None = None) -> list[str]:
    if q is None or k_cache is None or v_cache is None or block_tables is None or context_lens is None:
        return triton_device_reasons()
    reasons = triton_device_reasons(q, k_cache, v_cache, block_tables, context_lens)
    reasons += _cache_reasons(q, k_cache, v_cache, block_tables, context_lens)
    if q.shape[-2] // max(1, k_cache.shape[-2]) > 64:
        reasons.append(f"{q.shape[-2] // k_cache.shape[-2]} query heads per kv head > 64")
    return reasons + no_grad_reasons(q, k_cache, v_cache)


def supports_decode_write(q: torch.Tensor | None = None, k: torch.Tensor | None = None, v: torch.Tensor | None = None,
                          k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None,
                          slot_mapping: torch.Tensor | None = None, block_tables: torch.Tensor | None = None,
                          context_lens: torch.Tensor | None = None, scale: float | None = None) -> list[str]:
    if k is None or v is None or slot_mapping is None:
        return triton_device_reasons()
    reasons = supports_decode(q, k_cache, v_cache, block_tables, context_lens, scale)
    if q is None or k_cache is None:
        return reasons
    reasons += triton_device_reasons(k, v, slot_mapping)
    want = (q.shape[0], *k_cache.shape[2:])
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape) != want:
            reasons.append(f"{name}.shape={tuple(t.shape)} is not [B, Hkv, D]={want}")
        if t.dtype != q.dtype:
            reasons.append(f"{name}.dtype={t.dtype} is not q's {q.dtype}")
    if slot_mapping.dtype != torch.int64 or tuple(slot_mapping.shape) != (q.shape[0],):
        reasons.append(f"slot_mapping {tuple(slot_mapping.shape)}/{slot_mapping.dtype} is not [B={q.shape[0]}] int64")
    return reasons + no_grad_reasons(k, v)


def supports_decode_rope(q: torch.Tensor | None = None, k: torch.Tensor | None = None,
                         v: torch.Tensor | None = None, cos: torch.Tensor | None = None,
                         sin: torch.Tensor | None = None, k_cache: torch.Tensor | None = None,
                         v_cache: torch.Tensor | None = None, slot_mapping: torch.Tensor | None = None,
                         block_tables: torch.Tensor | None = None, context_lens: torch.Tensor | None = None,
                         q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None,
                         eps: float = 1e-6, scale: float | None = None) -> list[str]:
    if cos is None or sin is None:
        return triton_device_reasons()
    reasons = supports_decode_write(q, k, v, k_cache, v_cache, slot_mapping, block_tables, context_lens, scale)
    if q is None:
        return reasons
    d = q.shape[-1]
    if d % 2 or d & (d - 1):
        reasons.append(f"head_dim={d} is not an even power of two")
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != (q.shape[0], d):
            reasons.append(f"{name}.shape={tuple(t.shape)} is not [B, D]=({q.shape[0]}, {d})")
        if not t.is_floating_point():
            reasons.append(f"{name}.dtype={t.dtype} is not floating point")
    if (q_weight is None) != (k_weight is None):
        reasons.append("q_weight and k_weight come together (QK-norm) or not at all")
    for name, t in (("q_weight", q_weight), ("k_weight", k_weight)):
        if t is not None and (tuple(t.shape) != (d,) or t.stride(-1) != 1):
            reasons.append(f"{name} {tuple(t.shape)} is not a contiguous [D={d}]")
    return reasons + triton_device_reasons(cos, sin, *(t for t in (q_weight, k_weight) if t is not None))


def supports_prefill(q: torch.Tensor | None = None, k_cache: torch.Tensor | None = None,
                     v_cache: torch.Tensor | None = None, block_tables: torch.Tensor | None = None,
                     cu_seqlens_q: torch.Tensor | None = None, context_lens: torch.Tensor | None = None,
                     max_seqlen_q: int | None = None, scale: float | None = None) -> list[str]:
    if q is None or k_cache is None or v_cache is None or block_tables is None or context_lens is None:
        return triton_device_reasons()
    reasons = triton_device_reasons(q, k_cache, v_cache, block_tables, context_lens)
    reasons += _cache_reasons(q, k_cache, v_cache, block_tables, context_lens)
    if cu_seqlens_q is None or cu_seqlens_q.dtype not in (torch.int32, torch.int64):
        reasons.append("cu_seqlens_q must be an int32/int64 tensor")
    return reasons + no_grad_reasons(q, k_cache, v_cache)


def register(reg: KernelRegistry) -> None:
    reg.register("attention.decode_paged", "triton", attention_decode_paged, supports=supports_decode, priority=20)
    reg.register("attention.decode_paged_write", "triton", attention_decode_paged_write,
                 supports=supports_decode_write, priority=20)
    reg.register("attention.decode_paged_rope", "triton", attention_decode_paged_rope,
                 supports=supports_decode_rope, priority=20)
    reg.register("attention.prefill_paged", "triton", attention_prefill_paged, supports=supports_prefill,
                 priority=20)
