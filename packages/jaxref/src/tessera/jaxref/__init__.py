"""tessera.jaxref: an independent JAX/XLA implementation of the Tessera transformer, for parity.

It reads tessera checkpoints with numpy (never importing torch), runs the forward pass and a cached
decode path under `jax.jit`, and a CE/KD training step sharded over a ("data", "model") mesh.

    params, cfg = load_checkpoint("ckpt/")            # modelcard.json + safetensors
    logits = forward(params, cfg, ids)                # [B, T, V]
    cache = init_cache(cfg, batch_size=1, max_len=64)
    logits, cache = forward_cached(params, cfg, ids[:, :8], cache)
"""

from tessera.jaxref.cache import KVCache, forward_cached, init_cache
from tessera.jaxref.checkpoint import from_hf_state, load_checkpoint, save_checkpoint, to_hf_state
from tessera.jaxref.losses import combined_loss, cross_entropy, kd_divergence
from tessera.jaxref.model import Params, forward, init_params, logits_fn
from tessera.jaxref.optim import make_optimizer
from tessera.jaxref.sharding import make_mesh
from tessera.jaxref.train import make_grad_fn, make_loss_fn, make_train_step, place_params

__all__ = [
    "KVCache",
    "Params",
    "combined_loss",
    "cross_entropy",
    "forward",
    "forward_cached",
    "from_hf_state",
    "init_cache",
    "init_params",
    "kd_divergence",
    "load_checkpoint",
    "logits_fn",
    "make_grad_fn",
    "make_loss_fn",
    "make_mesh",
    "make_optimizer",
    "make_train_step",
    "place_params",
    "save_checkpoint",
    "to_hf_state",
]
