"""The scheduler driven by a model-free step loop: budgets, ordering, admission limits, preemption,
FCFS, and that every request finishes with no block leaked."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from tessera.serve.block_manager import BlockManager
from tessera.serve.errors import EngineOverloaded
from tessera.serve.scheduler import Scheduler
from tessera.serve.sequence import SeqStatus
from tessera.specs import SamplingParams

from .helpers import make_seq


def make(num_blocks=16, block_size=4, **kw):
    args = dict(max_num_seqs=8, max_num_batched_tokens=16, max_waiting=100)
    args.update(kw)
    return Scheduler(BlockManager(num_blocks, block_size), **args)


def step(sched: Scheduler, next_token: int = 7):
    """Pretend to run the model: computed tokens advance, sampled rows append a token, done ones finish."""
    out = sched.schedule()
    out.was_decode = [s.seq.is_decode for s in out.scheduled]
    for s in out.scheduled:
        seq = s.seq
        samples = s.samples
        seq.num_computed += s.num_new_tokens
        sched.bm.cache_blocks(seq.handle, seq.token_ids, seq.num_computed)
        if samples:
            seq.token_ids.append(next_token)
            if seq.num_tokens >= seq.max_len:
                sched.finish(seq)
    sched.bm.check()
    return out


def test_decodes_first_then_chunked_prefill_within_budget() -> None:
    sched = make()
    a = make_seq(list(range(10)), SamplingParams(max_tokens=4))
    sched.add([a])
    out = step(sched)
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(a, 10)]
    b = make_seq(list(range(100, 130)), SamplingParams(max_tokens=2))
    sched.add([b])
    out = step(sched)
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(a, 1), (b, 15)]
    out = step(sched)
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(a, 1), (b, 15)]
    assert out.num_batched_tokens <= 16


def test_without_chunking_a_prefill_waits_for_the_whole_budget() -> None:
    sched = make(enable_chunked_prefill=False)
    a, b = make_seq(list(range(10)), SamplingParams(max_tokens=4)), make_seq(list(range(50, 60)))
    sched.add([a, b])
    out = step(sched)
    assert [s.seq for s in out.scheduled] == [a]


def test_admission_limits() -> None:
    sched = make(max_num_seqs=2, max_waiting=3)
    sched.add([make_seq([1]) for _ in range(3)])
    with pytest.raises(EngineOverloaded, match="max_waiting=3"):
        sched.add([make_seq([1])])
    step(sched)
    assert len(sched.running) == 2 and len(sched.waiting) == 1


def test_preempts_newest_and_resumes_it_first() -> None:
    sched = make(num_blocks=5, block_size=4, max_num_batched_tokens=64)
    old = make_seq(list(range(8)), SamplingParams(max_tokens=8))
    new = make_seq(list(range(20, 28)), SamplingParams(max_tokens=8))
    sched.add([old, new])
    step(sched)  # both prefilled (4 blocks, 1 free), each has 9 tokens: the next decodes need a block each
    out = step(sched)
    assert out.preempted == [new] and [s.seq for s in out.scheduled] == [old]
    assert new.status is SeqStatus.WAITING and sched.waiting[0] is new and new.num_computed == 0
    assert sched.num_preemptions == 1


def test_fcfs_head_blocks_smaller_requests_behind_it() -> None:
    sched = make(num_blocks=6, block_size=4, max_num_batched_tokens=64)
    first = make_seq(list(range(16)), SamplingParams(max_tokens=4))
    sched.add([first])
    step(sched)
    big = make_seq(list(range(100, 116)), SamplingParams(max_tokens=4))  # needs 4 blocks, 1 free
    small = make_seq([1], SamplingParams(max_tokens=1))
    sched.add([big, small])
    out = step(sched)
    assert big.status is SeqStatus.WAITING and small.status is SeqStatus.WAITING
    assert [s.seq for s in out.scheduled] == [first]


@settings(max_examples=40, deadline=None)
@given(reqs=st.lists(st.tuples(st.integers(1, 30), st.integers(1, 12)), min_size=1, max_size=12),
       num_blocks=st.integers(11, 20), budget=st.integers(4, 40), lookahead=st.integers(0, 3))
def test_everything_finishes_without_leaks(reqs, num_blocks, budget, lookahead) -> None:
    sched = make(num_blocks=num_blocks, block_size=4, max_num_batched_tokens=budget, max_num_seqs=4,
                 num_lookahead=lookahead)
    seqs = [make_seq([i % 3] * p, SamplingParams(max_tokens=m)) for i, (p, m) in enumerate(reqs)]
    sched.add(seqs)
    for _ in range(2000):
        if not sched.has_unfinished:
            break
        running = set(map(id, sched.running))
        out = step(sched)
        assert out.num_batched_tokens + sum(s.num_lookahead for s in out.scheduled) <= budget
        kinds = [d and id(s.seq) in running for s, d in zip(out.scheduled, out.was_decode)]
        assert kinds == sorted(kinds, reverse=True), "running decodes come first"
    assert not sched.has_unfinished, "requests left unfinished (livelock)"
    assert all(s.num_output_tokens == s.sampling.max_tokens for s in seqs)
    assert sched.bm.num_free_blocks == num_blocks
