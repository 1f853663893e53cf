"""tessera.model: the decoder transformer, checkpoints, HF interop, tokenizer, interpretability."""

from tessera.model.loading import load_model
from tessera.model.transformer import Transformer

__all__ = ["Transformer", "load_model"]
