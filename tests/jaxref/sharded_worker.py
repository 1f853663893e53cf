"""Run by test_train.py in a subprocess whose XLA_FLAGS fake 8 CPU devices (the flag must be set
before jax initialises, so it cannot run inside the pytest process).

Writes to `argv[1]`: `ckpt/` (the initial parameters, a tessera checkpoint), `batch.npz`, and
`result.npz` with, under HF tensor names, the gradients and one-step parameters of the
single-device and of each sharded run, plus their losses.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

from pathlib import Path

import jax
import numpy as np

from tessera.jaxref import init_params, save_checkpoint, to_hf_state
from tessera.jaxref.optim import make_optimizer
from tessera.jaxref.sharding import make_mesh
from tessera.jaxref.train import make_grad_fn, make_train_step, place_params
from tessera.specs import LossConfig, ModelConfig, OptimizerConfig

jax.config.update("jax_enable_x64", False)
jax.config.update("jax_default_matmul_precision", "highest")

CFG = ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=8, d_ff=64,
                  qk_norm=True, attention_bias=True, tie_embeddings=True,
                  rope_scaling={"type": "linear", "factor": 2.0})
LOSS = LossConfig(kd_weight=0.6, ce_weight=0.4)
OPT = OptimizerConfig(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, warmup_steps=0, schedule="constant",
                      grad_clip=0.5)
TEMPERATURE = 2.0
GRAD_MESHES = [(2, 4), (8, 1)]
STEP_MESH = (2, 4)


def main(out: Path) -> None:
    assert jax.device_count() == 8, jax.devices()
    params = init_params(CFG, seed=7)
    save_checkpoint(params, CFG, out / "ckpt")
    rng = np.random.default_rng(7)
    batch = {"input_ids": rng.integers(0, CFG.vocab_size, (8, 12)).astype(np.int32),
             "teacher_logits": (2 * rng.standard_normal((8, 12, CFG.vocab_size))).astype(np.float32)}
    np.savez(out / "batch.npz", **batch)
    result: dict[str, np.ndarray] = {}

    def record(tag: str, loss: jax.Array, tree: dict) -> None:
        result[f"{tag}/loss"] = np.asarray(loss)
        result.update({f"{tag}/{k}": v for k, v in to_hf_state(tree, CFG).items()})

    (loss, _), grads = make_grad_fn(CFG, LOSS)(params, batch, TEMPERATURE)
    record("grad/single", loss, grads)
    for dp, tp in GRAD_MESHES:
        mesh = make_mesh(dp, tp)
        (loss, _), grads = make_grad_fn(CFG, LOSS, mesh)(place_params(params, CFG, mesh), batch, TEMPERATURE)
        record(f"grad/{dp}x{tp}", loss, grads)

    optimizer = make_optimizer(OPT, total_steps=10)
    fresh = init_params(CFG, seed=7)  # the step donates its inputs
    new, _, metrics = make_train_step(CFG, LOSS, optimizer)(fresh, optimizer.init(fresh), batch, TEMPERATURE)
    record("step/single", metrics["loss"], new)
    mesh = make_mesh(*STEP_MESH)
    placed = place_params(init_params(CFG, seed=7), CFG, mesh)
    new, _, metrics = make_train_step(CFG, LOSS, optimizer, mesh)(placed, optimizer.init(placed), batch, TEMPERATURE)
    result["step/sharded_spec_wq"] = np.array(str(new["layers"]["wq"].sharding.spec))
    record("step/sharded", metrics["loss"], new)
    np.savez(out / "result.npz", **result)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
