"""Rotary position embedding for q and k in one launch (optionally after a per-head RMSNorm: Qwen3's QK-norm).

One launch rotates every query and key head of every token row, where the unfused torch code pays
about ten (two `rotate_half` cats, negations, products, sums, two norms). A program takes one row and
a block of heads of q or of k: a whole tensor's heads for a long prefill, a few at decode, where the
rows alone are too few programs and one program walking all heads of a row would be one long
dependent chain of loads, reductions and stores. Math is float32 and the result is rounded once.
Inputs may have any strides (the head slices of a fused qkv projection included); outputs are
contiguous `[N, H, D]`.

The rotation is linear, so its backward is the transposed rotation: the same kernel with the sine
halves swapped and negated. Gradients of cos/sin (rarely wanted: they come from positions) and the
norm's backward are closed forms in torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tessera.kernels.custom_ops import eager_bypass
from tessera.kernels.support import FLOATS, dtype_reasons, same_dtype_reasons, triton_device_reasons
from tessera.kernels.triton import pdl
from tessera.kernels.triton.norm import norm_grads
from tessera.kernels.triton.tiles import divide, inv_sqrt
from tessera.specs import KernelRegistry

MAX_HEAD_DIM = 512
_TILE = 4096  # elements of one [heads, D/2] half-tile a program holds at a time
#: Below this many token rows (a decode step's batch) a program takes at most _DECODE_HEADS heads.
_FEW_ROWS = 256
_DECODE_HEADS = 4


@triton.jit
def rotate_halves(x1, x2, W, d, dmask, c1, c2, s1, s2, eps, HALF: tl.constexpr, NORM: tl.constexpr,
                  PRECISE: tl.constexpr):
    """The rotated halves (float32) of heads whose halves are x1, x2 [heads, BLOCK_D] (float32), after a
    per-head RMSNorm with weight W [2 * HALF] when NORM. `d`, `dmask`: the half's columns and which are real;
    c1, c2, s1, s2 [BLOCK_D]: the row's tables. Shared by the rope kernel and the paged decode kernel's
    rotary prologue; the rotation itself is `rotate_pair`."""
    if NORM:
        w1 = tl.load(W + d, mask=dmask, other=0.0).to(tl.float32)
        w2 = tl.load(W + HALF + d, mask=dmask, other=0.0).to(tl.float32)
        rstd = inv_sqrt(divide(tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1), 2 * HALF, PRECISE) + eps, PRECISE)
        # Kept in float32 for the rotation: rounding here too would let a one-ulp difference in the
        # normed value (a tie broken differently) reach the output multiplied by the tables.
        x1 = x1 * rstd[:, None] * w1[None, :]
        x2 = x2 * rstd[:, None] * w2[None, :]
    return rotate_pair(x1, x2, c1[None, :], c2[None, :], s1[None, :], s2[None, :])


@triton.jit
def rotate_pair(x1, x2, c1, c2, s1, s2):
    """The rotate-half rope of float32 halves x1, x2 with the tables of their columns (c1, s1 of the first half's,
    c2, s2 of the second's, broadcastable): (x1 c1 - x2 s1, x2 c2 + x1 s2). Every kernel that rotates uses this
    expression: explicit fmas, since left to the compiler `a * b - c * d` contracts to an fma over either product
    depending on the kernel around it, and two kernels would round differently."""
    return tl.fma(x1, c1, -(x2 * s1)), tl.fma(x2, c2, x1 * s2)


@triton.jit
def _rotate_heads(X, W, O, row, h0, sx_n, sx_h, sx_d, so_n, so_h, H, c1, c2, s1, s2, eps,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, NORM: tl.constexpr,
                  PRECISE: tl.constexpr):
    """Heads [h0, h0 + BLOCK_H) of token `row` (those below H)."""
    d = tl.arange(0, BLOCK_D)
    dmask = d < HALF
    h = h0 + tl.arange(0, BLOCK_H)
    mask = (h < H)[:, None] & dmask[None, :]
    base = X + row * sx_n + h[:, None] * sx_h
    x1 = tl.load(base + d[None, :] * sx_d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + (d[None, :] + HALF) * sx_d, mask=mask, other=0.0).to(tl.float32)
    r1, r2 = rotate_halves(x1, x2, W, d, dmask, c1, c2, s1, s2, eps, HALF, NORM, PRECISE)
    out = O + row * so_n + h[:, None] * so_h + d[None, :]
    tl.store(out, r1.to(O.dtype.element_ty), mask=mask)
    tl.store(out + HALF, r2.to(O.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(Q, K, COS, SIN, QW, KW, QO, KO,
                 sq_n, sq_h, sq_d, sk_n, sk_h, sk_d, sc_n, sc_d, ss_n, ss_d, sqo_n, sqo_h, sko_n, sko_h,
                 HQ, HKV, eps, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                 NORM: tl.constexpr, TRANSPOSE: tl.constexpr, PDL: tl.constexpr = 0, PRECISE: tl.constexpr = False):
    pdl.enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)  # the first cdiv(HQ, BLOCK_H) blocks are q's heads, the rest k's
    q_blocks = tl.cdiv(HQ, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HALF
    c1 = tl.load(COS + row * sc_n + d * sc_d, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + row * sc_n + (d + HALF) * sc_d, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + row * ss_n + d * ss_d, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + row * ss_n + (d + HALF) * ss_d, mask=dmask, other=0.0).to(tl.float32)
    if TRANSPOSE:
        # Per frequency the rotation is [[c1, -s1], [s2, c2]]; its transpose is the same form with
        # sine halves (-s2, -s1).
        s1, s2 = -s2, -s1
    if block < q_blocks:
        _rotate_heads(Q, QW, QO, row, block * BLOCK_H, sq_n, sq_h, sq_d, sqo_n, sqo_h, HQ, c1, c2, s1, s2, eps,
                      HALF, BLOCK_H, BLOCK_D, NORM, PRECISE)
    else:
        _rotate_heads(K, KW, KO, row, (block - q_blocks) * BLOCK_H, sk_n, sk_h, sk_d, sko_n, sko_h, HKV, c1, c2,
                      s1, s2, eps, HALF, BLOCK_H, BLOCK_D, NORM, PRECISE)


def _launch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            weights: tuple[torch.Tensor, torch.Tensor] | None, eps: float,
            transpose: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n, hq, d = q.shape
    hkv = k.shape[1]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if n == 0:
        return q_out, k_out
    block_d = triton.next_power_of_2(d // 2)
    block_h = max(1, min(triton.next_power_of_2(max(hq, hkv)), _TILE // block_d))
    if n < _FEW_ROWS:
        block_h = min(block_h, _DECODE_HEADS)
    tile = block_h * block_d
    qw, kw = weights if weights is not None else (q, k)
    _rope_kernel[(n, triton.cdiv(hq, block_h) + triton.cdiv(hkv, block_h))](
        q, k, cos, sin, qw, kw, q_out, k_out, *q.stride(), *k.stride(), *cos.stride(), *sin.stride(),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), hq, hkv, eps,
        HALF=d // 2, BLOCK_H=block_h, BLOCK_D=block_d, NORM=weights is not None, TRANSPOSE=transpose,
        PRECISE=q.dtype == torch.float32,
        num_warps=2 if tile <= 512 else 4 if tile <= 2048 else 8, **pdl.launch_options(q.device))
    return q_out, k_out


def _table_grads(ctx: object, dq: torch.Tensor, dk: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                 transpose: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """d/dcos = sum over heads of dy * x; d/dsin = sum over heads of dy * rotate_half(x) (x: what was
    rotated). The transposed rotation reads sin with its halves swapped and negated, so its d/dsin is too."""
    want_cos, want_sin = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
    if not (want_cos or want_sin):
        return None, None
    dcos = dsin = None
    for dy, x in ((dq.float(), q.float()), (dk.float(), k.float())):
        x1, x2 = x.chunk(2, dim=-1)
        part_cos = (dy * x).sum(1)
        part_sin = (dy * torch.cat((-x2, x1), dim=-1)).sum(1)
        dcos = part_cos if dcos is None else dcos + part_cos
        dsin = part_sin if dsin is None else dsin + part_sin
    if transpose:
        dsin = -dsin.roll(dsin.shape[-1] // 2, dims=-1)
    return (dcos.to(ctx.cos_dtype) if want_cos else None), (dsin.to(ctx.sin_dtype) if want_sin else None)


def _rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
          transpose: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(q, k, cos, sin, None, 0.0, transpose)


_rope_op = torch.library.custom_op("tessera::rope", _rope, mutates_args=())


@_rope_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
      transpose: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _rope_setup(ctx: object, inputs: tuple, output: tuple) -> None:
    q, k, cos, sin, transpose = inputs
    ctx.transpose, ctx.cos_dtype, ctx.sin_dtype = transpose, cos.dtype, sin.dtype
    wants_tables = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
    ctx.save_for_backward(cos, sin, *((q, k) if wants_tables else ()))


def _rope_backward(ctx: object, dq_out: torch.Tensor, dk_out: torch.Tensor) -> tuple:
    cos, sin, *qk = ctx.saved_tensors
    dq, dk = _rope_op(dq_out, dk_out, cos, sin, not ctx.transpose)
    dcos, dsin = _table_grads(ctx, dq_out, dk_out, *qk, transpose=ctx.transpose) if qk else (None, None)
    return dq, dk, dcos, dsin, None


_rope_op.register_autograd(_rope_backward, setup_context=_rope_setup)


def _rope_qk_norm(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(q, k, cos, sin, (q_weight.contiguous(), k_weight.contiguous()), eps, False)


_rope_qk_norm_op = torch.library.custom_op("tessera::rope_qk_norm", _rope_qk_norm, mutates_args=())


@_rope_qk_norm_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_weight: torch.Tensor,
      k_weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _rope_qk_norm_setup(ctx: object, inputs: tuple, output: tuple) -> None:
    q, k, cos, sin, q_weight, k_weight, eps = inputs
    ctx.eps, ctx.cos_dtype, ctx.sin_dtype = eps, cos.dtype, sin.dtype
    ctx.save_for_backward(q, k, cos, sin, q_weight, k_weight)


def _rope_qk_norm_backward(ctx: object, dq_out: torch.Tensor, dk_out: torch.Tensor) -> tuple:
    q, k, cos, sin, q_weight, k_weight = ctx.saved_tensors
    dnq, dnk = _rope_op(dq_out.float(), dk_out.float(), cos, sin, True)
    dq, dqw, nq = norm_grads(dnq, q, q_weight, ctx.eps)
    dk, dkw, nk = norm_grads(dnk, k, k_weight, ctx.eps)
    dcos, dsin = _table_grads(ctx, dq_out, dk_out, nq, nk)
    return dq.to(q.dtype), dk.to(k.dtype), dcos, dsin, dqw, dkw, None


_rope_qk_norm_op.register_autograd(_rope_qk_norm_backward, setup_context=_rope_qk_norm_setup)


_rope_call = eager_bypass(_rope_op, _rope)
_rope_qk_norm_call = eager_bypass(_rope_qk_norm_op, _rope_qk_norm)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _rope_call(q, k, cos, sin, False)


def rope_qk_norm(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_weight: torch.Tensor,
                 k_weight: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    return _rope_qk_norm_call(q, k, cos, sin, q_weight, k_weight, float(eps))


def _shape_reasons(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> list[str]:
    reasons = []
    if q.dim() != 3 or k.dim() != 3:
        return [f"q {tuple(q.shape)} and k {tuple(k.shape)} must be [N, H, D]"]
    n, _, d = q.shape
    if k.shape[0] != n or k.shape[2] != d:
        reasons.append(f"k.shape={tuple(k.shape)} does not match q's N={n}, D={d}")
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != (n, d):
            reasons.append(f"{name}.shape={tuple(t.shape)}, want [N={n}, D={d}]")
        reasons += dtype_reasons(name, t, FLOATS)
    if d % 2 or d > MAX_HEAD_DIM:
        reasons.append(f"head dim D={d} must be even and <= {MAX_HEAD_DIM}")
    return reasons + dtype_reasons("q", q, FLOATS) + same_dtype_reasons(q=q, k=k)


def supports_rope(q: torch.Tensor | None = None, k: torch.Tensor | None = None, cos: torch.Tensor | None = None,
                  sin: torch.Tensor | None = None) -> list[str]:
    if q is None or k is None or cos is None or sin is None:
        return triton_device_reasons()
    return triton_device_reasons(q, k, cos, sin) + _shape_reasons(q, k, cos, sin)


def supports_rope_qk_norm(q: torch.Tensor | None = None, k: torch.Tensor | None = None,
                          cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                          q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None,
                          eps: float = 1e-6) -> list[str]:
    if q is None or k is None or cos is None or sin is None or q_weight is None or k_weight is None:
        return triton_device_reasons()
    reasons = triton_device_reasons(q, k, cos, sin, q_weight, k_weight) + _shape_reasons(q, k, cos, sin)
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w.shape != q.shape[-1:]:
            reasons.append(f"{name}.shape={tuple(w.shape)}, want [D={q.shape[-1]}]")
        reasons += dtype_reasons(name, w, FLOATS)
    return reasons


def register(reg: KernelRegistry) -> None:
    reg.register("rope", "triton", rope, supports=supports_rope, priority=20)
    reg.register("rope_qk_norm", "triton", rope_qk_norm, supports=supports_rope_qk_norm, priority=20)
