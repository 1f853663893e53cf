"""The block manager against a shadow model of slot contents: every live sequence must read back exactly
the tokens it wrote, through prefix hits, forks, copy-on-write, truncation and eviction; no block leaks."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tessera.serve.block_manager import BlockManager, OutOfBlocks
from tessera.specs import KVCacheManager

BS = 4


class Shadow:
    """Slot contents as the model runner would produce them: writes go through slots, copies through pairs."""

    def __init__(self, bm: BlockManager) -> None:
        self.bm = bm
        self.slots: dict[int, int] = {}
        self.handles = {}
        self.tokens: dict[int, list[int]] = {}

    def apply_copies(self) -> None:
        for src, dst in self.bm.take_copies():
            for o in range(self.bm.block_size):
                if src * self.bm.block_size + o in self.slots:
                    self.slots[dst * self.bm.block_size + o] = self.slots[src * self.bm.block_size + o]
                else:
                    self.slots.pop(dst * self.bm.block_size + o, None)

    def write(self, sid: int, start: int) -> None:
        h = self.handles[sid]
        for pos in range(start, h.num_tokens):
            block = h.block_ids[pos // self.bm.block_size]
            others = [s for s, o in self.handles.items() if s != sid and block in o.block_ids]
            assert not others, f"seq {sid} writes block {block} shared with {others}"
            self.slots[h.slot(pos)] = self.tokens[sid][pos]
        self.bm.cache_blocks(h, self.tokens[sid], h.num_tokens)

    def view(self, sid: int) -> list[int | None]:
        h = self.handles[sid]
        return [self.slots.get(h.slot(p)) for p in range(h.num_tokens)]


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(num_blocks=12, block_size=BS)
        self.sh = Shadow(self.bm)
        self.next_id = 0
        self.history: list[list[int]] = [[0] * 8]

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    @rule(data=st.data(), suffix=st.lists(st.integers(0, 2), min_size=0, max_size=12))
    def allocate(self, data: st.DataObject, suffix: list[int]) -> None:
        # Mostly reuse a prefix of something written before, so that prefix-cache hits are common.
        past = data.draw(st.sampled_from(self.history))
        tokens = past[: data.draw(st.integers(0, len(past)))] + suffix
        if not tokens:
            return
        sid = self._new_id()
        before = self.bm.num_free_blocks
        need = self.bm.free_blocks_needed(tokens)
        try:
            h, cached = self.bm.allocate_prefix(sid, tokens)
        except OutOfBlocks:
            assert need > before
            return
        assert need <= before and self.bm.num_free_blocks == before - need
        assert cached % BS == 0 and cached < len(tokens)
        self.sh.handles[sid], self.sh.tokens[sid] = h, list(tokens)
        assert self.sh.view(sid)[:cached] == tokens[:cached], "prefix-cache hit returned other tokens"
        self.sh.write(sid, cached)
        self.history.append(list(tokens))

    @precondition(lambda self: self.sh.handles)
    @rule(data=st.data(), extra=st.lists(st.integers(0, 2), min_size=0, max_size=9))
    def append(self, data: st.DataObject, extra: list[int]) -> None:
        sid = data.draw(st.sampled_from(sorted(self.sh.handles)))
        h = self.sh.handles[sid]
        can = self.bm.can_append(h, len(extra))
        try:
            new = self.bm.append(h, len(extra))
        except OutOfBlocks:
            assert not can
            return
        assert can
        self.sh.handles[sid] = new
        self.sh.apply_copies()
        self.sh.tokens[sid] += extra
        self.sh.write(sid, h.num_tokens)
        self.history.append(list(self.sh.tokens[sid]))

    @precondition(lambda self: self.sh.handles)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(sorted(self.sh.handles)))
        child = self._new_id()
        free = self.bm.num_free_blocks
        self.sh.handles[child] = self.bm.fork(self.sh.handles[sid], child)
        self.sh.tokens[child] = list(self.sh.tokens[sid])
        assert self.bm.num_free_blocks == free, "fork must not consume blocks"

    @precondition(lambda self: self.sh.handles)
    @rule(data=st.data())
    def truncate(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(sorted(self.sh.handles)))
        h = self.sh.handles[sid]
        n = data.draw(st.integers(0, h.num_tokens))
        self.sh.handles[sid] = self.bm.truncate(h, n)
        del self.sh.tokens[sid][n:]

    @precondition(lambda self: self.sh.handles)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(sorted(self.sh.handles)))
        self.bm.free(self.sh.handles.pop(sid))
        del self.sh.tokens[sid]

    @rule(n=st.integers(0, 4))
    def evict(self, n: int) -> None:
        cached = self.bm.num_cached_blocks
        free = self.bm.num_free_blocks
        dropped = self.bm.evict(n)
        assert dropped <= n and self.bm.num_cached_blocks == cached - dropped
        assert self.bm.num_free_blocks == free

    @invariant()
    def consistent(self) -> None:
        self.bm.check()
        assert not self.bm.take_copies(), "copies left unapplied"
        for sid in self.sh.handles:
            assert self.sh.view(sid) == self.sh.tokens[sid], f"seq {sid} reads back other tokens"
        held = {b for h in self.sh.handles.values() for b in h.block_ids}
        assert self.bm.num_free_blocks == self.bm.num_blocks - len(held), "block leak"


BlockManagerMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestBlockManagerStateful = BlockManagerMachine.TestCase


def test_implements_protocol() -> None:
    assert isinstance(BlockManager(4, 4), KVCacheManager)


def test_prefix_hit_and_lru_eviction_order() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a, _ = bm.allocate_prefix(1, [1, 2, 3, 4, 5])
    bm.cache_blocks(a, [1, 2, 3, 4, 5], 5)
    bm.free(a)
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 2
    b, cached = bm.allocate_prefix(2, [1, 2, 3, 4, 9])
    assert cached == 4 and b.block_ids[:2] == a.block_ids[:2]
    assert bm.prefix_hits == 4 and bm.prefix_queries == 10
    bm.free(b)
    # The tail of a chain is evicted before its head, so the surviving prefix stays reachable.
    bm.free(bm.allocate(3, 5))  # two never-cached blocks, then one eviction
    assert bm.num_cached_blocks == 1
    assert bm.allocate_prefix(4, [1, 2, 3, 4, 5])[1] == 2


def test_whole_prompt_cached_still_leaves_last_token() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    a, _ = bm.allocate_prefix(1, [1, 2, 3, 4])
    bm.cache_blocks(a, [1, 2, 3, 4], 4)
    _, cached = bm.allocate_prefix(2, [1, 2, 3, 4])
    assert cached == 2


def test_copy_on_write_pairs() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = bm.allocate(1, 6)
    b = bm.fork(a, 2)
    b2 = bm.append(b, 1)
    (src, dst), = bm.take_copies()
    assert src == a.block_ids[1] and dst == b2.block_ids[1] and dst != src
    assert b2.block_ids[0] == a.block_ids[0]
    a2 = bm.append(a, 1)  # a is now the sole owner of its last block: no copy
    assert not bm.take_copies() and a2.block_ids == a.block_ids
    bm.check()


def test_stale_handle_and_errors_name_the_value() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    a = bm.allocate(1, 3)
    bm.append(a, 1)
    with pytest.raises(ValueError, match="stale handle"):
        bm.append(a, 1)
    with pytest.raises(OutOfBlocks, match="needs 3 free blocks"):
        bm.allocate(2, 12)


def test_can_append_all_counts_every_append_together() -> None:
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    a, b = bm.allocate(0, 4), bm.allocate(1, 4)  # two full blocks: each next token needs a fresh block
    assert bm.can_append(a, 1) and bm.can_append(b, 1)
    assert bm.can_append_all([(a, 1), (b, 1)]) and bm.can_append_all([(a, 0), (b, 5)])
    assert not bm.can_append_all([(a, 1), (b, 5)])  # 1 + 2 blocks, 2 free
    fork = bm.fork(bm.append(a, 1), 2)  # a's last block now half full and shared: appending copies it
    assert bm.num_free_blocks == 1
    assert bm.can_append_all([(fork, 1)]) and not bm.can_append_all([(fork, 1), (b, 1)])
