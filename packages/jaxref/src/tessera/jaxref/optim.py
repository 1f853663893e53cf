"""The optimizer an `OptimizerConfig` describes, built from optax.

Global-norm gradient clipping (when `grad_clip > 0`), then AdamW (decoupled weight decay, applied
to matrices only: embeddings, projections, lm_head; not to norm weights or biases) or Adam, under a
learning-rate schedule: linear warm-up (step s < warmup_steps uses lr * (s + 1) / warmup_steps), then
constant, or cosine decay from lr to `min_lr_ratio * lr` at `total_steps`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from tessera.specs import OptimizerConfig

_DECAYED = {"embed", "lm_head", "wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"}


def lr_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Learning rate at optimizer step `count` (0-based)."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be positive, got {total_steps}")

    def schedule(count: jax.Array) -> jax.Array:
        step = count.astype(jnp.float32)
        warm = jnp.minimum(1.0, (step + 1) / max(cfg.warmup_steps, 1)) if cfg.warmup_steps else 1.0
        if cfg.schedule == "constant":
            return cfg.lr * warm
        span = max(total_steps - cfg.warmup_steps, 1)
        progress = jnp.clip((step - cfg.warmup_steps) / span, 0.0, 1.0)
        cosine = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
        return cfg.lr * warm * jnp.where(step < cfg.warmup_steps, 1.0, cosine)

    return schedule


def decay_mask(params: dict[str, Any]) -> dict[str, Any]:
    """True for the parameters AdamW decays (matrices), False for norm weights and biases."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key in _DECAYED, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """Clip + AdamW/Adam under `lr_schedule(cfg, total_steps)`."""
    schedule = lr_schedule(cfg, total_steps)
    b1, b2 = cfg.betas
    if cfg.name == "adamw":
        core = optax.adamw(schedule, b1=b1, b2=b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
    else:
        core = optax.adam(schedule, b1=b1, b2=b2, eps=cfg.eps)
    if cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), core)
    return core
