"""The cached decode path: logits fed chunk by chunk through `forward_cached` equal one full `forward`."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.jaxref import forward, forward_cached, init_cache, init_params
from tessera.specs import ModelConfig

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, qk_norm=True,
                  attention_bias=True, rope_scaling={"type": "llama3", "factor": 8.0,
                                                     "original_max_position_embeddings": 16})
PARAMS = init_params(CFG, seed=3)
MAX_LEN = 24


@settings(max_examples=6, deadline=None)
@given(sizes=st.lists(st.sampled_from([1, 2, 5]), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_incremental_equals_full_forward(sizes: list[int], seed: int) -> None:
    # Chunk sizes come from a small set so that few shapes compile; their order and count vary. The
    # model is causal, so the chunks' logits must equal the full forward's first `total` positions.
    ids = np.random.default_rng(seed).integers(0, CFG.vocab_size, (2, MAX_LEN)).astype(np.int32)
    full = np.asarray(forward(PARAMS, CFG, ids))
    cache = init_cache(CFG, batch_size=2, max_len=MAX_LEN)
    chunks, start = [], 0
    for size in sizes:
        logits, cache = forward_cached(PARAMS, CFG, ids[:, start : start + size], cache)
        chunks.append(np.asarray(logits))
        start += size
    assert int(cache.length) == start
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), full[:, :start], rtol=0, atol=1e-5)


def test_token_by_token_decode_in_bf16_cache() -> None:
    """bf16 parameters make bf16 k/v in the full forward too, so a bf16 cache loses nothing: the
    logits agree to within one bf16 ulp of the largest logit (masked cache slots add exact zeros)."""
    params = init_params(CFG, seed=4, dtype=jnp.bfloat16)
    ids = np.random.default_rng(0).integers(0, CFG.vocab_size, (1, 10)).astype(np.int32)
    full = np.asarray(forward(params, CFG, ids), np.float32)
    cache = init_cache(CFG, 1, 16, dtype=jnp.bfloat16)
    steps = []
    for t in range(10):
        logits, cache = forward_cached(params, CFG, ids[:, t : t + 1], cache)
        steps.append(np.asarray(logits, np.float32))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=0, atol=np.abs(full).max() * 2**-8)


def test_overflow_and_batch_mismatch_are_refused() -> None:
    cache = init_cache(CFG, batch_size=1, max_len=4)
    _, cache = forward_cached(PARAMS, CFG, np.zeros((1, 3), np.int32), cache)
    with pytest.raises(ValueError, match="max_len=4"):
        forward_cached(PARAMS, CFG, np.zeros((1, 2), np.int32), cache)
    with pytest.raises(ValueError, match="B=1"):
        forward_cached(PARAMS, CFG, np.zeros((2, 1), np.int32), init_cache(CFG, 1, 4))
