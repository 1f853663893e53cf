"""Turning logits into tokens, vectorised over the batch on the logits' device.

Per row, in order: repetition / frequency / presence penalties, the min_tokens ban on stop tokens,
temperature, top-k, top-p, min-p, then a draw. Temperature 0 is argmax.

Randomness is counter-based: every draw is a pure function of (the sequence's seed, the position
of the token being drawn, a stream id, the vocabulary index), computed with an integer hash on the
device. A sequence's draws therefore do not depend on what else is in the batch, nor on how often
it was preempted and recomputed; and no per-request generator state has to be carried around.
A draw from probabilities `p` is `argmax(p / E)` with `E ~ Exp(1)` i.i.d. per token (the
exponential race; equivalent to the Gumbel-max trick).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence as Seq
from dataclasses import dataclass, replace

import torch

from tessera.serve.sequence import Sequence
from tessera.serve.transfer import upload
from tessera.specs import SamplingParams

SAMPLE, DRAFT, ACCEPT, RESIDUAL = 0, 1, 2, 3  # stream ids: independent draws for one position
_M32 = 0xFFFFFFFF


def derive_seed(seed: int, index: int) -> int:
    """A 63-bit seed for completion `index` of a request seeded with `seed`."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _mul32(a: torch.Tensor, b: int) -> torch.Tensor:
    # (a * b) mod 2**32 for 0 <= a, b < 2**32, split in 16-bit halves so no int64 product overflows.
    return ((a & 0xFFFF) * b + ((((a >> 16) * b) & 0xFFFF) << 16)) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def row_keys(seeds: torch.Tensor, positions: torch.Tensor, stream: int) -> torch.Tensor:
    """[R] int64 keys in [0, 2**32) from 63-bit seeds and positions."""
    h = _fmix32(seeds & _M32)
    h = _fmix32(h ^ ((seeds >> 32) & _M32))
    h = _fmix32(h ^ (positions & _M32))
    return _fmix32(h ^ stream)


def uniform(seeds: torch.Tensor, positions: torch.Tensor, stream: int, vocab: int | None = None) -> torch.Tensor:
    """Uniform draws in (0, 1), float32: [R] when `vocab` is None, else [R, vocab]."""
    key = row_keys(seeds, positions, stream)
    if vocab is None:
        bits = _fmix32(key ^ 0x5BD1E995)
    else:
        idx = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
        bits = _fmix32(_fmix32(key[:, None] ^ _mul32(idx, 0x9E3779B1)[None, :]) ^ key[:, None])
    return ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))


def exponential_race(probs: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor, stream: int) -> torch.Tensor:
    """One draw per row of `probs` [R, V] (unnormalised is fine): token ids [R] int64."""
    e = -torch.log(uniform(seeds, positions, stream, probs.shape[-1]))
    return (probs / e).argmax(dim=-1)


@dataclass
class SamplingRows:
    """Per-row parameters as device tensors. Row r draws the token at `positions[r]` of a history
    (`seq.token_ids + extra[r]`): `extra` holds draft tokens for speculative verification rows."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    seeds: torch.Tensor
    positions: torch.Tensor
    greedy: torch.Tensor
    repetition: torch.Tensor | None
    frequency: torch.Tensor | None
    presence: torch.Tensor | None
    seen: torch.Tensor | None  # [R, V] bool: token occurs in prompt or output (repetition penalty)
    counts: torch.Tensor | None  # [R, V] float: occurrences in the output (frequency/presence)
    banned: tuple[torch.Tensor, torch.Tensor] | None  # (rows, token ids) masked to -inf (min_tokens)
    all_greedy: bool
    use_top_k: bool
    use_top_p: bool
    use_min_p: bool
    num_logprobs: int | None  # the largest top-N asked for; None when no row wants logprobs

    @property
    def history_dependent(self) -> bool:
        return self.seen is not None or self.counts is not None or self.banned is not None

    @classmethod
    def build(cls, seqs: Seq[Sequence], vocab: int, device: torch.device | str, eos_token_id: int | None,
              extra: Seq[Seq[int]] | None = None) -> SamplingRows:
        extra = extra or [()] * len(seqs)
        params = [s.sampling for s in seqs]

        temps = [p.temperature for p in params]
        greedy = [t == 0.0 for t in temps]
        top_k = [vocab if p.top_k < 0 else min(p.top_k, vocab) for p in params]
        use_rep = any(p.repetition_penalty != 1.0 for p in params)
        use_freq = any(p.frequency_penalty != 0.0 for p in params)
        use_pres = any(p.presence_penalty != 0.0 for p in params)
        lengths = [len(s.token_ids) + len(x) for s, x in zip(seqs, extra)]
        seen = counts = None
        if use_rep or use_freq or use_pres:  # only penalties read the histories themselves
            histories = [[*s.token_ids, *x] for s, x in zip(seqs, extra)]
            if use_rep:
                seen = _scatter_rows(histories, vocab, device, torch.bool)
            if use_freq or use_pres:
                outs = [h[s.num_prompt_tokens:] for s, h in zip(seqs, histories)]
                counts = _scatter_rows(outs, vocab, device, torch.float32)
        banned_rows, banned_ids = [], []
        for r, (s, length) in enumerate(zip(seqs, lengths)):
            if length - s.num_prompt_tokens < s.sampling.min_tokens:
                stops = set(s.sampling.stop_token_ids)
                if eos_token_id is not None and not s.sampling.ignore_eos:
                    stops.add(eos_token_id)
                banned_rows += [r] * len(stops)
                banned_ids += sorted(stops)
        # Two host-to-device copies carry every column: one for the float columns, one for the integer ones.
        floats = [[1.0 if g else t for g, t in zip(greedy, temps)], [p.top_p for p in params],
                  [p.min_p for p in params]]
        floats += [[p.repetition_penalty for p in params]] if use_rep else []
        floats += [[p.frequency_penalty for p in params]] if use_freq else []
        floats += [[p.presence_penalty for p in params]] if use_pres else []
        temperature, top_p, min_p, *penalties = upload(floats, torch.float32, device)
        top_k_t, seeds, positions, greedy_t, ban_r, ban_i = upload(
            [top_k, [s.seed for s in seqs], lengths, greedy, banned_rows, banned_ids],
            torch.int64, device)
        return cls(
            temperature=temperature,
            top_k=top_k_t,
            top_p=top_p,
            min_p=min_p,
            seeds=seeds,
            positions=positions,
            greedy=greedy_t.bool(),
            repetition=penalties.pop(0) if use_rep else None,
            frequency=penalties.pop(0) if use_freq else None,
            presence=penalties.pop(0) if use_pres else None,
            seen=seen,
            counts=counts,
            banned=(ban_r, ban_i) if banned_rows else None,
            all_greedy=all(greedy),
            use_top_k=any(k < vocab for k in top_k),
            use_top_p=any(p.top_p < 1.0 for p in params),
            use_min_p=any(p.min_p > 0.0 for p in params),
            num_logprobs=max((p.logprobs for p in params if p.logprobs is not None), default=None),
        )


def penalised(sp: SamplingParams) -> bool:
    """Whether `sp` asks for a repetition, frequency or presence penalty (rows that read the history)."""
    return sp.repetition_penalty != 1.0 or sp.frequency_penalty != 0.0 or sp.presence_penalty != 0.0


def plain_greedy(seq: Sequence) -> bool:
    """Whether `Sampler.process` leaves this sequence's next logits as they are and it takes their
    argmax, for this step and every later one: temperature 0, no penalty, no logprobs, and no
    min_tokens ban left (the conditions under which `SamplingRows.build` sets nothing for it). Read
    from the parameters alone, without building rows."""
    sp = seq.sampling
    return (sp.temperature == 0.0 and sp.logprobs is None and not penalised(sp)
            and seq.num_output_tokens >= sp.min_tokens)


class RowsCache:
    """Reuses the parameter tensors while the batch composition stays the same (the common decode
    case): only the positions change, and greedy-only batches do not even need those. Rows whose
    tensors depend on the history (penalties, a min_tokens ban) are rebuilt every step."""

    def __init__(self) -> None:
        self._key: tuple[int, ...] | None = None
        self._rows: SamplingRows | None = None

    def get(self, seqs: Seq[Sequence], vocab: int, device: torch.device | str, eos_token_id: int | None,
            ahead: int = 0) -> SamplingRows:
        """Rows drawing each sequence's token at position `num_tokens + ahead`: `ahead` tokens are drawn
        but not yet appended (overlapped decode). Those are placeholders in the history, so rows with
        penalties, which read it, must have `ahead` 0; a min_tokens ban counts them."""
        key = tuple(s.seq_id for s in seqs)
        rows = self._rows
        if rows is not None and key == self._key and not rows.history_dependent:
            if not rows.all_greedy:
                rows = replace(rows, positions=upload([[s.num_tokens + ahead for s in seqs]], torch.int64,
                                                      device)[0])
            return rows
        extra = [[0] * ahead] * len(seqs) if ahead else None
        self._key, self._rows = key, SamplingRows.build(seqs, vocab, device, eos_token_id, extra)
        return self._rows


def _scatter_rows(rows: list[list[int]], vocab: int, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    ids = upload([[t for r in rows for t in (*r, *[vocab] * (width - len(r)))]], torch.int64, device)[0]
    ids = ids.view(len(rows), width)
    out = torch.zeros(len(rows), vocab + 1, dtype=torch.float32, device=device)
    out.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    out = out[:, :vocab]
    return out > 0 if dtype == torch.bool else out


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [R] int64
    logprobs: torch.Tensor | None  # [R] float32: log p(chosen) under the model (before processing)
    top_ids: torch.Tensor | None  # [R, N]
    top_logprobs: torch.Tensor | None  # [R, N]


class Sampler:
    """Stateless: `sample(logits, rows)` draws one token per row; `probs(logits, rows)` returns the
    processed distribution each row draws from (one-hot argmax for greedy rows)."""

    def process(self, logits: torch.Tensor, rows: SamplingRows) -> torch.Tensor:
        """Penalised, banned, temperature-scaled and filtered float32 logits [R, V]."""
        x = logits.float()
        if rows.seen is not None and rows.repetition is not None:
            rp = rows.repetition[:, None]
            x = torch.where(rows.seen, torch.where(x > 0, x / rp, x * rp), x)
        if rows.counts is not None:
            if rows.frequency is not None:
                x = x - rows.frequency[:, None] * rows.counts
            if rows.presence is not None:
                x = x - rows.presence[:, None] * (rows.counts > 0).float()
        if rows.banned is not None:
            x = x.index_put(rows.banned, x.new_full((), float("-inf")))  # a fill, not a copy from the host
        if rows.all_greedy:
            return x
        x = x / rows.temperature[:, None]
        if rows.use_top_k or rows.use_top_p:
            x = self._top_k_top_p(x, rows)
        if rows.use_min_p:
            # p_i < min_p * p_max, compared in log space (invariant to the normaliser)
            threshold = x.amax(-1, keepdim=True) + rows.min_p.clamp(min=1e-30).log()[:, None]
            x = x.masked_fill((x < threshold) & (rows.min_p > 0)[:, None], float("-inf"))
        return x

    @staticmethod
    def _top_k_top_p(x: torch.Tensor, rows: SamplingRows) -> torch.Tensor:
        sorted_x, order = x.sort(dim=-1, descending=True)
        rank = torch.arange(x.shape[-1], device=x.device)[None, :]
        drop = rank >= rows.top_k[:, None]
        if rows.use_top_p:
            p = sorted_x.masked_fill(drop, float("-inf")).softmax(-1)
            before = p.cumsum(-1) - p
            drop = drop | ((before >= rows.top_p[:, None]) & (rows.top_p < 1.0)[:, None])
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        return torch.empty_like(x).scatter_(-1, order, sorted_x)

    def probs(self, logits: torch.Tensor, rows: SamplingRows) -> torch.Tensor:
        """The distribution each row draws from, float32 [R, V]; greedy rows are one-hot at the argmax."""
        x = self.process(logits, rows)
        onehot = torch.zeros_like(x).scatter_(-1, x.argmax(-1, keepdim=True), 1.0)
        if rows.all_greedy:
            return onehot
        return torch.where(rows.greedy[:, None], onehot, x.softmax(-1))

    def sample(self, logits: torch.Tensor, rows: SamplingRows, stream: int = SAMPLE) -> SamplerOutput:
        x = self.process(logits, rows)
        if rows.all_greedy:
            tokens = x.argmax(-1)
        else:
            drawn = exponential_race(x.softmax(-1), rows.seeds, rows.positions, stream)
            tokens = torch.where(rows.greedy, x.argmax(-1), drawn)
        return self.with_logprobs(logits, tokens, rows.num_logprobs)

    @staticmethod
    def with_logprobs(logits: torch.Tensor, tokens: torch.Tensor, num_logprobs: int | None) -> SamplerOutput:
        """Attach the model's log-probabilities (before penalties and temperature) when any row asked."""
        if num_logprobs is None:
            return SamplerOutput(tokens, None, None, None)
        logp = logits.float().log_softmax(-1)
        top = logp.topk(min(num_logprobs, logp.shape[-1]), dim=-1)
        return SamplerOutput(tokens, logp.gather(-1, tokens[:, None])[:, 0], top.indices, top.values)
