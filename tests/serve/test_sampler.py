"""The sampler against direct per-row implementations, and its draws against their distribution."""

from __future__ import annotations

import math

import pytest
import torch

from tessera.serve.sampler import SAMPLE, Sampler, SamplingRows, exponential_race, uniform
from tessera.serve.transfer import upload
from tessera.specs import SamplingParams

from .helpers import chi2_pvalue, make_seq

V = 12


def rows_for(seqs, eos=None, extra=None):
    return SamplingRows.build(seqs, V, "cpu", eos, extra)


def test_uniform_is_keyed_and_batch_independent() -> None:
    seeds = torch.tensor([1, 2, 3, 2**62 + 5])
    pos = torch.tensor([0, 7, 7, 1000])
    u = uniform(seeds, pos, SAMPLE, 50)
    assert u.min() > 0 and u.max() < 1
    assert torch.equal(u[1:3], uniform(seeds[1:3], pos[1:3], SAMPLE, 50))  # rows do not see each other
    assert not torch.equal(u, uniform(seeds, pos, SAMPLE + 1, 50))  # streams differ
    big = uniform(torch.arange(64), torch.zeros(64, dtype=torch.long), SAMPLE, 1000)
    assert abs(big.mean().item() - 0.5) < 0.01 and abs(big.var().item() - 1 / 12) < 0.005
    assert abs(torch.corrcoef(torch.stack([big[:, :-1].flatten(), big[:, 1:].flatten()]))[0, 1]) < 0.01


def test_exponential_race_matches_distribution() -> None:
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04, 0.0])
    n = 20000
    draws = exponential_race(probs.expand(n, -1), torch.full((n,), 9), torch.arange(n), SAMPLE)
    assert chi2_pvalue(torch.bincount(draws, minlength=7), probs) > 1e-3


def test_greedy_is_argmax_with_penalties_applied() -> None:
    logits = torch.randn(3, V)
    seqs = [make_seq([1, 2], SamplingParams(temperature=0)) for _ in range(3)]
    out = Sampler().sample(logits, rows_for(seqs))
    assert torch.equal(out.token_ids, logits.argmax(-1))


def _reference_filter(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Straightforward one-row top-k, top-p, min-p (in that order) on temperature-scaled logits."""
    x = logits / p.temperature
    order = sorted(range(V), key=lambda i: -x[i].item())
    keep = set(order[: p.top_k] if p.top_k > 0 else order)
    probs = torch.softmax(torch.tensor([x[i] if i in keep else -math.inf for i in range(V)]), 0)
    if p.top_p < 1:
        total, kept = 0.0, set()
        for i in order:
            if i in keep and total < p.top_p:
                kept.add(i)
                total += probs[i].item()
        keep = kept
    probs = torch.softmax(torch.tensor([x[i] if i in keep else -math.inf for i in range(V)]), 0)
    if p.min_p > 0:
        keep = {i for i in keep if probs[i] >= p.min_p * probs.max()}
    return torch.softmax(torch.tensor([x[i] if i in keep else -math.inf for i in range(V)]), 0)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7, top_k=3),
    SamplingParams(temperature=1.3, top_p=0.6),
    SamplingParams(temperature=1.0, min_p=0.2),
    SamplingParams(temperature=0.9, top_k=5, top_p=0.8, min_p=0.05),
])
def test_filters_match_reference(params: SamplingParams) -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, V) * 2
    seqs = [make_seq([0], params) for _ in range(3)] + [make_seq([0], SamplingParams(temperature=1.0))]
    probs = Sampler().probs(logits, rows_for(seqs))
    for r in range(3):
        torch.testing.assert_close(probs[r], _reference_filter(logits[r], params), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(probs[3], logits[3].softmax(-1))  # an unfiltered row in the same batch


def test_penalties_match_reference() -> None:
    torch.manual_seed(1)
    params = SamplingParams(temperature=1.0, repetition_penalty=1.5, frequency_penalty=0.5, presence_penalty=0.3)
    seq = make_seq([1, 2, 3], params)
    seq.token_ids += [3, 4, 4]
    logits = torch.randn(1, V)
    got = Sampler().process(logits, rows_for([seq]))[0]
    want = logits[0].clone()
    for t in range(V):
        if t in seq.token_ids:
            want[t] = want[t] / 1.5 if want[t] > 0 else want[t] * 1.5
        count = seq.output_token_ids.count(t)
        want[t] -= 0.5 * count + 0.3 * (count > 0)
    torch.testing.assert_close(got, want)


def test_min_tokens_bans_eos_and_stop_ids_until_reached() -> None:
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=(5,))
    seq = make_seq([1], params)
    logits = torch.zeros(1, V)
    logits[0, 7] = 10.0  # eos
    logits[0, 5] = 9.0
    assert Sampler().sample(logits, rows_for([seq], eos=7)).token_ids.item() not in (5, 7)
    seq.token_ids += [0, 0]
    assert Sampler().sample(logits, rows_for([seq], eos=7)).token_ids.item() == 7


def test_seeded_draws_do_not_depend_on_the_batch() -> None:
    torch.manual_seed(2)
    logits = torch.randn(5, V)
    seqs = [make_seq([i], SamplingParams(temperature=1.0), seed=i) for i in range(5)]
    together = Sampler().sample(logits, rows_for(seqs)).token_ids
    for i in range(5):
        alone = Sampler().sample(logits[i:i + 1], rows_for([seqs[i]])).token_ids
        assert alone.item() == together[i].item()
    shuffled = [4, 0, 3, 1, 2]
    again = Sampler().sample(logits[shuffled], rows_for([seqs[i] for i in shuffled])).token_ids
    assert again.tolist() == together[shuffled].tolist()


def test_sampled_tokens_follow_the_processed_distribution() -> None:
    torch.manual_seed(3)
    logits = torch.randn(1, V)
    params = SamplingParams(temperature=0.8, top_k=6)
    seqs = [make_seq([0], params, seed=s) for s in range(4000)]
    rows = rows_for(seqs)
    out = Sampler().sample(logits.expand(4000, -1), rows).token_ids
    probs = Sampler().probs(logits, rows_for(seqs[:1]))[0]
    assert chi2_pvalue(torch.bincount(out, minlength=V), probs) > 1e-3


def test_logprobs_are_the_model_distribution() -> None:
    logits = torch.randn(2, V)
    seqs = [make_seq([0], SamplingParams(temperature=0, logprobs=3)), make_seq([0], SamplingParams(temperature=0))]
    out = Sampler().sample(logits, rows_for(seqs))
    ref = torch.log_softmax(logits, -1)
    torch.testing.assert_close(out.logprobs, ref.gather(-1, out.token_ids[:, None])[:, 0])
    torch.testing.assert_close(out.top_logprobs, ref.topk(3).values)


def test_rows_cache_matches_a_fresh_build() -> None:
    from tessera.serve.sampler import RowsCache

    cache = RowsCache()
    seqs = [make_seq([1, 2], SamplingParams(temperature=0.7, seed=3)),
            make_seq([4], SamplingParams(temperature=1.0, min_tokens=1, stop_token_ids=(2,)))]
    logits = torch.randn(2, V)
    for _ in range(3):
        cached, fresh = cache.get(seqs, V, "cpu", 7), rows_for(seqs, eos=7)
        assert torch.equal(cached.positions, fresh.positions)
        assert (cached.banned is None) == (fresh.banned is None)
        assert torch.equal(Sampler().sample(logits, cached).token_ids, Sampler().sample(logits, fresh).token_ids)
        for s in seqs:
            s.token_ids.append(5)


def test_upload_splits_one_copy_into_the_parts() -> None:
    a, empty, b = upload([[3, 1 << 62, -2], [], [True, False]], torch.int64, "cpu")
    assert a.tolist() == [3, 1 << 62, -2] and a.dtype == torch.int64
    assert empty.numel() == 0 and b.tolist() == [1, 0]
    (f,) = upload([[0.5, 2.0]], torch.float32, torch.device("cpu"))
    assert f.dtype == torch.float32 and f.tolist() == [0.5, 2.0]
