"""Paged KV storage (`KVCacheSpec` layout "NHD") and the `KVContext` that a serving step runs through.

The block manager (in tessera-serve) decides which blocks a sequence owns; this module only holds
the tensors and runs the registry ops over them: `kv_cache.write` with `attention.prefill_paged`, and for a
decode step `attention.decode_paged_rope` (rope, write and attention in one, through `attend_rotary`) or
`attention.decode_paged_write` (write and attention, when q and k arrive rotated).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tessera.kernels import registry
from tessera.specs import KernelImpl, KVCacheHandle, KVCacheSpec

_UNSCALED_DTYPES = {"float32", "bfloat16", "float16", "float8_e4m3fn"}

#: Whether decode-only steps rotate (`attend_rotary`), write and attend in one op. Off by default: on the
#: H200 a batch-1 decode graph replayed 3% faster with the separate rope, `kv_cache.write` and
#: `attention.decode_paged` launches, which PDL overlaps (benchmarks/results/
#: serve-decode-normed-nvidia-h200-2026-12-05.json). Read at each call (a CUDA graph keeps what was in force
#: when it was captured); TESSERA_FUSED_DECODE=1 turns it on from the start.
FUSED_DECODE = os.environ.get("TESSERA_FUSED_DECODE", "0") == "1"


def fused_impl(op: str, *args: torch.Tensor, **kwargs: object) -> KernelImpl | None:
    """The backend the registry picks for a fused decode op, or None where that would be the reference on a
    GPU: the separate ops' kernels may still take inputs the fused kernel refuses, and the reference reads
    context lengths on the host (no CUDA graph could hold it)."""
    impl = registry.get(op, *args, **kwargs)
    return None if impl.backend == "reference" and args[0].is_cuda else impl


def rotary_decode(args: tuple[torch.Tensor, ...], norm: tuple[torch.Tensor, torch.Tensor, float] | None
                  ) -> torch.Tensor | None:
    """`attention.decode_paged_rope` of `args` (q, k, v, cos, sin, caches, slots, tables, lengths), after
    QK-norm with `norm` = (q_weight, k_weight, eps); None where `fused_impl` leaves it to the separate ops."""
    q_weight, k_weight, eps = norm if norm is not None else (None, None, 1e-6)
    impl = fused_impl("attention.decode_paged_rope", *args, q_weight=q_weight, k_weight=k_weight, eps=eps)
    return None if impl is None else impl(*args, q_weight=q_weight, k_weight=k_weight, eps=eps)


class PagedKVCache:
    """`k[layer]`, `v[layer]`: `[num_blocks, block_size, n_kv_heads, head_dim]` in `spec.dtype`, zeroed.

    Slot `s` is block `s // block_size`, offset `s % block_size`. Raises ValueError for
    `spec.dtype == "int8"`, which would need per-block scales that this storage does not keep.
    """

    def __init__(self, spec: KVCacheSpec, device: torch.device | str | None = None) -> None:
        if spec.dtype not in _UNSCALED_DTYPES:
            raise ValueError(f"PagedKVCache cannot store KVCacheSpec.dtype={spec.dtype!r}; "
                             f"supported: {sorted(_UNSCALED_DTYPES)}")
        self.spec = spec
        dtype = getattr(torch, spec.dtype)
        shape = (spec.num_blocks, spec.block_size, spec.n_kv_heads, spec.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.n_layers)]

    @property
    def device(self) -> torch.device:
        return self.k[0].device


@dataclass
class PagedAttentionMetadata:
    """One step's view of the batch (all tensors on the cache's device).

    `slot_mapping [N] int64`: cache slot of each new token (-1: padding lane, not written).
    `block_tables [B, MB] int32`: each sequence's blocks, in order (unused entries arbitrary).
    `context_lens [B] int32`: tokens cached per sequence AFTER this step's writes.
    `cu_seqlens_q [B+1] int32`: sequence i owns new tokens `cu_seqlens_q[i]:cu_seqlens_q[i+1]`.
    `max_seqlen_q`: the longest query length. `decode_only`: every query length is 1 (then N == B).
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    max_seqlen_q: int
    decode_only: bool

    @classmethod
    def from_handles(cls, handles: Sequence[KVCacheHandle], query_lens: Sequence[int],
                     device: torch.device | str | None = None) -> PagedAttentionMetadata:
        """Metadata for a step in which sequence i appends its last `query_lens[i]` tokens; each
        handle already counts them (`num_tokens` = context after the step). Raises ValueError when
        the lengths disagree with the handles."""
        if len(handles) != len(query_lens) or not handles:
            raise ValueError(f"{len(handles)} handles for {len(query_lens)} query lengths")
        slots: list[int] = []
        for h, n in zip(handles, query_lens):
            if not 1 <= n <= h.num_tokens:
                raise ValueError(f"query length {n} outside [1, num_tokens={h.num_tokens}] of seq {h.seq_id}")
            slots.extend(h.slot(p) for p in range(h.num_tokens - n, h.num_tokens))
        width = max(len(h.block_ids) for h in handles)
        tables = [list(h.block_ids) + [0] * (width - len(h.block_ids)) for h in handles]
        cu = [0]
        for n in query_lens:
            cu.append(cu[-1] + n)
        return cls(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
            context_lens=torch.tensor([h.num_tokens for h in handles], dtype=torch.int32, device=device),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
            max_seqlen_q=max(query_lens),
            decode_only=all(n == 1 for n in query_lens),
        )


class PagedKVContext:
    """`KVContext` over a `PagedKVCache` for one step: the model is called with every sequence's new
    tokens packed into one row (`input_ids [1, N]`, `positions [1, N]`, batch order). `attend` writes
    k/v by `slot_mapping` and attends: `attention.decode_paged_write` (`decode_only`, both in one op) or
    `kv_cache.write`, then `attention.prefill_paged`. The decode path reads no tensor on the host.
    """

    def __init__(self, cache: PagedKVCache, meta: PagedAttentionMetadata) -> None:
        self.cache, self.meta = cache, meta

    def attend_rotary(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, norm: tuple[torch.Tensor, torch.Tensor, float] | None = None
                      ) -> torch.Tensor | None:
        """For a decode-only step: rope q [N, Hq, D] and k [N, Hkv, D] by the rows' cos/sin [N, D] (after
        QK-norm when `norm` = (q_weight, k_weight, eps)), write k/v and attend, as one registry op
        (`attention.decode_paged_rope`); returns [N, Hq, D]. None for any other step: the caller rotates
        and calls `attend`."""
        meta = self.meta
        if not (FUSED_DECODE and meta.decode_only) or q.shape[0] != meta.block_tables.shape[0]:
            return None
        return rotary_decode((q, k, v, cos, sin, self.cache.k[layer], self.cache.v[layer], meta.slot_mapping,
                              meta.block_tables, meta.context_lens), norm)

    def decode_cache(self, layer: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """For a decode-only step of `tokens` rows: layer `layer`'s caches and the step's slot mapping, where a
        projection may write k and v itself before `attend_cached`; None for any other step."""
        meta = self.meta
        if not meta.decode_only or tokens != meta.block_tables.shape[0]:
            return None
        return self.cache.k[layer], self.cache.v[layer], meta.slot_mapping

    def attend_cached(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """A decode-only step whose k and v are already at `decode_cache`'s slots: q [N, Hq, D] (rotated) attends
        to the cache (`attention.decode_paged`) -> [N, Hq, D]."""
        meta = self.meta
        return registry("attention.decode_paged", q, self.cache.k[layer], self.cache.v[layer], meta.block_tables,
                        meta.context_lens)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.shape[0] != 1:
            raise ValueError(f"PagedKVContext expects the step packed as one row, got batch {q.shape[0]}")
        meta = self.meta
        if meta.decode_only and q.shape[1] != meta.block_tables.shape[0]:
            raise ValueError(f"decode_only step with {q.shape[1]} tokens for {meta.block_tables.shape[0]} "
                             "sequences: a decode step has exactly one token per sequence")
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        args = (q[0], k[0], v[0], k_cache, v_cache, meta.slot_mapping, meta.block_tables, meta.context_lens)
        fused = fused_impl("attention.decode_paged_write", *args) if meta.decode_only and FUSED_DECODE else None
        if fused is not None:  # the write and the attention in one op (one launch on the GPU)
            out = fused(*args)
        else:
            registry("kv_cache.write", k[0], v[0], k_cache, v_cache, meta.slot_mapping)
            if meta.decode_only:
                out = registry("attention.decode_paged", q[0], k_cache, v_cache, meta.block_tables,
                               meta.context_lens)
            else:
                out = registry("attention.prefill_paged", q[0], k_cache, v_cache, meta.block_tables,
                               meta.cu_seqlens_q, meta.context_lens, meta.max_seqlen_q)
        return out[None]
