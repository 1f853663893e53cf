"""One training step (CE / KD loss, gradients, optimizer update), on one device or on a mesh.

On a mesh the loss runs inside `jax.shard_map`: each device holds a batch shard ("data") and a
slice of the heads and MLP columns ("model"); the row-parallel projections `psum` over "model" and
the loss is `pmean`ed over "data". Gradients come from differentiating that sharded function, so
JAX's transposition of the collectives (not hand-written all-reduces) sums them across devices.
The optimizer update is elementwise and keeps each parameter's sharding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tessera.jaxref.losses import combined_loss
from tessera.jaxref.model import Params, logits_fn
from tessera.jaxref.sharding import DATA, MODEL, batch_specs, check_divisible, param_specs, shard
from tessera.specs import LossConfig, ModelConfig

Batch = dict[str, jax.Array]
LossFn = Callable[[Params, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def make_loss_fn(cfg: ModelConfig, loss_cfg: LossConfig, mesh: Mesh | None = None) -> LossFn:
    """`loss(params, batch, temperature) -> (loss, terms)`, un-jitted (see `losses.combined_loss`).

    With `mesh`, params and batch are global arrays (sharded or not) and the computation is
    partitioned as the module docstring describes; the result equals the single-device loss.
    """
    def local(params: Params, batch: Batch, temperature: jax.Array, tp_axis: str | None = None) -> Any:
        logits = logits_fn(params, cfg, batch["input_ids"], tp_axis=tp_axis)
        return combined_loss(logits, batch, loss_cfg, temperature)

    if mesh is None:
        return local

    def sharded(params: Params, batch: Batch, temperature: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        check_divisible(cfg, mesh, batch["input_ids"].shape[0])

        def body(p: Params, b: Batch, t: jax.Array) -> Any:
            return jax.lax.pmean(local(p, b, t, tp_axis=MODEL), DATA)

        fn = jax.shard_map(body, mesh=mesh, in_specs=(param_specs(cfg), batch_specs(batch), P()), out_specs=P())
        return fn(params, batch, temperature)

    return sharded


def make_grad_fn(cfg: ModelConfig, loss_cfg: LossConfig,
                 mesh: Mesh | None = None) -> Callable[[Params, Batch, jax.Array], Any]:
    """jit-compiled `(params, batch, temperature) -> ((loss, terms), grads)`; grads share the params' tree."""
    return jax.jit(jax.value_and_grad(make_loss_fn(cfg, loss_cfg, mesh), has_aux=True))


def place_params(params: Params, cfg: ModelConfig, mesh: Mesh) -> Params:
    """`params` laid out on `mesh` (see `sharding.param_specs`); raises ValueError if the mesh does not divide them."""
    check_divisible(cfg, mesh)
    return shard(params, param_specs(cfg), mesh)


def make_train_step(cfg: ModelConfig, loss_cfg: LossConfig, optimizer: optax.GradientTransformation,
                    mesh: Mesh | None = None) -> Callable[..., tuple[Params, Any, dict[str, jax.Array]]]:
    """jit-compiled `step(params, opt_state, batch, temperature) -> (params, opt_state, metrics)`.

    `metrics`: "loss", the loss terms ("ce", "kd") and "grad_norm" (global L2 norm before clipping).
    `params` and `opt_state` are donated. With `mesh`, pass params from `place_params` (the new
    params keep that layout) and an `opt_state = optimizer.init(params)` of them.
    """
    loss_fn = make_loss_fn(cfg, loss_cfg, mesh)
    shardings = None if mesh is None else jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(cfg))

    def step(params: Params, opt_state: Any, batch: Batch, temperature: jax.Array) -> Any:
        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, jnp.asarray(temperature))
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if shardings is not None:
            params = jax.lax.with_sharding_constraint(params, shardings)
        return params, opt_state, {"loss": loss, **terms, "grad_norm": optax.global_norm(grads)}

    return jax.jit(step, donate_argnums=(0, 1))
