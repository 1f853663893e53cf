"""Continuous batching: every step recomposes the batch from the running and waiting sequences.

Order of service, under a budget of `max_num_batched_tokens` new tokens per step:
  1. running sequences in decode (one token each, plus `num_lookahead` slots for speculative drafts),
     in admission order; when the cache has no room, the most recently admitted running sequence
     is preempted (its blocks freed, its tokens recomputed later);
  2. running sequences whose (chunked) prefill is unfinished;
  3. waiting sequences, strictly first come first served: if the head does not fit, nothing behind it
     is admitted, so no request starves behind a stream of smaller ones.
Thrash guard: no admission in a step that preempted, and admission keeps a watermark of free blocks;
a sequence that was preempted before needs extra headroom (one block per running sequence) to resume.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from tessera.serve.block_manager import BlockManager
from tessera.serve.errors import EngineOverloaded
from tessera.serve.sequence import SeqStatus, Sequence


@dataclass
class ScheduledSeq:
    """`num_new_tokens` of `seq`'s uncomputed tokens run this step; `num_lookahead` extra slots are
    reserved behind them for speculative drafts (decode only)."""

    seq: Sequence
    num_new_tokens: int
    num_lookahead: int = 0

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the sequence, so its last row is sampled."""
        return self.seq.num_computed + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_waiting: int, enable_chunked_prefill: bool = True, num_lookahead: int = 0,
                 watermark: float = 0.01) -> None:
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_waiting = max_waiting
        self.enable_chunked_prefill = enable_chunked_prefill
        self.num_lookahead = num_lookahead
        self.watermark_blocks = max(1, int(watermark * block_manager.num_blocks))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # ---- queue management ----------------------------------------------------------------------

    def add(self, seqs: Iterable[Sequence]) -> None:
        """Queue the sequences of one request. Raises EngineOverloaded when the waiting queue is full."""
        seqs = list(seqs)
        if len(self.waiting) + len(seqs) > self.max_waiting:
            raise EngineOverloaded(len(self.waiting), self.max_waiting)
        self.waiting.extend(seqs)

    def finish(self, seq: Sequence) -> None:
        """Take a sequence out of the queues and release its blocks (finished or aborted)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.handle is not None:
            self.bm.free(seq.handle)
            seq.handle = None
        seq.status = SeqStatus.FINISHED

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def lookahead(self, seq: Sequence) -> int:
        """Draft slots for a decoding sequence: no more than it could still emit."""
        return max(0, min(self.num_lookahead, seq.max_len - seq.num_tokens))

    # ---- one step --------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        for seq in list(self.running):
            if seq.status is not SeqStatus.RUNNING or not seq.is_decode:
                continue
            look = self.lookahead(seq)
            if 1 + look > budget:
                continue
            if self._reserve(seq, look, out):
                out.scheduled.append(ScheduledSeq(seq, 1, look))
                budget -= 1 + look
        for seq in self.running:
            if budget == 0:
                break
            if seq.is_decode:
                continue
            chunk = min(seq.num_uncomputed, budget)
            if chunk < seq.num_uncomputed and not self.enable_chunked_prefill:
                continue
            out.scheduled.append(ScheduledSeq(seq, chunk))
            budget -= chunk
        if not out.preempted:
            budget = self._admit(out, budget)
        out.copies = self.bm.take_copies()
        return out

    def _reserve(self, seq: Sequence, look: int, out: SchedulerOutput) -> bool:
        """Grow `seq`'s handle to cover its next token plus `look` draft slots, preempting from the
        back of the running list until it fits. False if `seq` itself had to be preempted."""
        assert seq.handle is not None
        grow = seq.num_tokens + look - seq.handle.num_tokens
        while not self.bm.can_append(seq.handle, grow):
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is seq:
                return False
        if grow > 0:
            seq.handle = self.bm.append(seq.handle, grow)
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        out.scheduled = [s for s in out.scheduled if s.seq is not seq]
        if seq.handle is not None:
            self.bm.free(seq.handle)
        seq.handle = None
        seq.num_computed = 0
        seq.num_draft_computed = 0
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def _admit(self, out: SchedulerOutput, budget: int) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            need = self.bm.free_blocks_needed(seq.token_ids)
            headroom = 0
            if self.running:
                headroom = self.watermark_blocks + (len(self.running) if seq.num_preemptions else 0)
            if need + headroom > self.bm.num_free_blocks:
                break
            uncached = seq.num_tokens - self.bm.cached_prefix_tokens(seq.token_ids)
            if uncached > budget and not self.enable_chunked_prefill:
                break
            self.waiting.popleft()
            seq.handle, cached = self.bm.allocate_prefix(seq.seq_id, seq.token_ids)
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = cached
            seq.num_computed = cached
            seq.num_draft_computed = cached
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            chunk = min(seq.num_uncomputed, budget)
            out.scheduled.append(ScheduledSeq(seq, chunk))
            budget -= chunk
        return budget
