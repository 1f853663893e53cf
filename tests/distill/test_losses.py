"""Each loss against a naive reference written with torch ops and against closed-form values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.distill.losses import (
    HiddenStateMatcher,
    ce_loss,
    divergence,
    forward_kl,
    generalized_jsd,
    kd_loss,
    masked_mean,
    reverse_kl,
)
from tessera.distill.schedule import lr_at, temperature_at
from tessera.specs.distill import OptimizerConfig, TemperatureSchedule

F64 = torch.float64


def _naive_kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) for probability vectors, by the definition."""
    return (a * (a.log() - b.log())).sum(-1)


def _probs(logits: torch.Tensor, t: float) -> torch.Tensor:
    e = (logits / t).exp()
    return e / e.sum(-1, keepdim=True)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(2, 17), st.floats(0.5, 4.0), st.integers(0, 2**31 - 1))
def test_kls_match_definition(n: int, v: int, t: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    s, te = torch.randn(n, v, generator=g, dtype=F64) * 3, torch.randn(n, v, generator=g, dtype=F64) * 3
    p, q = _probs(te, t), _probs(s, t)
    torch.testing.assert_close(forward_kl(s, te, t), _naive_kl(p, q), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(reverse_kl(s, te, t), _naive_kl(q, p), rtol=1e-10, atol=1e-12)
    # torch's own KL: F.kl_div(input=log q, target=p) = KL(p || q)
    ref = F.kl_div(F.log_softmax(s / t, -1), F.log_softmax(te / t, -1), reduction="none", log_target=True).sum(-1)
    torch.testing.assert_close(forward_kl(s, te, t), ref, rtol=1e-10, atol=1e-12)


def test_kl_closed_form() -> None:
    teacher = torch.tensor([[0.0, math.log(3.0)]])  # p = (1/4, 3/4)
    student = torch.zeros(1, 2)                     # q = (1/2, 1/2)
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert forward_kl(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    expected_rev = 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0)
    assert reverse_kl(student, teacher).item() == pytest.approx(expected_rev, rel=1e-6)
    # temperature divides the logits: logits doubled at T=2 give the same distributions
    assert forward_kl(2 * student, 2 * teacher, 2.0).item() == pytest.approx(expected, rel=1e-6)


def test_t_squared_convention_tends_to_logit_matching() -> None:
    g = torch.Generator().manual_seed(0)
    s, te = torch.randn(3, 11, generator=g, dtype=F64), torch.randn(3, 11, generator=g, dtype=F64)
    d = s - te
    matching = ((d - d.mean(-1, keepdim=True)) ** 2).sum(-1).mean() / (2 * 11)
    for t, rel in ((50.0, 2e-2), (500.0, 2e-3)):
        assert kd_loss(s, te, temperature=t).item() == pytest.approx(matching.item(), rel=rel)
    # without the T^2 factor the divergence vanishes as 1/T^2
    assert divergence(s, te, "forward_kl", 500.0).mean().item() == pytest.approx(matching.item() / 500**2, rel=2e-3)


def _naive_jsd(s: torch.Tensor, te: torch.Tensor, beta: float, t: float) -> torch.Tensor:
    p, q = _probs(te, t), _probs(s, t)
    m = beta * p + (1 - beta) * q
    return (beta * _naive_kl(p, m) + (1 - beta) * _naive_kl(q, m)) / (beta * (1 - beta))


@settings(max_examples=25, deadline=None)
@given(st.floats(0.01, 0.99), st.floats(0.5, 3.0), st.integers(0, 2**31 - 1))
def test_jsd_matches_definition(beta: float, t: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    s, te = torch.randn(4, 9, generator=g, dtype=F64) * 2, torch.randn(4, 9, generator=g, dtype=F64) * 2
    torch.testing.assert_close(generalized_jsd(s, te, beta, t), _naive_jsd(s, te, beta, t),
                               rtol=1e-10, atol=1e-12)


def test_jsd_properties() -> None:
    g = torch.Generator().manual_seed(1)
    s, te = torch.randn(5, 13, generator=g, dtype=F64), torch.randn(5, 13, generator=g, dtype=F64)
    for beta in (0.0, 0.1, 0.5, 0.9, 1.0):
        assert generalized_jsd(s, s.clone(), beta).abs().max().item() < 1e-12
    torch.testing.assert_close(generalized_jsd(s, te, 0.0), forward_kl(s, te))
    torch.testing.assert_close(generalized_jsd(s, te, 1.0), reverse_kl(s, te))
    # continuity at the ends: the normalised family tends to the two KLs
    torch.testing.assert_close(generalized_jsd(s, te, 1e-4), forward_kl(s, te), rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(generalized_jsd(s, te, 1 - 1e-4), reverse_kl(s, te), rtol=1e-3, atol=1e-5)
    # beta = 1/2 is 4 x the Jensen-Shannon divergence; JS of two disjoint point masses is log 2
    big = 60.0
    a, b = torch.tensor([[big, 0.0]], dtype=F64), torch.tensor([[0.0, big]], dtype=F64)
    assert generalized_jsd(a, b, 0.5).item() == pytest.approx(4 * math.log(2.0), rel=1e-12)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(s, te, 1.5)


def test_masked_mean_is_per_token_not_per_sequence() -> None:
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    mask = torch.tensor([[True, True, False, False], [True, False, False, False]])
    assert masked_mean(values, mask).item() == pytest.approx((1 + 2 + 10) / 3)
    assert masked_mean(values, None).item() == pytest.approx(values.mean().item())
    with pytest.raises(ValueError, match="mask shape"):
        masked_mean(values, mask[:, :2])


def test_kd_loss_masks_and_scales() -> None:
    g = torch.Generator().manual_seed(2)
    s, te = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    mask = torch.rand(2, 5, generator=g) > 0.4
    t = 2.5
    ref = F.kl_div(F.log_softmax(s / t, -1), F.softmax(te / t, -1), reduction="none").sum(-1)
    expected = t * t * ref[mask].mean()
    assert kd_loss(s, te, mask, temperature=t).item() == pytest.approx(expected.item(), rel=1e-6)


def test_ce_matches_torch_and_ignores() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 6, 10, generator=g)
    labels = torch.randint(0, 10, (2, 6), generator=g)
    labels[0, 2] = -100
    ref = F.cross_entropy(logits.reshape(-1, 10), labels.reshape(-1), ignore_index=-100)
    assert ce_loss(logits, labels).item() == pytest.approx(ref.item(), rel=1e-6)
    uniform = torch.zeros(1, 3, 10)
    assert ce_loss(uniform, torch.tensor([[1, 2, 3]])).item() == pytest.approx(math.log(10), rel=1e-6)


def test_hidden_state_matcher() -> None:
    g = torch.Generator().manual_seed(4)
    m = HiddenStateMatcher(6, 8, [(0, 1), (1, 3)])
    student = {0: torch.randn(2, 3, 6, generator=g), 1: torch.randn(2, 3, 6, generator=g)}
    teacher = {1: torch.randn(2, 3, 8, generator=g), 3: torch.randn(2, 3, 8, generator=g)}
    mask = torch.tensor([[True, True, False], [True, False, True]])
    ref = torch.stack([((student[s] @ p.weight.T - teacher[t]) ** 2).mean(-1)[mask].mean()
                       for (s, t), p in zip(m.layer_map, m.proj)]).mean()
    assert m(student, teacher, mask).item() == pytest.approx(ref.item(), rel=1e-6)
    # a projection that reproduces the teacher exactly gives zero loss
    with torch.no_grad():
        for p in m.proj:
            p.weight.zero_()
            p.weight[:6, :6] = torch.eye(6)
    padded = {k: F.pad(v, (0, 2)) for k, v in student.items()}
    assert m(student, {1: padded[0], 3: padded[1]}).item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(KeyError, match="student 1"):
        m({0: student[0]}, teacher)


def test_temperature_schedules() -> None:
    const = TemperatureSchedule(kind="constant", start=2.0)
    lin = TemperatureSchedule(kind="linear", start=4.0, end=1.0)
    cos = TemperatureSchedule(kind="cosine", start=4.0, end=1.0)
    assert [temperature_at(const, s, 11) for s in (0, 5, 10)] == [2.0, 2.0, 2.0]
    assert [temperature_at(lin, s, 11) for s in (0, 5, 10)] == pytest.approx([4.0, 2.5, 1.0])
    assert [temperature_at(cos, s, 11) for s in (0, 5, 10)] == pytest.approx([4.0, 2.5, 1.0])
    assert temperature_at(cos, 2, 11) == pytest.approx(1.0 + 3.0 * 0.5 * (1 + math.cos(math.pi * 0.2)))
    assert temperature_at(cos, 2, 11) > temperature_at(lin, 2, 11)


def test_lr_schedule() -> None:
    opt = OptimizerConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_at(opt, s, 14) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_at(opt, 4, 14) == pytest.approx(1.0)
    assert lr_at(opt, 13, 14) == pytest.approx(0.1)
    assert lr_at(OptimizerConfig(lr=0.5, warmup_steps=0, schedule="constant"), 7, 10) == 0.5
