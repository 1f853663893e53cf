"""Training losses over logits, computed in float32.

- `cross_entropy`: next-token CE, logits at t predict ids at t+1, mean over the B*(T-1) targets.
- `kd_divergence`: distillation at temperature tau, over all B*T positions, multiplied by tau^2
  (Hinton et al.), mean over positions, with p = softmax(teacher / tau), q = softmax(student / tau):
  `forward_kl` = KL(p || q), `reverse_kl` = KL(q || p), `jsd` = beta KL(p || m) + (1 - beta) KL(q || m)
  with m = beta p + (1 - beta) q.
- `combined_loss`: `ce_weight * CE + kd_weight * KD` as `LossConfig` weighs them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tessera.specs import LossConfig


def cross_entropy(logits: jax.Array, ids: jax.Array) -> jax.Array:
    """Mean next-token CE of `logits [B, T, V]` against `ids [B, T]` (T >= 2)."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, ids[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]
    return -jnp.mean(picked)


def _kl(log_a: jax.Array, log_b: jax.Array) -> jax.Array:
    return jnp.sum(jnp.exp(log_a) * (log_a - log_b), axis=-1)


def kd_divergence(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float | jax.Array,
                  divergence: str = "forward_kl", beta: float = 0.5) -> jax.Array:
    """Mean over positions of `divergence` between the tempered distributions, times tau^2.

    Both logits `[B, T, V]`; raises ValueError for an unknown `divergence`.
    """
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    if divergence == "forward_kl":
        per_pos = _kl(log_p, log_q)
    elif divergence == "reverse_kl":
        per_pos = _kl(log_q, log_p)
    elif divergence == "jsd":
        log_m = jnp.logaddexp(jnp.log(beta) + log_p, jnp.log1p(-beta) + log_q)
        per_pos = beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    else:
        raise ValueError(f"divergence must be forward_kl, reverse_kl or jsd, got {divergence!r}")
    return jnp.mean(per_pos) * temperature**2


def combined_loss(logits: jax.Array, batch: dict[str, jax.Array], loss_cfg: LossConfig,
                  temperature: float | jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`(loss, {"ce": ..., "kd": ...})` of student `logits [B, T, V]` on `batch`.

    `batch["input_ids"] [B, T]`; `batch["teacher_logits"] [B, T, V]` when `loss_cfg.kd_weight > 0`.
    Raises ValueError for `hidden_weight > 0` (hidden-state matching is not part of this reference)
    and KeyError when teacher logits are needed but absent.
    """
    if loss_cfg.hidden_weight > 0:
        raise ValueError(f"loss.hidden_weight={loss_cfg.hidden_weight}: hidden-state KD is not supported here")
    terms: dict[str, jax.Array] = {}
    loss = jnp.zeros((), jnp.float32)
    if loss_cfg.ce_weight > 0:
        terms["ce"] = cross_entropy(logits, batch["input_ids"])
        loss = loss + loss_cfg.ce_weight * terms["ce"]
    if loss_cfg.kd_weight > 0:
        if "teacher_logits" not in batch:
            raise KeyError(f"loss.kd_weight={loss_cfg.kd_weight} needs batch['teacher_logits']")
        terms["kd"] = kd_divergence(logits, batch["teacher_logits"], temperature, loss_cfg.divergence,
                                    loss_cfg.jsd_beta)
        loss = loss + loss_cfg.kd_weight * terms["kd"]
    return loss, terms
