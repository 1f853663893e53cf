"""Attention without a cache, and the `KVContext` protocol through which a model reaches a cache.

GQA, MQA and MHA are one code path: the registry ops take `Hq` query heads over `Hkv` key/value
heads (`Hq % Hkv == 0`; query head h reads kv head `h // (Hq // Hkv)`).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from tessera.kernels import registry


@runtime_checkable
class KVContext(Protocol):
    """What a model calls in layer `layer` instead of plain causal attention.

    `attend(layer, q [B, T, Hq, D], k [B, T, Hkv, D], v [B, T, Hkv, D]) -> [B, T, Hq, D]`: q and k
    arrive RoPE'd (and QK-normed); the context stores k/v for this step and attends the queries
    to everything cached for their sequence, causally.

    A context may also offer `attend_rotary(layer, q [N, Hq, D], k [N, Hkv, D], v [N, Hkv, D], cos [N, D],
    sin [N, D], norm=None) -> [N, Hq, D] | None`, taking q and k before RoPE (and before QK-norm, with
    `norm` = (q_weight, k_weight, eps)) so it can fuse the rotation into its own op; the model tries it
    first and calls `attend` when it returns None (`PagedKVContext` does it for decode steps).

    And `decode_cache(layer, tokens) -> (k_cache, v_cache, slot_mapping) | None` with `attend_cached(layer,
    q [N, Hq, D]) -> [N, Hq, D]`: for a one-token-a-sequence step, the caches and slots where the model's q/k/v
    projection may write the rotated k and v itself (`matmul.int8_weight_only_qkv_rope`,
    `matmul.int4_awq_qkv_rope`), and the attention of the rotated q to the cache that follows.
    """

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal self-attention within each row: q `[B, T, Hq, D]`, k/v `[B, T, Hkv, D]` -> `[B, T, Hq, D]`.

    Rows are packed into one varlen batch for registry op `attention.prefill`; scale is `D ** -0.5`.
    """
    b, t, hq, d = q.shape
    cu_seqlens = torch.arange(0, (b + 1) * t, t, dtype=torch.int32, device=q.device)
    out = registry("attention.prefill", q.reshape(b * t, hq, d), k.reshape(b * t, *k.shape[2:]),
                   v.reshape(b * t, *v.shape[2:]), cu_seqlens, t)
    return out.view(b, t, hq, d)
