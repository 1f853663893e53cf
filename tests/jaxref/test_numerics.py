"""The float32 numerics of `tessera.jaxref.layers`: the blocked sums count every term once whatever the
block layout, beat one XLA dot against float64 and leave bf16 to one dot; the RoPE tables sit within
an ulp or two of the exact cos/sin at any position."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.jaxref.layers import SUM_BLOCK, attention, matmul, rope_inv_freq, rope_tables
from tessera.specs import ModelConfig

EPS32 = float(np.finfo(np.float32).eps)


def as64(a: object) -> np.ndarray:
    return np.asarray(a, np.float64)


@settings(max_examples=20, deadline=None)
@given(k=st.integers(1, 5 * SUM_BLOCK + 7), seed=st.integers(0, 2**16))
def test_matmul_counts_every_term_once(k: int, seed: int) -> None:
    # Rounding in any order stays within K * eps * sum |x w| of the exact product; a block left out or
    # counted twice misses by about sqrt(SUM_BLOCK) * |x w|, far outside it.
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 3, k), dtype=np.float32)
    w = rng.standard_normal((k, 5), dtype=np.float32)
    bound = k * EPS32 * (np.abs(as64(x)) @ np.abs(as64(w)))
    assert np.all(np.abs(as64(matmul(jnp.asarray(x), jnp.asarray(w))) - as64(x) @ as64(w)) <= bound)


def test_float32_matmul_is_closer_to_float64_than_one_dot() -> None:
    """Over K = 2048 (a Llama-3.2-1B projection) the blocks leave well under one XLA dot's error."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((256, 2048), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((2048, 256), dtype=np.float32))
    exact = as64(x) @ as64(w)

    def rms_error(y: object) -> float:
        return float(np.sqrt(np.mean((as64(y) - exact) ** 2)))

    assert rms_error(matmul(x, w)) < 0.75 * rms_error(x @ w)


def test_bfloat16_matmul_is_one_dot() -> None:
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((4, 3 * SUM_BLOCK)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((3 * SUM_BLOCK, 8)), jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(matmul(x, w), np.float32), np.asarray(x @ w, np.float32))


def attention64(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray, k_pos: np.ndarray) -> np.ndarray:
    rep = q.shape[2] // k.shape[2]
    k, v = np.repeat(as64(k), rep, axis=2), np.repeat(as64(v), rep, axis=2)
    scores = np.einsum("bthd,bshd->bhts", as64(q), k) * q.shape[-1] ** -0.5
    scores = np.where(k_pos[:, None, None, :] <= q_pos[:, None, :, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("bhts,bshd->bthd", probs / probs.sum(-1, keepdims=True), v)


@settings(max_examples=8, deadline=None)
@given(tk=st.sampled_from([1, SUM_BLOCK, SUM_BLOCK + 1, 2 * SUM_BLOCK + 44]), tq=st.sampled_from([1, 5]),
       seed=st.integers(0, 2**16))
def test_attention_over_many_key_blocks(tk: int, tq: int, seed: int) -> None:
    """The last `tq` of `tk` keys as queries (a decode step over a cache): float64's output to float32 accuracy."""
    tq = min(tq, tk)
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, tq, 4, 16), dtype=np.float32)
    k, v = (rng.standard_normal((2, tk, 2, 16), dtype=np.float32) for _ in range(2))
    k_pos = np.broadcast_to(np.arange(tk), (2, tk))
    q_pos = k_pos[:, tk - tq :]
    got = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(q_pos), jnp.asarray(k_pos))
    np.testing.assert_allclose(as64(got), attention64(q, k, v, q_pos, k_pos), rtol=0, atol=1e-6)


@pytest.mark.parametrize("preset", ModelConfig.presets())
def test_rope_tables_within_two_ulps_of_exact(preset: str) -> None:
    """Against float64 cos/sin of `position * inv_freq` (the float32 frequencies), out to Llama-3's 131k
    positions: float32 angles alone would be 4e-3 off there, and 1.5e-5 at position 511."""
    cfg = ModelConfig.preset(preset)
    hd = cfg.head_dim or cfg.d_model // cfg.n_heads
    inv_freq = rope_inv_freq(hd, cfg.rope_theta, cfg.rope_scaling)
    positions = np.concatenate([np.arange(4096), np.arange(4096, 131072, 61), [131071]])
    cos, sin = rope_tables(jnp.asarray(positions[None], jnp.int32), inv_freq, jnp.float32)
    angles = positions[:, None] * as64(inv_freq)
    for got, want in ((cos, np.cos(angles)), (sin, np.sin(angles))):
        got = as64(got)[0]
        np.testing.assert_array_equal(got[:, : hd // 2], got[:, hd // 2 :])
        assert np.abs(got[:, : hd // 2] - want).max() <= 2 * EPS32
