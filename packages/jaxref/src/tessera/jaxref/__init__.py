"""tessera.jaxref: an independent JAX/XLA implementation of the Tessera transformer, for parity.

It reads tessera checkpoints with numpy (never importing torch), runs the forward pass and a cached
decode path under `jax.jit`, and a CE/KD training step sharded over a ("data", "model") mesh.

    params, cfg = load_checkpoint("ckpt/")            # modelcard.json + safetensors
    logits = forward(params, cfg, ids)                # [B, T, V]
    cache = init_cache(cfg, batch_size=1, max_len=64)
    logits, cache = forward_cached(params, cfg, ids[:, :8], cache)

Training lives in its own modules, so that inference needs neither optax nor a mesh:
`tessera.jaxref.train` (make_loss_fn, make_grad_fn, make_train_step, place_params),
`tessera.jaxref.optim` (make_optimizer), `tessera.jaxref.sharding` (make_mesh, param_specs),
`tessera.jaxref.losses` (cross_entropy, kd_divergence, combined_loss).
"""

from tessera.jaxref.cache import KVCache, forward_cached, init_cache
from tessera.jaxref.checkpoint import from_hf_state, load_checkpoint, save_checkpoint, to_hf_state
from tessera.jaxref.model import Params, forward, init_params, logits_fn

__all__ = [
    "KVCache",
    "Params",
    "forward",
    "forward_cached",
    "from_hf_state",
    "init_cache",
    "init_params",
    "load_checkpoint",
    "logits_fn",
    "save_checkpoint",
    "to_hf_state",
]
