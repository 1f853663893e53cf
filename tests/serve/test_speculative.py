"""Speculative decoding: the rejection rule reproduces the target distribution (and a wrong rule is
caught by the same test), target-as-own-draft accepts everything, speculative greedy == plain greedy."""

from __future__ import annotations

import pytest
import torch

from tessera.serve.sampler import ACCEPT, RESIDUAL, exponential_race, uniform
from tessera.serve.speculative import NgramProposer, greedy_verdicts, verify
from tessera.specs import SamplingParams, SpeculativeConfig

from .conftest import engine, run
from .helpers import chi2_pvalue, counting
from .test_engine import GREEDY, prompts

V, K, N = 6, 3, 20000


def scenario(seed: int = 0):
    """Fixed target p_i and draft q_i per position (history-independent), and drafts drawn from q."""
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(K + 1, V, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(K, V, generator=g) * 1.5, -1)
    draft = torch.stack([torch.multinomial(q[i], N, replacement=True, generator=g) for i in range(K)], 1)
    seeds = torch.arange(N, dtype=torch.int64) + 1000 * seed
    return p.expand(N, -1, -1), q.expand(N, -1, -1), draft, torch.full((N,), K), seeds, torch.zeros(N, dtype=torch.long)


def fidelity(rule) -> float:
    """Smallest chi-square p-value of the emitted tokens at positions 0 and 1 against p_0 and p_1."""
    p, q, draft, num, seeds, pos = scenario()
    tokens, accepted = rule(p, q, draft, num, seeds, pos)
    first = torch.bincount(tokens[:, 0], minlength=V)
    second = torch.bincount(tokens[accepted >= 1, 1], minlength=V)  # given token 0 was accepted
    return min(chi2_pvalue(first, p[0, 0]), chi2_pvalue(second, p[0, 1]))


def resample_from_target(p, q, draft, num, seeds, pos):
    """A plausible-looking but wrong rule: on rejection, draw from p instead of norm(max(0, p - q))."""
    n, k = draft.shape
    steps = torch.arange(k)
    u = uniform(seeds.repeat_interleave(k), (pos[:, None] + steps).reshape(-1), ACCEPT).view(n, k)
    ok = u * q.gather(-1, draft[..., None])[..., 0] <= p[:, :k].gather(-1, draft[..., None])[..., 0]
    accepted = ok.int().cumprod(-1).sum(-1)
    last = exponential_race(p[torch.arange(n), accepted], seeds, pos + accepted, RESIDUAL)
    tokens = torch.cat([draft, torch.zeros(n, 1, dtype=torch.long)], 1)
    tokens[torch.arange(n), accepted] = last
    return tokens, accepted


def accept_by_inverse_ratio(p, q, draft, num, seeds, pos):
    """Another wrong rule: accept with min(1, q/p) (p and q swapped)."""
    return verify(q_pad(q), p[:, :-1], draft, num, seeds, pos)


def q_pad(q):
    return torch.cat([q, q[:, -1:]], 1)


def test_verify_keeps_the_target_distribution() -> None:
    assert fidelity(verify) > 1e-3


@pytest.mark.parametrize("wrong", [resample_from_target, accept_by_inverse_ratio])
def test_the_same_test_catches_a_wrong_rule(wrong) -> None:
    assert fidelity(wrong) < 1e-6


def test_greedy_verification_is_argmax_matching() -> None:
    p = torch.nn.functional.one_hot(torch.tensor([[2, 4, 1, 5]]), V).float()
    q = torch.nn.functional.one_hot(torch.tensor([[2, 4, 3]]), V).float()
    tokens, accepted = verify(p, q, torch.tensor([[2, 4, 3]]), torch.tensor([3]), torch.tensor([1]), torch.tensor([0]))
    assert accepted.item() == 2 and tokens[0, :3].tolist() == [2, 4, 1]


def test_host_greedy_verdicts_equal_the_general_rule() -> None:
    """The engine's greedy rounds compare token ids on the host (`greedy_verdicts`); they must emit what
    `verify` emits on the one-hot distributions, with draft lists of every length from 0 to k."""
    gen = torch.Generator().manual_seed(4)
    b, k = 64, 4
    target = torch.randint(0, V, (b, k + 1), generator=gen)
    other = torch.randint(0, V, (b, k), generator=gen)
    draft = torch.where(torch.rand(b, k, generator=gen) < 0.7, target[:, :k], other)
    num_draft = torch.randint(0, k + 1, (b,), generator=gen)
    p, q = torch.nn.functional.one_hot(target, V).float(), torch.nn.functional.one_hot(draft, V).float()
    tokens, accepted = verify(p, q, draft, num_draft, torch.randint(0, 2**31, (b,), generator=gen),
                              torch.randint(0, 500, (b,), generator=gen))
    drafts = [draft[i, :n].tolist() for i, n in enumerate(num_draft.tolist())]
    rows = [t for i, n in enumerate(num_draft.tolist()) for t in target[i, :n + 1].tolist()]  # k_i + 1 rows each
    emitted, got = greedy_verdicts(rows, drafts)
    assert got == accepted.tolist() and len(set(got)) > 2
    assert emitted == [tokens[i, :n + 1].tolist() for i, n in enumerate(got)]


def test_ngram_lookup() -> None:
    prop = NgramProposer(V, 1, 3, torch.device("cpu"))
    assert prop.lookup([1, 2, 3, 9, 1, 2, 3], 3) == [9, 1, 2]  # the 3-gram match wins
    assert prop.lookup([5, 1, 7, 4, 2, 8, 1], 2) == [7, 4]  # falls back to the latest 1-gram
    assert prop.lookup([1, 2, 3], 2) == []


def _naive_lookup(tokens: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    for n in range(min(n_max, len(tokens) - 1), n_min - 1, -1):
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == tokens[len(tokens) - n:]:
                return tokens[start + n:start + n + k]
    return []


def test_ngram_lookup_equals_a_plain_scan() -> None:
    """The byte search finds what a token-by-token scan finds: small alphabets (many matches), ids whose
    bytes repeat across token boundaries (256 = 00 01 00 00, 1 = 01 00 00 00), large ids, short contexts."""
    gen = torch.Generator().manual_seed(5)
    alphabets = [[0, 1, 2], [1, 256, 65536, 16777216, 257], [0, 151935, 2**31 - 1, 7], list(range(40))]
    cases = 0
    for alphabet in alphabets:
        for _ in range(300):
            size = int(torch.randint(1, 60, (1,), generator=gen))
            tokens = [alphabet[i] for i in torch.randint(0, len(alphabet), (size,), generator=gen).tolist()]
            n_min = int(torch.randint(1, 3, (1,), generator=gen))
            n_max = n_min + int(torch.randint(0, 4, (1,), generator=gen))
            k = int(torch.randint(0, 6, (1,), generator=gen))
            want = _naive_lookup(tokens, k, n_min, n_max)
            assert NgramProposer(V, n_min, n_max, torch.device("cpu")).lookup(tokens, k) == want, (tokens, k)
            cases += bool(want)
    assert cases > 500  # most cases found a match to compare


def test_target_as_own_draft_accepts_everything(model) -> None:
    spec = SpeculativeConfig(method="draft", draft_model="self", num_speculative_tokens=4)
    outs = run(engine(model, speculative=spec, draft_model=model), prompts(4, seed=3), GREEDY)
    for o in outs:
        assert o.metrics.spec_draft_tokens > 0 and o.metrics.acceptance_rate == 1.0


@pytest.mark.parametrize("method", ["draft", "ngram"])
def test_speculative_greedy_equals_plain_greedy(model, draft, method) -> None:
    ps = prompts(5, seed=4)
    ps[0] = ps[0] * 3  # repetition for the n-gram proposer to find
    plain = run(engine(model), ps, GREEDY)
    spec = SpeculativeConfig(method=method, draft_model="d" if method == "draft" else None, num_speculative_tokens=3)
    eng = engine(model, speculative=spec, draft_model=draft if method == "draft" else None)
    fast = run(eng, ps, GREEDY)
    for a, b in zip(plain, fast):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert sum(o.metrics.spec_draft_tokens for o in fast) > 0
    assert eng.bm.num_free_blocks == eng.num_blocks


def test_greedy_draft_rounds_go_through_the_chain(model, draft) -> None:
    """Plain greedy rounds run the draft chain (one wait a round); the output equals plain greedy, and
    the drafts and acceptances equal those of the round-by-round path. Requests of different lengths,
    max_tokens (so lookaheads shrink near the end) and arrival times (steps with prefills take the
    general path) share the batch."""
    ps = prompts(7, seed=31)
    ps[1] = ps[1] * 4
    sp = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (12, 3, 7, 1, 9, 12, 5)]
    plain = run(engine(model), ps, sp)
    spec = SpeculativeConfig(method="draft", draft_model="d", num_speculative_tokens=4)
    results = []
    for chained in (True, False):
        eng = engine(model, speculative=spec, draft_model=draft, max_num_batched_tokens=24)
        eng.chain_rounds = chained
        calls = counting(eng.proposer.runner.chain, "run")
        outs = run(eng, ps[:4], sp[:4]) + run(eng, ps[4:], sp[4:])
        assert (calls[0] > 0) == chained
        assert eng.bm.num_free_blocks == eng.num_blocks
        results.append([(o.outputs[0].token_ids, o.metrics.spec_draft_tokens, o.metrics.spec_accepted_tokens)
                        for o in outs])
    assert [r[0] for r in results[0]] == [o.outputs[0].token_ids for o in plain]
    assert results[0] == results[1]
    assert sum(r[1] for r in results[0]) > 0


def test_chain_rounds_under_preemption_and_prefix_caching(model, draft) -> None:
    """Tight memory forces preemption (recomputed sequences re-enter with their draft cache rebuilt) and
    shared prompt prefixes hit the prefix cache: chain rounds still equal plain greedy, every block
    comes back, and the block manager's invariants hold."""
    ps = prompts(8, seed=34, lo=6, hi=14)
    ps[1] = ps[0][:8] + ps[1]  # a shared prefix for the prefix cache
    plain = run(engine(model), ps, GREEDY)
    spec = SpeculativeConfig(method="draft", draft_model="d", num_speculative_tokens=3)
    tight = engine(model, speculative=spec, draft_model=draft, num_blocks=16, max_num_seqs=8)
    calls = counting(tight.proposer.runner.chain, "run")
    outs = run(tight, ps, GREEDY)
    assert tight.scheduler.num_preemptions > 0 and calls[0] > 0
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in plain]
    assert tight.bm.num_free_blocks == tight.num_blocks
    tight.bm.check()


def test_the_chain_is_skipped_when_logits_are_processed(model, draft) -> None:
    """Penalties, logprobs, a min_tokens ban and sampling all need the general path."""
    spec = SpeculativeConfig(method="draft", draft_model="d", num_speculative_tokens=3)
    ps = prompts(2, seed=32)
    for sp in (SamplingParams(temperature=0, max_tokens=6, repetition_penalty=1.2),
               SamplingParams(temperature=0, max_tokens=6, logprobs=1),
               SamplingParams(temperature=0, max_tokens=6, min_tokens=6),
               SamplingParams(temperature=0.8, max_tokens=6, seed=1)):
        eng = engine(model, speculative=spec, draft_model=draft)
        calls = counting(eng.proposer.runner.chain, "run")
        run(eng, ps, sp)
        assert calls[0] == 0, sp


def test_draft_chain_falls_back_past_its_batch(model, draft) -> None:
    """More decoding sequences than the chain's largest batch: the round takes the general path."""
    spec = SpeculativeConfig(method="draft", draft_model="d", num_speculative_tokens=2)
    eng = engine(model, speculative=spec, draft_model=draft, num_blocks=256, cuda_graph_batch_sizes=(2,))
    chain = eng.proposer.runner.chain
    assert chain.max_batch_size == 2
    sizes = []
    inner = chain.run
    chain.run = lambda catch_up, *a: sizes.append(len(catch_up)) or inner(catch_up, *a)
    general = counting(eng.proposer, "propose")
    ps = prompts(5, seed=33)
    outs = run(eng, ps, GREEDY)
    assert general[0] > 0 and max(sizes, default=0) <= 2
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in run(engine(model), ps, GREEDY)]


def test_speculative_stops_at_eos_inside_a_round(model) -> None:
    p = prompts(1, seed=8)[0]
    plain = run(engine(model), [p], GREEDY)[0].outputs[0].token_ids
    stop = plain[5]
    spec = SpeculativeConfig(method="draft", draft_model="self", num_speculative_tokens=4)
    sp = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=(stop,))
    out = run(engine(model, speculative=spec, draft_model=model), [p], sp)[0].outputs[0]
    assert out.token_ids == plain[: plain.index(stop) + 1] and out.finish_reason == "stop"


def test_sampled_speculative_matches_target_distribution(model, draft) -> None:
    """The second generated token (the first one that goes through verification) against its exact
    marginal computed from the target alone: sum over t1 of p(t1) p(t2 | t1)."""
    prompt = [3, 1, 4, 1, 5]
    sp = [SamplingParams(temperature=1.0, max_tokens=2, seed=s, ignore_eos=True) for s in range(1500)]
    spec = SpeculativeConfig(method="draft", draft_model="d", num_speculative_tokens=2)
    eng = engine(model, speculative=spec, draft_model=draft, num_blocks=1500 * 2, max_num_seqs=256,
                 max_num_batched_tokens=2048)
    outs = run(eng, [prompt] * len(sp), sp)
    second = torch.tensor([o.outputs[0].token_ids[1] for o in outs])
    with torch.no_grad():
        p1 = model(torch.tensor([prompt]))[0, -1].float().softmax(-1)
        vocab = p1.shape[0]
        batch = torch.tensor([[*prompt, t] for t in range(vocab)])
        p2 = model(batch)[:, -1].float().softmax(-1)
    marginal = (p1[:, None] * p2).sum(0)
    assert sum(o.metrics.spec_draft_tokens for o in outs) > 0
    assert chi2_pvalue(torch.bincount(second, minlength=vocab), marginal) > 1e-3


def test_speculative_logprobs_and_penalties_match_plain_decoding(model, draft) -> None:
    ps = prompts(3, seed=13)
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2, repetition_penalty=1.3,
                        frequency_penalty=0.4)
    plain = run(engine(model), ps, sp)
    spec = SpeculativeConfig(method="draft", draft_model="d", num_speculative_tokens=3)
    fast = run(engine(model, speculative=spec, draft_model=draft), ps, sp)
    for a, b in zip(plain, fast):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert x.token_id == y.token_id and x.logprob == pytest.approx(y.logprob, abs=1e-4)
            assert x.top.keys() == y.top.keys()
