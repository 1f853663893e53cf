"""tessera.model: the decoder transformer, checkpoints, HF interop, tokenizer, interpretability."""

from tessera.model.fusion import fuse_projections
from tessera.model.loading import load_model
from tessera.model.transformer import Transformer

__all__ = ["Transformer", "fuse_projections", "load_model"]
