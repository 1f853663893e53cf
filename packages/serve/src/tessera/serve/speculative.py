"""Speculative decoding: a proposer guesses up to k tokens, the target scores them all in one forward,
and rejection sampling keeps exactly the target's distribution.

Verification (Leviathan et al. / Chen et al.): draft token d_i drawn from q_i is accepted with
probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection the token is redrawn from
norm(max(0, p_i - q_i)); when all are accepted a bonus token is drawn from p_{k+1}. For greedy
requests p and q are one-hot argmaxes, which turns the same rule into "accept while the draft equals
the target's argmax, then take the target's argmax": speculative greedy equals plain greedy.

Proposers:
- `DraftProposer`: a smaller model with its own paged cache. It shares the target's block tables
  (same block ids and slots, separate storage), so the block manager, prefix cache and rollback
  serve both caches at once.
- `NgramProposer`: prompt lookup; the continuation of the most recent earlier occurrence of the
  context's last n tokens (n from ngram_max down to ngram_min). Its q is one-hot.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from tessera.serve.model_runner import ModelRunner, StepInput
from tessera.serve.sampler import (
    ACCEPT,
    DRAFT,
    RESIDUAL,
    Sampler,
    SamplingRows,
    exponential_race,
    uniform,
)
from tessera.serve.scheduler import ScheduledSeq
from tessera.serve.sequence import Sequence
from tessera.serve.transfer import upload

#: Token ids as 4-byte machine integers for the n-gram search (ids are below 2**31).
_ID_CODE = "i"
_ID_BYTES = array(_ID_CODE).itemsize


@dataclass
class Proposal:
    """`tokens[i]`: up to k draft tokens for decode sequence i; `q [B, k, V]` their draft
    distributions (rows past len(tokens[i]) are unused), or None when every sequence is greedy: greedy
    verification compares tokens and needs no distribution."""

    tokens: list[list[int]]
    q: torch.Tensor | None


def all_greedy(decodes: Seq[ScheduledSeq]) -> bool:
    """Whether every sequence decodes at temperature 0 (the test `SamplingRows.all_greedy` makes)."""
    return all(s.seq.sampling.temperature == 0.0 for s in decodes)


def greedy_verdicts(targets: Seq[int], drafts: Seq[Seq[int]]) -> tuple[list[list[int]], list[int]]:
    """Greedy verification on the host. `targets`: the target's argmax at each verification row, sequence
    by sequence (len(drafts[i]) + 1 rows each). Sequence i accepts its drafts while they equal the
    target's argmax, then emits the argmax at the first mismatch (or past the last draft): the rule
    `verify` applies to one-hot distributions, on token ids. Returns (emitted, accepted):
    emitted[i] holds accepted[i] + 1 tokens."""
    emitted, accepted, row = [], [], 0
    for d in drafts:
        a = 0
        while a < len(d) and d[a] == targets[row + a]:
            a += 1
        emitted.append([*d[:a], targets[row + a]])
        accepted.append(a)
        row += len(d) + 1
    return emitted, accepted


def verify(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, num_draft: torch.Tensor, seeds: torch.Tensor,
           positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rejection sampling for B sequences at once.

    p [B, K+1, V]: target distributions at the K draft positions and one past them; q [B, K, V]:
    draft distributions; draft [B, K] int64 (entries past num_draft[b] ignored); positions [B]: the
    position of the first draft token (keys the random draws). Returns (tokens [B, K+1], num_accepted [B]):
    sequence b emits tokens[b, :num_accepted[b] + 1].

    Greedy rounds (p and q one-hot, q at the draft token) need none of this: u * q(d) <= p(d) with u in
    (0, 1) holds iff p(d) = 1, and the residual max(0, p - q) is one-hot at p's argmax, so the rule is
    `greedy_verdicts` on token ids.
    """
    b, k = draft.shape
    steps = torch.arange(k, device=p.device)
    pos = positions[:, None] + steps[None, :]
    if k:
        p_d = p[:, :k].gather(-1, draft[..., None])[..., 0]
        u = uniform(seeds.repeat_interleave(k), pos.reshape(-1), ACCEPT).view(b, k)
        q_d = q.gather(-1, draft[..., None])[..., 0]
        ok = (u * q_d <= p_d) & (steps[None, :] < num_draft[:, None])
        accepted = ok.int().cumprod(-1).sum(-1)
    else:
        accepted = torch.zeros(b, dtype=torch.int64, device=p.device)
    rows = torch.arange(b, device=p.device)
    p_next = p[rows, accepted]
    if k:
        q_next = q[rows, accepted.clamp(max=k - 1)] * (accepted < num_draft).float()[:, None]
        residual = (p_next - q_next).clamp(min=0)
        mass = residual.sum(-1, keepdim=True)
        residual = torch.where(mass > 0, residual, p_next)  # p == q exactly: rejection had probability 0
        last = exponential_race(residual, seeds, positions + accepted, RESIDUAL)
    else:
        last = exponential_race(p_next, seeds, positions + accepted, RESIDUAL)
    tokens = torch.cat([draft, torch.zeros(b, 1, dtype=draft.dtype, device=p.device)], dim=1)
    tokens[rows, accepted] = last
    return tokens, accepted


class DraftProposer:
    def __init__(self, runner: ModelRunner, sampler: Sampler, eos_token_id: int | None) -> None:
        self.runner = runner
        self.sampler = sampler
        self.eos = eos_token_id

    def propose(self, decodes: Seq[ScheduledSeq], prefills: Seq[ScheduledSeq]) -> Proposal:
        """Catch the draft cache up (decode sequences' unseen tokens and this step's prefill chunks,
        in one forward), then draw up to `num_lookahead` tokens per decode sequence. Updates
        `num_draft_computed` to what the draft cache now holds."""
        vocab = self.runner.vocab_size
        k = max((s.num_lookahead for s in decodes), default=0)
        seqs = [s.seq for s in decodes]
        handles = [s.seq.handle for s in (*decodes, *prefills)]
        tokens = [s.seq.token_ids[s.seq.num_draft_computed:] for s in decodes]
        tokens += [s.seq.token_ids[s.seq.num_computed:s.seq.num_computed + s.num_new_tokens] for s in prefills]
        starts = [s.seq.num_draft_computed for s in decodes] + [s.seq.num_computed for s in prefills]
        rows, end = [], 0
        for t in tokens[:len(decodes)]:
            end += len(t)
            rows.append(end - 1)
        logits = self.runner.forward(StepInput(handles, tokens, starts, rows))
        for s in decodes:
            s.seq.num_draft_computed = s.seq.num_tokens
        for s in prefills:
            s.seq.num_draft_computed = s.seq.num_computed + s.num_new_tokens
        drafts: list[list[int]] = [[] for _ in decodes]
        greedy = all_greedy(decodes)
        q = None if greedy else torch.zeros(len(decodes), k, vocab, device=self.runner.device)
        active = list(range(len(decodes)))
        rows_spec, rows_n = None, 0
        for j in range(k):
            active = [i for i in active if decodes[i].num_lookahead > j]
            if not active:
                break
            if j:
                logits = self.runner.forward(StepInput(
                    [seqs[i].handle for i in active], [[drafts[i][-1]] for i in active],
                    [seqs[i].num_tokens + j - 1 for i in active], list(range(len(active)))))
            elif len(active) < len(decodes):
                logits = logits[active]
            # Greedy rows without penalties or bans read nothing from the history: the first step's
            # rows serve the round while the active set stays the same.
            if not (greedy and j and len(active) == rows_n and not rows_spec.history_dependent):
                rows_spec = SamplingRows.build([seqs[i] for i in active], vocab, self.runner.device, self.eos,
                                               extra=[drafts[i] for i in active])
                rows_n = len(active)
            if greedy:  # the argmax of the processed logits; no distribution is kept
                picked = self.sampler.process(logits, rows_spec).argmax(-1)
            else:
                probs = self.sampler.probs(logits, rows_spec)
                picked = exponential_race(probs, rows_spec.seeds, rows_spec.positions, DRAFT)
                q[upload([active], torch.int64, q.device)[0], j] = probs
            for i, t in zip(active, picked.tolist()):
                drafts[i].append(t)
            if j:
                for i in active:
                    seqs[i].num_draft_computed += 1
        return Proposal(drafts, q)


class NgramProposer:
    def __init__(self, vocab_size: int, ngram_min: int, ngram_max: int, device: torch.device) -> None:
        self.vocab = vocab_size
        self.n_min, self.n_max = ngram_min, ngram_max
        self.device = device

    def lookup(self, tokens: Seq[int], k: int) -> list[int]:
        """Up to k tokens following the latest earlier match of the last n tokens, longest n first.

        The search runs in C: the ids as int32 bytes and `bytes.rfind`, a hit counting only where it
        starts on a token boundary. A Python scan costs O(length x n) interpreter steps a sequence and
        round, milliseconds for a long context without a match."""
        size = len(tokens)
        if k <= 0 or size < 2:
            return []
        width = _ID_BYTES
        buf = array(_ID_CODE, tokens).tobytes()
        for n in range(min(self.n_max, size - 1), self.n_min - 1, -1):
            tail = buf[(size - n) * width:]
            end = (size - 1) * width  # a match lies in buf[:end]: it starts at token size - n - 1 or before
            while (at := buf.rfind(tail, 0, end)) >= 0:
                if at % width == 0:
                    start = at // width + n
                    return list(tokens[start:start + k])
                end = at + len(tail) - 1  # straddles two tokens: look for one starting before it
        return []

    def propose(self, decodes: Seq[ScheduledSeq], prefills: Seq[ScheduledSeq]) -> Proposal:
        k = max((s.num_lookahead for s in decodes), default=0)
        drafts = [self.lookup(s.seq.token_ids, s.num_lookahead) for s in decodes]
        if all_greedy(decodes):
            return Proposal(drafts, None)
        q = torch.zeros(len(decodes), k, self.vocab, device=self.device)
        if any(drafts):
            rows, cols, ids = upload([[i for i, d in enumerate(drafts) for _ in d],
                                      [j for d in drafts for j in range(len(d))], [t for d in drafts for t in d]],
                                     torch.int64, self.device)
            q[rows, cols, ids] = 1.0
        return Proposal(drafts, q)


def target_rows(decodes: Seq[ScheduledSeq], drafts: Seq[Seq[int]]) -> tuple[list[Sequence], list[list[int]]]:
    """Virtual sampling rows for verification: row j of sequence i sees history + drafts[i][:j]."""
    seqs, extra = [], []
    for s, d in zip(decodes, drafts):
        for j in range(len(d) + 1):
            seqs.append(s.seq)
            extra.append(list(d[:j]))
    return seqs, extra
