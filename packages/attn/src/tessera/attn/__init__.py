"""tessera.attn: RoPE, attention over registry ops, and flat and paged KV-cache storage.

    from tessera.attn import KVContext, FlatKVCache, PagedKVCache, PagedAttentionMetadata, PagedKVContext
"""

from tessera.attn.attention import KVContext, causal_attention
from tessera.attn.flat_cache import FlatKVCache
from tessera.attn.paged_cache import PagedAttentionMetadata, PagedKVCache, PagedKVContext
from tessera.attn.rope import RotaryEmbedding, apply_rope, rope_inv_freq, rotate_half

__all__ = [
    "FlatKVCache",
    "KVContext",
    "PagedAttentionMetadata",
    "PagedKVCache",
    "PagedKVContext",
    "RotaryEmbedding",
    "apply_rope",
    "causal_attention",
    "rope_inv_freq",
    "rotate_half",
]
