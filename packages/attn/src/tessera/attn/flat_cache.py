"""`FlatKVCache`: a contiguous per-row KV cache for incremental decoding (tests, parity checks,
simple generation). Every row holds the same number of tokens.

    cache = FlatKVCache(cfg, batch_size=2, max_len=64)
    logits = model(prompt, positions=cache.positions(prompt.shape[1]), kv=cache)
    cache.advance(prompt.shape[1])
    logits = model(next_ids, positions=cache.positions(1), kv=cache); cache.advance(1)
"""

from __future__ import annotations

import torch

from tessera.attn import paged_cache
from tessera.kernels import registry
from tessera.specs import ModelConfig

_PAGE = 16  # tokens per page when a row is handed to the paged kernels (a power of two, as they need)


class FlatKVCache:
    """Keys and values `[batch_size, capacity, n_kv_heads, head_dim]` per layer, filled left to right;
    `capacity` is `max_len` rounded up to a multiple of 16.

    `attend(layer, q, k, v)` writes this step's `T` keys/values at `[length, length + T)` and
    attends causally to everything before them; `advance(T)` then commits the step (call it once,
    after the model's forward, not once per layer). Raises ValueError when a step would overflow
    `max_len` or its batch differs from `batch_size`.

    Attention runs through the registry's paged ops: each row is viewed as `capacity / 16` blocks
    of 16 slots (block table `i` lists row `i`'s blocks in order), so the fast paged kernels serve
    this cache too, for any `max_len`.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"batch_size ({batch_size}) and max_len ({max_len}) must be positive")
        head_dim = cfg.head_dim or cfg.d_model // cfg.n_heads
        pages = -(-max_len // _PAGE)
        shape = (batch_size, pages * _PAGE, cfg.n_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.batch_size, self.max_len = batch_size, max_len
        self.length = 0
        self._block_tables = torch.arange(batch_size * pages, dtype=torch.int32, device=device).view(batch_size, pages)
        # Per position p: every row's context length p ([p] * batch) and every row's cache slot for a
        # token at p. A decode step takes a row of each as a view, so it launches no kernel to build them
        # (nor records one into a CUDA graph).
        capacity = pages * _PAGE
        steps = torch.arange(capacity + 1, device=device)
        self._lens = steps.to(torch.int32)[:, None].expand(capacity + 1, batch_size).contiguous()
        self._slots = (steps[:capacity, None] + capacity * torch.arange(batch_size, device=device)).contiguous()

    def positions(self, num_tokens: int) -> torch.Tensor:
        """Positions `[batch_size, num_tokens]` int64 of the next step's tokens."""
        pos = torch.arange(self.length, self.length + num_tokens, device=self.k[0].device)
        return pos.expand(self.batch_size, num_tokens)

    def advance(self, num_tokens: int) -> None:
        """Commit `num_tokens` tokens written by the last forward."""
        if not 0 <= self.length + num_tokens <= self.max_len:
            raise ValueError(f"advance({num_tokens}) from length {self.length} leaves [0, max_len={self.max_len}]")
        self.length += num_tokens

    def truncate(self, length: int) -> None:
        """Forget every token from `length` on (e.g. rejected speculative tokens)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"truncate({length}) outside [0, length={self.length}]")
        self.length = length

    def reset(self) -> None:
        self.length = 0

    def decode_tables(self) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the paged kernels need for a one-token step at the current length: tokens a block, and the
        step's cache slots [batch_size] int64, block tables [batch_size, pages] int32 and context lengths
        [batch_size] int32 (views of tables built once; `paged(layer)` gives the caches)."""
        if self.length + 1 > self.max_len:
            raise ValueError(f"a token at length {self.length} overflows max_len={self.max_len}")
        return _PAGE, self._slots[self.length], self._block_tables, self._lens[self.length + 1]

    def paged(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s keys and values as the paged kernels' [blocks, 16, Hkv, D] caches (views)."""
        return self._paged(layer)

    def _paged(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s keys and values as the paged kernels' [blocks, 16, Hkv, D] caches."""
        k_rows, v_rows = self.k[layer], self.v[layer]
        return k_rows.view(-1, _PAGE, *k_rows.shape[2:]), v_rows.view(-1, _PAGE, *v_rows.shape[2:])

    def attend_rotary(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, norm: tuple[torch.Tensor, torch.Tensor, float] | None = None
                      ) -> torch.Tensor | None:
        """A one-token step (q [batch_size, Hq, D], unrotated): rope (after QK-norm with `norm`), write and
        attend as one op (`attention.decode_paged_rope`), as `PagedKVContext.attend_rotary` does. None for
        longer steps, or one that would overflow (then `attend` runs, or raises)."""
        if not paged_cache.FUSED_DECODE or q.shape[0] != self.batch_size or self.length + 1 > self.max_len:
            return None
        return paged_cache.rotary_decode((q, k, v, cos, sin, *self._paged(layer), self._slots[self.length],
                                          self._block_tables, self._lens[self.length + 1]), norm)

    def decode_cache(self, layer: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """For a one-token step of `tokens` rows (the batch): layer `layer`'s caches and the step's slots
        [batch_size], where a projection may write k and v itself before `attend_cached`; None otherwise."""
        if tokens != self.batch_size or self.length + 1 > self.max_len:
            return None
        return (*self._paged(layer), self._slots[self.length])

    def attend_cached(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """A one-token step whose k and v are already at `decode_cache`'s slots: q [batch_size, Hq, D] (rotated)
        attends to the cache (`attention.decode_paged`) -> [batch_size, Hq, D]."""
        k_cache, v_cache = self._paged(layer)
        return registry("attention.decode_paged", q, k_cache, v_cache, self._block_tables, self._lens[self.length + 1])

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, t, hq, d = q.shape
        if b != self.batch_size:
            raise ValueError(f"batch of {b} rows given to a FlatKVCache of batch_size {self.batch_size}")
        end = self.length + t
        if end > self.max_len:
            raise ValueError(f"{t} new tokens at length {self.length} overflow max_len={self.max_len}")
        k_cache, v_cache = self._paged(layer)
        # slot of row i's token j: i * capacity + length + j, in the (row, token) order of k.reshape
        slots = self._slots[self.length] if t == 1 else self._slots[self.length:end].T.reshape(-1)
        context_lens = self._lens[end]
        if t == 1 and paged_cache.FUSED_DECODE:  # write and attention in one op where its kernel takes them
            args = (q[:, 0], k[:, 0], v[:, 0], k_cache, v_cache, slots, self._block_tables, context_lens)
            fused = paged_cache.fused_impl("attention.decode_paged_write", *args)
            if fused is not None:
                return fused(*args)[:, None]
        registry("kv_cache.write", k.reshape(b * t, *k.shape[2:]), v.reshape(b * t, *v.shape[2:]), k_cache, v_cache,
                 slots)
        if t == 1:
            out = registry("attention.decode_paged", q[:, 0], k_cache, v_cache, self._block_tables, context_lens)
            return out[:, None]
        cu_seqlens = torch.arange(0, (b + 1) * t, t, dtype=torch.int32, device=q.device)
        out = registry("attention.prefill_paged", q.reshape(b * t, hq, d), k_cache, v_cache, self._block_tables,
                       cu_seqlens, context_lens, t)
        return out.view(b, t, hq, d)
