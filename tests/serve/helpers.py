"""Shared test helpers: a chi-square p-value from torch (no scipy needed) and sequence builders."""

from __future__ import annotations

import itertools

import torch

from tessera.serve.sampler import derive_seed
from tessera.serve.sequence import Sequence
from tessera.specs import SamplingParams

_ids = itertools.count()


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit of observed `counts` to `probs` (cells with p=0 must be empty)."""
    counts, probs = counts.double(), probs.double()
    assert counts[probs == 0].sum() == 0, "draws landed on zero-probability tokens"
    keep = probs > 0
    expected = probs[keep] * counts.sum()
    stat = ((counts[keep] - expected) ** 2 / expected).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def make_seq(prompt: list[int], sampling: SamplingParams | None = None, seed: int = 0,
             max_model_len: int = 4096, **kw) -> Sequence:
    sid = next(_ids)
    return Sequence(seq_id=sid, request_id=f"r{sid}", prompt_token_ids=list(prompt),
                    sampling=sampling or SamplingParams(), seed=derive_seed(seed, 0), max_model_len=max_model_len,
                    **kw)


def counting(obj, name: str) -> list[int]:
    """Wrap obj.name to count its calls; returns the counter."""
    calls = [0]
    inner = getattr(obj, name)

    def counted(*a, **kw):
        calls[0] += 1
        return inner(*a, **kw)

    setattr(obj, name, counted)
    return calls
