"""tessera.attn: RoPE, attention over registry ops, and KV-cache storage.

    from tessera.attn import KVContext, causal_attention, RotaryEmbedding, apply_rope
"""

from tessera.attn.attention import KVContext, causal_attention
from tessera.attn.rope import RotaryEmbedding, apply_rope, rope_inv_freq, rotate_half

__all__ = ["KVContext", "RotaryEmbedding", "apply_rope", "causal_attention", "rope_inv_freq", "rotate_half"]
