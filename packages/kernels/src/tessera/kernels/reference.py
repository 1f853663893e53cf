"""Plain-torch reference implementations: the ground truth every other backend is tested against.

Each function's signature is the op's contract (see `tessera.specs.kernels.CATALOGUE`). They favour
clarity over speed, compute in float32 where precision matters (float64 inputs stay float64, so a
float64 model is a true float64 reference), and run on any device.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


def _wide(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32, or float64 where it already is."""
    return x if x.dtype == torch.float64 else x.float()


def _normed(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_norm's math without its final rounding."""
    xf = _wide(x)
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * _wide(weight)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return _normed(x, weight, eps).to(x.dtype)


def rms_norm_residual(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                      eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    h = x + residual
    return rms_norm(h, weight, eps), h


def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    return F.silu(x @ w_gate.T) * (x @ w_up.T)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, H, D] rotated by cos/sin [N, D] in float32: `x * cos + rotate_half(x) * sin`, rounded once."""
    xf = _wide(x)
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * _wide(cos)[:, None] + rotated * _wide(sin)[:, None]).to(x.dtype)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
         sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def rope_qk_norm(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_weight: torch.Tensor,
                 k_weight: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """rms_norm then rope, in float32 throughout and rounded once at the end (not between the two)."""
    return (_rotate(_normed(q, q_weight, eps), cos, sin).to(q.dtype),
            _rotate(_normed(k, k_weight, eps), cos, sin).to(k.dtype))


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal_offset: int | None,
          scale: float | None) -> torch.Tensor:
    """q [Tq, Hq, D], k/v [Tk, Hkv, D] -> [Tq, Hq, D]. Query i sits at key position i + offset;
    `causal_offset=None` means no mask."""
    n_rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(n_rep, dim=1)
    v = v.repeat_interleave(n_rep, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("qhd,khd->hqk", _wide(q), _wide(k)) * scale
    if causal_offset is not None:
        tq, tk = q.shape[0], k.shape[0]
        qpos = torch.arange(tq, device=q.device)[:, None] + causal_offset
        kpos = torch.arange(tk, device=q.device)[None, :]
        scores = scores.masked_fill(kpos > qpos, float("-inf"))
    probs = scores.softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, _wide(v)).to(q.dtype)


def attention_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                      max_seqlen: int | None = None, causal: bool = True,
                      scale: float | None = None) -> torch.Tensor:
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in itertools.pairwise(bounds):
        if end > start:
            out[start:end] = _sdpa(q[start:end], k[start:end], v[start:end], 0 if causal else None, scale)
    return out


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    block_size = cache.shape[1]
    n_blocks = -(-length // block_size)
    blocks = cache[block_table[:n_blocks].long()]  # [n, BS, H, D]
    return blocks.reshape(-1, *cache.shape[2:])[:length]


def attention_prefill_paged(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            context_lens: torch.Tensor, max_seqlen_q: int | None = None,
                            scale: float | None = None) -> torch.Tensor:
    out = torch.empty_like(q)
    bounds = cu_seqlens_q.tolist()
    for i, (start, end) in enumerate(itertools.pairwise(bounds)):
        if end == start:
            continue
        ctx = int(context_lens[i])
        k = _gather_context(k_cache, block_tables[i], ctx)
        v = _gather_context(v_cache, block_tables[i], ctx)
        out[start:end] = _sdpa(q[start:end], k, v, ctx - (end - start), scale)
    return out


def attention_decode_paged(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           scale: float | None = None) -> torch.Tensor:
    out = torch.empty_like(q)
    for i in range(q.shape[0]):
        ctx = int(context_lens[i])
        if ctx == 0:
            out[i] = 0
            continue
        k = _gather_context(k_cache, block_tables[i], ctx)
        v = _gather_context(v_cache, block_tables[i], ctx)
        out[i] = _sdpa(q[i : i + 1], k, v, ctx - 1, scale)[0]
    return out


def kv_cache_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


def attention_decode_paged_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                                 v_cache: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                                 context_lens: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    kv_cache_write(k, v, k_cache, v_cache, slot_mapping)
    return attention_decode_paged(q, k_cache, v_cache, block_tables, context_lens, scale)


def attention_decode_paged_rope(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                                sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                slot_mapping: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                                q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None,
                                eps: float = 1e-6, scale: float | None = None) -> torch.Tensor:
    if (q_weight is None) != (k_weight is None):
        raise ValueError("attention.decode_paged_rope: q_weight and k_weight come together (QK-norm) or not at all")
    if q_weight is None:
        q, k = rope(q, k, cos, sin)
    else:
        q, k = rope_qk_norm(q, k, cos, sin, q_weight, k_weight, eps)
    return attention_decode_paged_write(q, k, v, k_cache, v_cache, slot_mapping, block_tables, context_lens, scale)


def matmul_dense(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)


def matmul_int8_weight_only(x: torch.Tensor, w_q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    w = w_q.float() * scale.float()[:, None]
    return (x.float() @ w.T).to(x.dtype)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """[N, K // 2] uint8 -> [N, K] uint8 values in [0, 15]; even k in the low nibble."""
    low = qweight & 0x0F
    high = qweight >> 4
    return torch.stack((low, high), dim=-1).reshape(qweight.shape[0], -1)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] integers in [0, 15] (K even) -> [N, K // 2] uint8; inverse of `unpack_int4`."""
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even K, got {q.shape[-1]}")
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int) -> torch.Tensor:
    q = unpack_int4(qweight).float()
    s = scales.float().repeat_interleave(group_size, dim=1)[:, : q.shape[1]]
    z = zeros.float().repeat_interleave(group_size, dim=1)[:, : q.shape[1]]
    return (q - z) * s


def matmul_int4_awq(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int) -> torch.Tensor:
    w = dequantize_int4(qweight, scales, zeros, group_size)
    return (x.float() @ w.T).to(x.dtype)


FP8_MAX = 448.0


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row E4M3 quantization: returns (x_q [M, K] float8_e4m3fn, scale [M] float32)."""
    amax = x.float().abs().amax(dim=-1).clamp(min=1e-12)
    scale = amax / FP8_MAX
    x_q = (x.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return x_q, scale


def matmul_fp8(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    x_q, x_scale = quantize_fp8_rows(x)
    ws = w_scale.float()
    w = w_q.float() * (ws[:, None] if ws.numel() > 1 else ws)
    return ((x_q.float() * x_scale[:, None]) @ w.T).to(x.dtype)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def gated_halves(gu: torch.Tensor) -> torch.Tensor:
    """silu_mul of a fused gate/up output's halves: gu [M, 2K] -> [M, K]."""
    if gu.shape[-1] % 2:
        raise ValueError(f"gu.shape={tuple(gu.shape)}: a fused gate/up output has an even width")
    k = gu.shape[-1] // 2
    return silu_mul(gu[..., :k], gu[..., k:])


def matmul_dense_gated(gu: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return matmul_dense(gated_halves(gu), w)


def matmul_int8_weight_only_gated(gu: torch.Tensor, w_q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return matmul_int8_weight_only(gated_halves(gu), w_q, scale)


def matmul_int4_awq_gated(gu: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                          group_size: int) -> torch.Tensor:
    return matmul_int4_awq(gated_halves(gu), qweight, scales, zeros, group_size)


def matmul_int4_awq_swiglu(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                           group_size: int) -> torch.Tensor:
    """silu_mul of the halves of x's product with a fused gate/up weight (gate rows first): [M, N / 2]."""
    if qweight.shape[0] % 2:
        raise ValueError(f"qweight.shape={tuple(qweight.shape)}: a fused gate/up weight has an even row count")
    return gated_halves(matmul_int4_awq(x, qweight, scales, zeros, group_size))


def qkv_heads(y: torch.Tensor, n_q_heads: int, n_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fused q/k/v output y [M, (Hq + 2 Hkv) D] as views q [M, Hq, D], k and v [M, Hkv, D]."""
    heads = n_q_heads + 2 * n_kv_heads
    if n_q_heads < 0 or n_kv_heads < 1 or y.shape[-1] % heads:
        raise ValueError(f"a fused q/k/v output of width {y.shape[-1]} is not (n_q_heads + 2 n_kv_heads) * head_dim "
                         f"for n_q_heads={n_q_heads}, n_kv_heads={n_kv_heads}")
    return y.view(y.shape[0], heads, y.shape[-1] // heads).split((n_q_heads, n_kv_heads, n_kv_heads), dim=1)


def _rotated_and_cached(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, slot_mapping: torch.Tensor, n_q_heads: int,
                        n_kv_heads: int) -> torch.Tensor:
    """Of a fused q/k/v output y [M, (Hq + 2 Hkv) D]: the q and k heads rotated (`rope`, cos/sin [M, D]) and the
    rotated k and v written at `slot_mapping` (`kv_cache_write`). Returns the rotated q [M, Hq, D]."""
    q, k, v = qkv_heads(y, n_q_heads, n_kv_heads)
    q, k = rope(q, k, cos, sin)
    kv_cache_write(k, v, k_cache, v_cache, slot_mapping)
    return q


def _qkv_rows(weight: torch.Tensor, n_q_heads: int, n_kv_heads: int) -> None:
    if n_q_heads < 0 or n_kv_heads < 1 or weight.shape[0] % (n_q_heads + 2 * n_kv_heads):
        raise ValueError(f"the weight's shape {tuple(weight.shape)} does not have (n_q_heads + 2 n_kv_heads) * "
                         f"head_dim rows for n_q_heads={n_q_heads}, n_kv_heads={n_kv_heads}")


def matmul_int4_awq_qkv_rope(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                             group_size: int, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                             v_cache: torch.Tensor, slot_mapping: torch.Tensor, n_q_heads: int,
                             n_kv_heads: int) -> torch.Tensor:
    """A decode step's fused q/k/v projection, rope and cache write: of y = x @ W.T [M, (Hq + 2 Hkv) D], the q and
    k heads rotated (`rope`, cos/sin [M, D]) and the rotated k and v written at `slot_mapping` (`kv_cache_write`).
    Returns the rotated q [M, Hq, D]."""
    _qkv_rows(qweight, n_q_heads, n_kv_heads)
    return _rotated_and_cached(matmul_int4_awq(x, qweight, scales, zeros, group_size), cos, sin, k_cache, v_cache,
                               slot_mapping, n_q_heads, n_kv_heads)


def matmul_int8_weight_only_qkv_rope(x: torch.Tensor, w_q: torch.Tensor, scale: torch.Tensor, cos: torch.Tensor,
                                     sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                     slot_mapping: torch.Tensor, n_q_heads: int, n_kv_heads: int) -> torch.Tensor:
    """`matmul_int4_awq_qkv_rope` with an int8 weight-only projection (`matmul_int8_weight_only`)."""
    _qkv_rows(w_q, n_q_heads, n_kv_heads)
    return _rotated_and_cached(matmul_int8_weight_only(x, w_q, scale), cos, sin, k_cache, v_cache, slot_mapping,
                               n_q_heads, n_kv_heads)


def matmul_dense_normed(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, w: torch.Tensor,
                        eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    normed, h = rms_norm_residual(x, residual, weight, eps)
    return matmul_dense(normed, w), h


def matmul_int8_weight_only_normed(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, w_q: torch.Tensor,
                                   scale: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    normed, h = rms_norm_residual(x, residual, weight, eps)
    return matmul_int8_weight_only(normed, w_q, scale), h


def matmul_int4_awq_normed(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, qweight: torch.Tensor,
                           scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                           eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    normed, h = rms_norm_residual(x, residual, weight, eps)
    return matmul_int4_awq(normed, qweight, scales, zeros, group_size), h


REFERENCES = {
    "rms_norm": rms_norm,
    "rms_norm_residual": rms_norm_residual,
    "swiglu": swiglu,
    "silu_mul": silu_mul,
    "rope": rope,
    "rope_qk_norm": rope_qk_norm,
    "attention.prefill": attention_prefill,
    "attention.prefill_paged": attention_prefill_paged,
    "attention.decode_paged": attention_decode_paged,
    "attention.decode_paged_write": attention_decode_paged_write,
    "attention.decode_paged_rope": attention_decode_paged_rope,
    "kv_cache.write": kv_cache_write,
    "matmul.dense": matmul_dense,
    "matmul.int8_weight_only": matmul_int8_weight_only,
    "matmul.int4_awq": matmul_int4_awq,
    "matmul.fp8": matmul_fp8,
    "matmul.dense_gated": matmul_dense_gated,
    "matmul.int8_weight_only_gated": matmul_int8_weight_only_gated,
    "matmul.int4_awq_gated": matmul_int4_awq_gated,
    "matmul.int4_awq_swiglu": matmul_int4_awq_swiglu,
    "matmul.int4_awq_qkv_rope": matmul_int4_awq_qkv_rope,
    "matmul.int8_weight_only_qkv_rope": matmul_int8_weight_only_qkv_rope,
    "matmul.dense_normed": matmul_dense_normed,
    "matmul.int8_weight_only_normed": matmul_int8_weight_only_normed,
    "matmul.int4_awq_normed": matmul_int4_awq_normed,
}
