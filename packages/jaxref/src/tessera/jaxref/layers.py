"""The pieces of a decoder block as pure functions of arrays: RMSNorm, RoPE, attention, SwiGLU.

Numerics follow the torch references (`tessera.kernels.reference`) and Hugging Face Llama/Qwen:
RMSNorm and softmax run in float32 and cast back; RoPE is "rotate_half" with cos/sin within two
float32 ulps of exact, cast to the activation dtype; attention accumulates in float32; float32
projections and attention's sum over keys add their products in blocks (`blocked_sum`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from tessera.specs import RopeScaling

# A float32 sum over a long contraction axis (a projection's K, attention's keys) runs in blocks of
# this many terms, added pairwise. XLA's CPU dot adds up to 512 products into one running sum (its
# results equal 512-term blocks summed in order), twice the rounding error of the BLAS under the
# torch model, and that error is most of this forward's float32 error (README, "Numerics"). Llama-3.2-1B
# logits at 512 tokens against float64, by block: 128 -> 1.18e-5, 64 -> 9.5e-6, 32 -> 7.9e-6, 16 ->
# 7.5e-6 on a CPU (compile and run 30 / 60 / 193 / 622 s); on an H200 1.42e-5 / 1.32e-5 / 1.22e-5 at
# 128 / 64 / 32, and 3.3e-5 as one dot. 32 is where smaller blocks stop paying for their compile time.
SUM_BLOCK = 32


def blocked_sum(term: Callable[[int, int], jax.Array], n: int, dtype: jnp.dtype) -> jax.Array:
    """`term(0, n)`, where `term(i, j)` sums terms `i..j-1` of a contraction: for float32 as the
    pairwise sum of `term` over consecutive blocks of at most `SUM_BLOCK`; for other dtypes in one
    call (their rounding of the inputs dwarfs the accumulation error, and one dot is fastest)."""
    def pairwise(start: int, stop: int) -> jax.Array:
        if stop - start <= SUM_BLOCK:
            return term(start, stop)
        mid = start + SUM_BLOCK * -(-(stop - start) // (2 * SUM_BLOCK))
        return pairwise(start, mid) + pairwise(mid, stop)

    return pairwise(0, n) if dtype == jnp.float32 else term(0, n)


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """`x [..., K] @ w [K, N]`, summed over K as `blocked_sum` says."""
    return blocked_sum(lambda i, j: x[..., i:j] @ w[i:j], x.shape[-1], x.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """`x * rsqrt(mean(x^2) + eps) * weight` over the last axis, in float32, returned in `x.dtype`."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """Inverse frequencies `[head_dim // 2]` float32: `theta ** (-2i / head_dim)`, then scaled.

    `linear` divides every frequency by `factor`; `llama3` divides the low band (wavelength above
    `original_max_position_embeddings / low_freq_factor`) by `factor`, keeps the high band
    (wavelength below `original / high_freq_factor`) and blends linearly in between. Computed on
    the host in float32, as the torch model does, so both see the same table.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    # The float32 power, correctly rounded (computed in float64, then rounded once): numpy's float32
    # `**` is off by an ulp for several exponents, and at position 511 one ulp of frequency turns a
    # 3e-5 rotation error into logit differences of ~6e-5 (Llama-3.2-1B).
    power = (np.float64(theta) ** exponents.astype(np.float64)).astype(np.float32)
    inv_freq = (np.float32(1.0) / power).astype(np.float32)
    if scaling is None:
        return inv_freq
    factor = np.float32(scaling.factor)
    if scaling.type == "linear":
        return inv_freq / factor
    old_len = scaling.original_max_position_embeddings
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (np.float32(old_len) / wavelen - np.float32(low)) / np.float32(high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, blended, scaled).astype(np.float32)


def _split_float32(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 `x` as `hi + lo` exactly, each with at most 12 significant bits (`hi` keeps the top 12)."""
    x = np.asarray(x, np.float32)
    hi = (x.view(np.uint32) & np.uint32(0xFFFFF000)).view(np.float32)
    return hi, x - hi


def rope_tables(positions: jax.Array, inv_freq: np.ndarray, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """`positions [B, T]` int (`|position| < 2**24`) -> `(cos, sin)` each `[B, T, head_dim]` in `dtype`,
    within two float32 ulps of the exact cos/sin of `position * inv_freq`.

    The float32 angle `hi` is off by up to half an ulp (1.5e-5 rad at position 511, 4e-3 at 131071),
    which was the largest float32 error of a Llama-3.2-1B forward at 512 tokens. Dekker's product gives that
    rounding error `lo` exactly (12-bit halves multiply exactly), and cos/sin of `hi + lo` follow from
    those of `hi` by the angle-sum formulas, with `cos lo = 1 - lo^2 / 2` and `sin lo = lo`.
    """
    freq_hi, freq_lo = (jnp.asarray(f) for f in _split_float32(inv_freq))
    pos = positions[..., None]
    pos_lo = pos & 0xFFF
    pos_hi, pos_lo = (pos - pos_lo).astype(jnp.float32), pos_lo.astype(jnp.float32)
    hi = pos.astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
    lo = ((pos_hi * freq_hi - hi) + pos_hi * freq_lo + pos_lo * freq_hi) + pos_lo * freq_lo
    cos_hi, sin_hi, cos_lo = jnp.cos(hi), jnp.sin(hi), 1 - 0.5 * lo * lo
    cos, sin = cos_hi * cos_lo - sin_hi * lo, sin_hi * cos_lo + cos_hi * lo
    return jnp.concatenate([cos, cos], axis=-1).astype(dtype), jnp.concatenate([sin, sin], axis=-1).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate `x [B, T, H, D]` by `cos`/`sin [B, T, D]`, pairing dim i with dim i + D/2."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
    """Causal grouped-query attention.

    q `[B, Tq, Hq, D]`, k/v `[B, Tk, Hkv, D]` (Hq % Hkv == 0; query head h reads kv head
    h // (Hq // Hkv)), `q_pos [B, Tq]` and `k_pos [B, Tk]` absolute positions: query i sees key j
    iff `k_pos[j] <= q_pos[i]`. Scores and softmax in float32, scale `D ** -0.5`, the sum over keys
    as `blocked_sum` says; returns `[B, Tq, Hq, D]` in `q.dtype`.
    """
    b, tq, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, tq, hkv, hq // hkv, d)
    scores = jnp.einsum("btgrd,bsgd->bgrts", qg, k, preferred_element_type=jnp.float32) * (d ** -0.5)
    visible = k_pos[:, None, None, None, :] <= q_pos[:, None, None, :, None]
    scores = jnp.where(visible, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)

    def values(i: int, j: int) -> jax.Array:
        return jnp.einsum("bgrts,bsgd->btgrd", probs[..., i:j], v[:, i:j], preferred_element_type=jnp.float32)

    out = blocked_sum(values, k.shape[1], v.dtype)
    return out.reshape(b, tq, hq, d).astype(q.dtype)


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array) -> jax.Array:
    """`silu(x @ w_gate) * (x @ w_up)` with weights `[D, F]`."""
    return jax.nn.silu(matmul(x, w_gate)) * matmul(x, w_up)
