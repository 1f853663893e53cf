"""Incremental decoding over a flat KV cache: feed a prompt in chunks or one token at a time and get
the same logits as one full `forward` over the whole sequence.

Every row of the batch shares one length (the cache is a contiguous `[B, max_len]` buffer per layer).
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from tessera.jaxref.layers import attention
from tessera.jaxref.model import Params, head_dim, lm_head, run_layers
from tessera.specs import ModelConfig


class KVCache(NamedTuple):
    """`k`, `v`: `[n_layers, B, max_len, n_kv_heads, head_dim]`; `length`: int32 scalar, the tokens
    already cached (the next chunk's first position)."""

    k: jax.Array
    v: jax.Array
    length: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype: jnp.dtype = jnp.float32) -> KVCache:
    """An empty cache for `batch_size` rows of up to `max_len` tokens, stored in `dtype`."""
    if batch_size < 1 or max_len < 1:
        raise ValueError(f"batch_size and max_len must be positive, got {batch_size} and {max_len}")
    shape = (cfg.n_layers, batch_size, max_len, cfg.n_kv_heads, head_dim(cfg))
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))


@partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _step(params: Params, cfg: ModelConfig, ids: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    b, t = ids.shape
    start = cache.length
    positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
    # Slots not yet written hold stale values; their positions exceed every query's, so the causal
    # mask hides them.
    key_positions = jnp.broadcast_to(jnp.arange(cache.max_len, dtype=jnp.int32), (b, cache.max_len))

    def attend(q: jax.Array, k: jax.Array, v: jax.Array, state: Any) -> tuple[jax.Array, Any]:
        k_cache, v_cache = state
        k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), start, axis=1)
        v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), start, axis=1)
        return attention(q, k_cache, v_cache, positions, key_positions), (k_cache, v_cache)

    h, (k_new, v_new) = run_layers(params, cfg, ids, positions, attend, (cache.k, cache.v))
    return lm_head(params, h), KVCache(k_new, v_new, start + t)


def forward_cached(params: Params, cfg: ModelConfig, ids: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Run `ids [B, T]` at positions `cache.length .. cache.length + T - 1`, attending to everything
    cached before them: returns `(logits [B, T, V], cache)` with the chunk's keys/values appended.

    The input cache is donated (its buffers are reused; do not read it afterwards). Raises
    ValueError when the batch size differs from the cache's or the chunk would overflow `max_len`
    (this check reads `cache.length` on the host).
    """
    if ids.ndim != 2 or ids.shape[0] != cache.k.shape[1]:
        raise ValueError(f"ids must be [B={cache.k.shape[1]}, T], got shape {tuple(ids.shape)}")
    if (end := int(cache.length) + ids.shape[1]) > cache.max_len:
        raise ValueError(f"cache overflow: {end} tokens exceed max_len={cache.max_len}")
    return _step(params, cfg, ids, cache)
