"""How parameters and batches lie on a 2-D device mesh `("data", "model")`.

Data parallelism splits the batch over "data". Tensor parallelism (Megatron-style) splits over
"model": q/k/v, gate and up projections by output columns (whole heads per device: query head h
and its kv head h // n_rep land on the same device), o and down projections by input rows, whose
partial products `run_layers` sums with `psum`. Embeddings, lm_head and norm weights are replicated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tessera.jaxref.model import Params, param_shapes
from tessera.specs import ModelConfig

DATA, MODEL = "data", "model"

_LAYER_SPECS = {
    "wq": P(None, None, MODEL), "wk": P(None, None, MODEL), "wv": P(None, None, MODEL),
    "bq": P(None, MODEL), "bk": P(None, MODEL), "bv": P(None, MODEL),
    "w_gate": P(None, None, MODEL), "w_up": P(None, None, MODEL),
    "wo": P(None, MODEL, None), "w_down": P(None, MODEL, None),
}


def make_mesh(data: int, model: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `(data, model)` mesh over the first `data * model` devices (default: `jax.devices()`)."""
    devices = list(jax.devices() if devices is None else devices)
    if data < 1 or model < 1 or data * model > len(devices):
        raise ValueError(f"mesh data={data} x model={model} needs that many devices; {len(devices)} available")
    # Auto axes: shard_map and jit reshard inputs as needed instead of requiring explicitly typed arrays.
    return jax.make_mesh((data, model), (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices[: data * model])


def check_divisible(cfg: ModelConfig, mesh: Mesh, batch_size: int | None = None) -> None:
    """Raise ValueError naming the dimension that the mesh does not divide."""
    tp, dp = mesh.shape[MODEL], mesh.shape[DATA]
    for name in ("n_heads", "n_kv_heads", "d_ff"):
        if getattr(cfg, name) % tp:
            raise ValueError(f"{name}={getattr(cfg, name)} is not divisible by the model axis ({tp})")
    if batch_size is not None and batch_size % dp:
        raise ValueError(f"batch size {batch_size} is not divisible by the data axis ({dp})")


def param_specs(cfg: ModelConfig) -> Params:
    """A `PartitionSpec` for every parameter of `cfg` (same tree as the params)."""
    shapes = param_shapes(cfg)
    specs: Params = {k: P() for k in shapes if k != "layers"}
    specs["layers"] = {k: _LAYER_SPECS.get(k, P()) for k in shapes["layers"]}
    return specs


def batch_specs(batch: dict[str, Any]) -> dict[str, P]:
    """Every batch array is split over "data" along its leading (batch) axis."""
    return {k: P(DATA) for k in batch}


def shard(tree: Any, specs: Any, mesh: Mesh) -> Any:
    """Place every array of `tree` on `mesh` per `specs` (a matching tree of PartitionSpecs)."""
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs)
