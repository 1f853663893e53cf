"""The decoder transformer as a pure function of a parameter pytree.

Parameters (`Params`, a dict) keep every layer stacked on a leading axis `L` so the layers run as
one `lax.scan` (one compiled block, whatever the depth). Matrices are stored `[in, out]` so a
projection is `x @ w`; `checkpoint.py` maps them to and from the Hugging Face names and layouts:

    embed [V, D]; norm [D]; lm_head [D, V] (absent when cfg.tie_embeddings)
    layers: attn_norm [L, D]; wq [L, D, Hq*hd]; wk, wv [L, D, Hkv*hd]; wo [L, Hq*hd, D];
            bq [L, Hq*hd], bk, bv [L, Hkv*hd] (iff cfg.attention_bias); q_norm, k_norm [L, hd] (iff cfg.qk_norm);
            mlp_norm [L, D]; w_gate, w_up [L, D, F]; w_down [L, F, D]

The head counts inside a block are read from the weight shapes, not from `cfg`, so the same code
runs on a tensor-parallel shard that holds only some heads (see `train.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tessera.jaxref.layers import apply_rope, attention, matmul, rms_norm, rope_inv_freq, rope_tables, swiglu
from tessera.specs import ModelConfig

Params = dict[str, Any]
Attend = Callable[[jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


def head_dim(cfg: ModelConfig) -> int:
    return cfg.head_dim or cfg.d_model // cfg.n_heads


def param_shapes(cfg: ModelConfig) -> Params:
    """The shape of every parameter for `cfg`, in the `Params` layout."""
    hd, L, D, F = head_dim(cfg), cfg.n_layers, cfg.d_model, cfg.d_ff
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    layers = {"attn_norm": (L, D), "wq": (L, D, q), "wk": (L, D, kv), "wv": (L, D, kv), "wo": (L, q, D),
              "mlp_norm": (L, D), "w_gate": (L, D, F), "w_up": (L, D, F), "w_down": (L, F, D)}
    if cfg.attention_bias:
        layers |= {"bq": (L, q), "bk": (L, kv), "bv": (L, kv)}
    if cfg.qk_norm:
        layers |= {"q_norm": (L, hd), "k_norm": (L, hd)}
    shapes: Params = {"embed": (cfg.vocab_size, D), "layers": layers, "norm": (D,)}
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (D, cfg.vocab_size)
    return shapes


def init_params(cfg: ModelConfig, seed: int = 0, dtype: jnp.dtype = jnp.float32) -> Params:
    """Random parameters (numpy's PCG64 from `seed`, so no compilation): matrices and biases
    ~ N(0, cfg.init_std), norm weights ~ 1 + N(0, 0.1) (so a test notices a norm weight applied
    to the wrong place)."""
    rng = np.random.default_rng(seed)

    def draw(path: tuple[Any, ...], shape: tuple[int, ...]) -> jax.Array:
        noise = rng.standard_normal(shape, dtype=np.float32)
        value = 1.0 + 0.1 * noise if "norm" in jax.tree_util.keystr(path) else cfg.init_std * noise
        return jnp.asarray(value, dtype=dtype)

    return jax.tree_util.tree_map_with_path(draw, param_shapes(cfg), is_leaf=lambda s: isinstance(s, tuple))


def _block(lp: Params, cfg: ModelConfig, x: jax.Array, cos: jax.Array, sin: jax.Array, attend: Attend,
           attend_state: Any, reduce: Callable[[jax.Array], jax.Array]) -> tuple[jax.Array, Any]:
    b, t, _ = x.shape
    hd = head_dim(cfg)
    h = rms_norm(x, lp["attn_norm"], cfg.norm_eps)
    q, k, v = matmul(h, lp["wq"]), matmul(h, lp["wk"]), matmul(h, lp["wv"])
    if cfg.attention_bias:
        q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    q, k, v = (y.reshape(b, t, -1, hd) for y in (q, k, v))
    if cfg.qk_norm:
        q, k = rms_norm(q, lp["q_norm"], cfg.norm_eps), rms_norm(k, lp["k_norm"], cfg.norm_eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    o, attend_state = attend(q, k, v, attend_state)
    # wo and w_down are row-parallel under tensor parallelism: `reduce` sums the partial products.
    x = x + reduce(matmul(o.reshape(b, t, -1), lp["wo"]))
    h = rms_norm(x, lp["mlp_norm"], cfg.norm_eps)
    x = x + reduce(matmul(swiglu(h, lp["w_gate"], lp["w_up"]), lp["w_down"]))
    return x, attend_state


def run_layers(params: Params, cfg: ModelConfig, ids: jax.Array, positions: jax.Array, attend: Attend,
               attend_states: Any = None, tp_axis: str | None = None) -> tuple[jax.Array, Any]:
    """Embed `ids [B, T]`, run every block, apply the final norm: returns `(h [B, T, D], states)`.

    `attend(q, k, v, state) -> (out, state)` is the attention of one layer; `attend_states` is a
    pytree with leading axis L (one state per layer, e.g. its KV cache) or None. `tp_axis` names
    the mesh axis the row-parallel projections are summed over (inside `shard_map`).
    """
    dtype = params["embed"].dtype
    x = params["embed"][ids]
    cos, sin = rope_tables(positions, rope_inv_freq(head_dim(cfg), cfg.rope_theta, cfg.rope_scaling), dtype)

    def reduce(y: jax.Array) -> jax.Array:
        return y if tp_axis is None else jax.lax.psum(y, tp_axis)

    def step(x: jax.Array, layer: tuple[Params, Any]) -> tuple[jax.Array, Any]:
        lp, state = layer
        return _block(lp, cfg, x, cos, sin, attend, state, reduce)

    x, states = jax.lax.scan(step, x, (params["layers"], attend_states))
    return rms_norm(x, params["norm"], cfg.norm_eps), states


def lm_head(params: Params, h: jax.Array) -> jax.Array:
    """Logits `[..., V]` from final hidden states `[..., D]` (the embedding when tied)."""
    # One plain dot: its rounding reaches the logits once, not through every later layer as a
    # block's does, and a blocked sum here measured no gain for twice the time.
    if "lm_head" in params:
        return h @ params["lm_head"]
    return h @ params["embed"].T


def _causal(positions: jax.Array) -> Attend:
    def attend(q: jax.Array, k: jax.Array, v: jax.Array, state: Any) -> tuple[jax.Array, Any]:
        return attention(q, k, v, positions, positions), state
    return attend


def default_positions(ids: jax.Array) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)


def logits_fn(params: Params, cfg: ModelConfig, ids: jax.Array, positions: jax.Array | None = None,
              tp_axis: str | None = None) -> jax.Array:
    """Un-jitted forward (for composing under `grad`/`shard_map`); see `forward`."""
    positions = default_positions(ids) if positions is None else positions
    h, _ = run_layers(params, cfg, ids, positions, _causal(positions), tp_axis=tp_axis)
    return lm_head(params, h)


@partial(jax.jit, static_argnames=("cfg",))
def forward(params: Params, cfg: ModelConfig, ids: jax.Array, positions: jax.Array | None = None) -> jax.Array:
    """Logits `[B, T, V]` (in the parameters' dtype) of token ids `[B, T]` (int), causal within each row.

    `positions [B, T]` (int) default to 0..T-1 in every row; they place RoPE and the causal mask
    (query i sees key j iff positions[j] <= positions[i]). jit-compiled once per `cfg` and shape.
    """
    return logits_fn(params, cfg, ids, positions)
