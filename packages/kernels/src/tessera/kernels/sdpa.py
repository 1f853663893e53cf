"""`attention.prefill` through torch's `scaled_dot_product_attention`: differentiable, any device.

It covers packed batches whose sequences all have one length (the training case), which makes the
packed [N, H, D] layout a free view as [B, T, H, D]. Equal length is proved without reading
cu_seqlens on the host when `max_seqlen` is given: B sequences summing to N, none longer than
max_seqlen, with B * max_seqlen == N, must all be max_seqlen long.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tessera.kernels.support import FLOATS, dtype_reasons, same_dtype_reasons
from tessera.specs import KernelRegistry


def _batch_len(q: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int | None) -> tuple[int, int] | None:
    """(B, T) when every sequence has length T, else None."""
    n, b = q.shape[0], cu_seqlens.shape[0] - 1
    if b <= 0 or n % b:
        return None
    t = n // b
    if max_seqlen is not None:
        return (b, t) if max_seqlen == t else None
    lengths = cu_seqlens.diff()
    return (b, t) if bool((lengths == t).all()) else None


def supports(q: torch.Tensor | None = None, k: torch.Tensor | None = None, v: torch.Tensor | None = None,
             cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None, causal: bool = True,
             scale: float | None = None) -> list[str]:
    if q is None or k is None or v is None or cu_seqlens is None:
        return []
    reasons = dtype_reasons("q", q, FLOATS) + same_dtype_reasons(q=q, k=k, v=v)
    if q.shape[1] % k.shape[1]:
        reasons.append(f"Hq={q.shape[1]} is not a multiple of Hkv={k.shape[1]}")
    if not reasons and _batch_len(q, cu_seqlens, max_seqlen) is None:
        reasons.append("sequences differ in length (sdpa needs equal lengths)")
    return reasons


def attention_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                      max_seqlen: int | None = None, causal: bool = True,
                      scale: float | None = None) -> torch.Tensor:
    """Same contract as `reference.attention_prefill`; raises ValueError on unequal sequence lengths."""
    bt = _batch_len(q, cu_seqlens, max_seqlen)
    if bt is None:
        raise ValueError(f"sdpa attention.prefill needs equal-length sequences; cu_seqlens={cu_seqlens.tolist()}")
    b, t = bt
    qb, kb, vb = (x.reshape(b, t, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
    o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=causal, scale=scale,
                                       enable_gqa=q.shape[1] != k.shape[1])
    return o.transpose(1, 2).reshape(q.shape)


def register(reg: KernelRegistry) -> None:
    reg.register("attention.prefill", "sdpa", attention_prefill, supports=supports, priority=5)
