"""Paged KV-cache bookkeeping: which blocks each sequence owns, shared prefixes, and a prefix cache.

Implements `tessera.specs.KVCacheManager`. A handle is an immutable value; every operation takes the
sequence's current handle and returns its successor (a stale handle is refused). Blocks carry
reference counts: `fork` shares all of a sequence's blocks, and the first `append` into a shared,
partly filled block copies it (copy-on-write); the (src, dst) pairs the model runner must copy
before its next forward are drained with `take_copies()`.

Prefix cache: a block that is full of computed tokens gets a content hash chained over every block
before it (`cache_blocks`). A later sequence whose prompt starts with the same tokens reuses those
blocks. A cached block whose last reference goes away stays cached but evictable; allocation takes
never-cached free blocks first, then evicts cached ones least-recently-used first.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence

from tessera.specs import KVCacheHandle


class OutOfBlocks(RuntimeError):
    """Not enough free blocks for the requested allocation (the caller should preempt or wait)."""


def _chain_hash(prev: bytes, tokens: Sequence[int]) -> bytes:
    return hashlib.blake2b(prev + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockManager:
    """Bookkeeping for `num_blocks` blocks of `block_size` token slots (no tensors here)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks
        self._by_hash: dict[bytes, int] = {}
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._live: dict[int, KVCacheHandle] = {}
        self._chains: dict[int, list[bytes]] = {}  # seq -> hashes of its leading full computed blocks
        self._copies: list[tuple[int, int]] = []
        self.prefix_queries = 0  # tokens looked up in the prefix cache
        self.prefix_hits = 0  # tokens found there

    # ---- queries ---------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take: never-cached free blocks plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._by_hash)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live sequences (0..1)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def handle(self, seq_id: int) -> KVCacheHandle | None:
        return self._live.get(seq_id)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= self.num_free_blocks

    def can_append(self, handle: KVCacheHandle, num_tokens: int) -> bool:
        grow, copied = self._append_needs(handle, num_tokens)
        return grow + copied <= self.num_free_blocks

    def can_append_all(self, appends: Sequence[tuple[KVCacheHandle, int]]) -> bool:
        """Whether every (handle, num_tokens) append of `appends` (distinct handles) fits at once."""
        need = 0
        for handle, num_tokens in appends:
            grow, copied = self._append_needs(handle, num_tokens)
            need += grow + copied
        return need <= self.num_free_blocks

    def cached_prefix_tokens(self, token_ids: Sequence[int], num_tokens: int | None = None) -> int:
        """Leading tokens of `token_ids[:num_tokens]` that `allocate_prefix` would serve from the cache."""
        n = len(token_ids) if num_tokens is None else num_tokens
        return len(self._match(token_ids, n)) * self.block_size

    def free_blocks_needed(self, token_ids: Sequence[int], num_tokens: int | None = None) -> int:
        """Free-pool blocks that `allocate_prefix(_, token_ids, num_tokens)` would consume now
        (fresh blocks plus cached hits that are currently evictable)."""
        n = len(token_ids) if num_tokens is None else num_tokens
        hits = self._match(token_ids, n)
        revived = sum(1 for b in hits if self._ref[b] == 0)
        return self.blocks_for(n) - len(hits) + revived

    # ---- the KVCacheManager API --------------------------------------------------------------

    def allocate(self, seq_id: int, num_tokens: int) -> KVCacheHandle:
        """Fresh blocks for `num_tokens` tokens of a new sequence (no prefix-cache lookup)."""
        return self.allocate_prefix(seq_id, (), num_tokens)[0]

    def allocate_prefix(self, seq_id: int, token_ids: Sequence[int],
                        num_tokens: int | None = None) -> tuple[KVCacheHandle, int]:
        """Blocks for the first `num_tokens` (default: all) of `token_ids`, reusing cached blocks of
        a matching prefix. Returns (handle, number of leading tokens whose KV is already cached).
        The last token is never served from cache, so there is always a token to compute.
        Raises OutOfBlocks when the free pool is too small, ValueError if `seq_id` is live."""
        if seq_id in self._live:
            raise ValueError(f"seq_id {seq_id} already holds a cache handle")
        n = len(token_ids) if num_tokens is None else num_tokens
        if n < 0 or (token_ids and n > len(token_ids)):
            raise ValueError(f"num_tokens {n} outside [0, {len(token_ids)}] for seq {seq_id}")
        hits = self._match(token_ids, n)
        revived = sum(1 for b in hits if self._ref[b] == 0)
        need = self.blocks_for(n) - len(hits) + revived
        if need > self.num_free_blocks:
            raise OutOfBlocks(f"seq {seq_id} needs {need} free blocks for {n} tokens; {self.num_free_blocks} free")
        if self.enable_prefix_caching and token_ids:
            self.prefix_queries += n
            self.prefix_hits += len(hits) * self.block_size
        for b in hits:
            if self._ref[b] == 0:
                del self._evictable[b]
            self._ref[b] += 1
        fresh = [self._take() for _ in range(self.blocks_for(n) - len(hits))]
        self._chains[seq_id] = [self._hash[b] for b in hits]  # type: ignore[misc]
        handle = self._make(seq_id, (*hits, *fresh), n)
        return handle, len(hits) * self.block_size

    def append(self, handle: KVCacheHandle, num_tokens: int) -> KVCacheHandle:
        """Room for `num_tokens` more tokens. Appending into a shared, partly filled last block copies
        it first (its (src, dst) pair is queued for `take_copies`). Raises OutOfBlocks."""
        self._check_live(handle)
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        blocks = handle.block_ids
        new_total = handle.num_tokens + num_tokens
        grow, copied = self._append_needs(handle, num_tokens)
        if grow + copied > self.num_free_blocks:
            raise OutOfBlocks(f"seq {handle.seq_id} needs {grow + copied} free blocks; {self.num_free_blocks} free")
        if copied:
            src = blocks[-1]
            dst = self._take()
            self._release(src)
            blocks = (*blocks[:-1], dst)
            self._copies.append((src, dst))
        elif num_tokens and handle.num_tokens % self.block_size:
            # A cached block left partly filled by a truncate while shared, whose other owners have
            # since gone: it is ours alone now and its tail is about to be overwritten.
            self._uncache(blocks[-1])
        if not grow and not copied:
            # Most decode steps: the same blocks hold one more token. Copying the validated handle with
            # the new count (it fits: no block to add) costs a third of validating a new one.
            return self._remember(handle.model_copy(update={"num_tokens": new_total}))
        return self._make(handle.seq_id, (*blocks, *(self._take() for _ in range(grow))), new_total)

    def fork(self, handle: KVCacheHandle, new_seq_id: int) -> KVCacheHandle:
        """A new sequence sharing every block of `handle` (reference counts go up; no copy yet)."""
        self._check_live(handle)
        if new_seq_id in self._live:
            raise ValueError(f"seq_id {new_seq_id} already holds a cache handle")
        for b in handle.block_ids:
            self._ref[b] += 1
        self._chains[new_seq_id] = list(self._chains[handle.seq_id])
        return self._make(new_seq_id, handle.block_ids, handle.num_tokens)

    def truncate(self, handle: KVCacheHandle, num_tokens: int) -> KVCacheHandle:
        """Keep only the first `num_tokens` tokens (speculative rollback); trailing blocks are released.
        A cached block that becomes partly filled and is owned by this sequence alone leaves the cache
        (its tail will be overwritten); a shared one is copied on the next append instead."""
        self._check_live(handle)
        if not 0 <= num_tokens <= handle.num_tokens:
            raise ValueError(f"truncate to {num_tokens} outside [0, {handle.num_tokens}] for seq {handle.seq_id}")
        keep = self.blocks_for(num_tokens)
        for b in reversed(handle.block_ids[keep:]):
            self._release(b)
        blocks = handle.block_ids[:keep]
        if num_tokens % self.block_size and self._ref[blocks[-1]] == 1:
            self._uncache(blocks[-1])
        del self._chains[handle.seq_id][num_tokens // self.block_size:]
        return self._make(handle.seq_id, blocks, num_tokens)

    def free(self, handle: KVCacheHandle) -> None:
        """Release every block of the sequence; cached ones stay reusable until evicted."""
        self._check_live(handle)
        # Tail first, so that LRU eviction takes a chain's tail before the prefix it hangs from.
        for b in reversed(handle.block_ids):
            self._release(b)
        del self._live[handle.seq_id]
        del self._chains[handle.seq_id]

    # ---- prefix cache ------------------------------------------------------------------------

    def cache_blocks(self, handle: KVCacheHandle, token_ids: Sequence[int], num_computed: int) -> None:
        """Register every block of the sequence that is full of computed tokens (`token_ids[:num_computed]`,
        KV written) in the prefix cache. Idempotent; cheap when nothing new is full."""
        self._check_live(handle)
        if not self.enable_prefix_caching:
            return
        chain = self._chains[handle.seq_id]
        full = min(num_computed, handle.num_tokens) // self.block_size
        bs = self.block_size
        for i in range(len(chain), full):
            h = _chain_hash(chain[-1] if chain else b"", token_ids[i * bs:(i + 1) * bs])
            chain.append(h)
            b = handle.block_ids[i]
            if h not in self._by_hash and self._hash[b] is None:
                self._by_hash[h] = b
                self._hash[b] = h

    def evict(self, num_blocks: int) -> int:
        """Drop up to `num_blocks` unreferenced cached blocks, least recently used first; returns how many."""
        n = 0
        while n < num_blocks and self._evictable:
            b, _ = self._evictable.popitem(last=False)
            self._uncache(b)
            self._free.append(b)
            n += 1
        return n

    def reset_prefix_cache(self) -> None:
        self.evict(len(self._evictable))

    def take_copies(self) -> list[tuple[int, int]]:
        """(src_block, dst_block) pairs from copy-on-write since the last call; the runner copies them."""
        out, self._copies = self._copies, []
        return out

    # ---- invariants (tests and debugging) ------------------------------------------------------

    def check(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent."""
        counts = [0] * self.num_blocks
        for seq_id, h in self._live.items():
            assert h.seq_id == seq_id, f"live handle under {seq_id} names seq {h.seq_id}"
            assert len(h.block_ids) == self.blocks_for(h.num_tokens), f"seq {seq_id}: {h} has extra/missing blocks"
            assert len(set(h.block_ids)) == len(h.block_ids), f"seq {seq_id} lists a block twice"
            assert len(self._chains[seq_id]) <= h.num_tokens // self.block_size, f"seq {seq_id}: chain too long"
            for b in h.block_ids:
                counts[b] += 1
        assert counts == self._ref, f"reference counts {self._ref} != live handle counts {counts}"
        free, evictable = set(self._free), set(self._evictable)
        assert len(free) == len(self._free), "a block is on the free list twice"
        assert not free & evictable, f"blocks both free and evictable: {free & evictable}"
        for b in range(self.num_blocks):
            pooled = b in free or b in evictable
            assert pooled == (self._ref[b] == 0), f"block {b}: ref {self._ref[b]} but pooled={pooled}"
            if b in free:
                assert self._hash[b] is None, f"free block {b} still carries a hash"
            if b in evictable:
                assert self._hash[b] is not None, f"evictable block {b} has no hash"
        for h, b in self._by_hash.items():
            assert self._hash[b] == h, f"hash index points at block {b} whose hash differs"
        assert sum(x is not None for x in self._hash) == len(self._by_hash), "unindexed hashed block"
        assert set(self._chains) == set(self._live), "chains and live handles disagree"

    # ---- internals ---------------------------------------------------------------------------

    def _make(self, seq_id: int, blocks: tuple[int, ...], num_tokens: int) -> KVCacheHandle:
        return self._remember(KVCacheHandle(seq_id=seq_id, block_ids=blocks, num_tokens=num_tokens,
                                            block_size=self.block_size))

    def _remember(self, handle: KVCacheHandle) -> KVCacheHandle:
        self._live[handle.seq_id] = handle
        return handle

    def _check_live(self, handle: KVCacheHandle) -> None:
        current = self._live.get(handle.seq_id)
        if current is None:
            raise ValueError(f"seq {handle.seq_id} holds no cache handle (freed or never allocated)")
        if current is not handle and current != handle:
            raise ValueError(f"stale handle for seq {handle.seq_id}: {handle.num_tokens} tokens, "
                             f"current has {current.num_tokens}")

    def _match(self, token_ids: Sequence[int], num_tokens: int) -> list[int]:
        if not self.enable_prefix_caching or not token_ids:
            return []
        bs, prev, hits = self.block_size, b"", []
        for i in range(max(num_tokens - 1, 0) // bs):
            prev = _chain_hash(prev, token_ids[i * bs:(i + 1) * bs])
            b = self._by_hash.get(prev)
            if b is None:
                break
            hits.append(b)
        return hits

    def _cow_needed(self, handle: KVCacheHandle) -> bool:
        return handle.num_tokens % self.block_size != 0 and self._ref[handle.block_ids[-1]] > 1

    def _append_needs(self, handle: KVCacheHandle, num_tokens: int) -> tuple[int, bool]:
        """(blocks to add, whether the last block must be copied first) for appending `num_tokens`."""
        grow = self.blocks_for(handle.num_tokens + num_tokens) - len(handle.block_ids)
        return grow, bool(num_tokens) and self._cow_needed(handle)

    def _take(self) -> int:
        if self._free:
            b = self._free.popleft()
        elif self._evictable:
            b, _ = self._evictable.popitem(last=False)
            self._uncache(b)
        else:
            raise OutOfBlocks("no free block")
        self._ref[b] = 1
        return b

    def _release(self, b: int) -> None:
        self._ref[b] -= 1
        if self._ref[b] == 0:
            if self._hash[b] is None:
                self._free.append(b)
            else:
                self._evictable[b] = None

    def _uncache(self, b: int) -> None:
        h = self._hash[b]
        if h is not None:
            del self._by_hash[h]
            self._hash[b] = None
