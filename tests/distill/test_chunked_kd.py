"""The chunked loss equals the naive full-logits loss (value and gradients) and holds far less memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tessera.distill.chunked_kd import ChunkedLossSpec, chunked_distill_loss
from tessera.distill.losses import ce_loss, kd_loss

from ._memory import cpu_peak_bytes


def _inputs(b: int, t: int, ds: int, dt: int, v: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(b, t, ds, generator=g, dtype=dtype, requires_grad=True)
    w_s = (torch.randn(v, ds, generator=g, dtype=dtype) * 0.3).requires_grad_()
    h_t = torch.randn(b, t, dt, generator=g, dtype=dtype)
    w_t = torch.randn(v, dt, generator=g, dtype=dtype) * 0.3
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, -2:] = -100
    mask = torch.rand(b, t, generator=g) > 0.2
    return h_s, w_s, h_t, w_t, labels, mask


def _naive(h_s, w_s, h_t, w_t, labels, mask, spec: ChunkedLossSpec) -> torch.Tensor:
    z_s, z_t = F.linear(h_s, w_s), F.linear(h_t, w_t)
    valid = mask & (labels != -100)
    loss = spec.kd_weight * kd_loss(z_s, z_t, valid, temperature=spec.temperature, kind=spec.kind, beta=spec.beta)
    return loss + spec.ce_weight * ce_loss(z_s, labels, valid)


@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_equals_naive(kind: str, beta: float, chunk: int) -> None:
    h_s, w_s, h_t, w_t, labels, mask = _inputs(2, 9, 6, 10, 23, seed=chunk)
    spec = ChunkedLossSpec(kd_weight=0.7, ce_weight=0.4, temperature=2.5, kind=kind, beta=beta, chunk_tokens=chunk)
    ref = _naive(h_s, w_s, h_t, w_t, labels, mask, spec)
    g_ref = torch.autograd.grad(ref, (h_s, w_s))
    loss, parts = chunked_distill_loss(h_s, w_s, labels, spec, h_t=h_t, w_t=w_t, mask=mask)
    g = torch.autograd.grad(loss * 3.0, (h_s, w_s))
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, 3.0 * b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(0.7 * parts["kd"] + 0.4 * parts["ce"], ref.detach(), rtol=1e-12, atol=1e-12)


def test_ce_only_needs_no_teacher_and_checks_inputs() -> None:
    h_s, w_s, _, _, labels, _ = _inputs(2, 5, 4, 4, 11, seed=0)
    spec = ChunkedLossSpec(kd_weight=0.0, ce_weight=1.0, chunk_tokens=3)
    loss, _ = chunked_distill_loss(h_s, w_s, labels, spec)
    torch.testing.assert_close(loss, ce_loss(F.linear(h_s, w_s), labels), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="teacher"):
        chunked_distill_loss(h_s, w_s, labels, ChunkedLossSpec(kd_weight=1.0))
    with pytest.raises(ValueError, match="labels"):
        chunked_distill_loss(h_s, w_s, labels[:, :2], spec)


def test_bf16_close_to_fp32() -> None:
    h_s, w_s, h_t, w_t, labels, mask = _inputs(2, 16, 32, 32, 64, seed=5, dtype=torch.float32)
    spec = ChunkedLossSpec(kd_weight=1.0, ce_weight=0.5, temperature=2.0, chunk_tokens=8)
    ref, _ = chunked_distill_loss(h_s, w_s, labels, spec, h_t=h_t, w_t=w_t, mask=mask)
    low, _ = chunked_distill_loss(h_s.bfloat16(), w_s.bfloat16(), labels, spec, h_t=h_t.bfloat16(),
                                  w_t=w_t.bfloat16(), mask=mask)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(ref.item(), rel=2e-2)
    # under autocast the matmuls run in bf16 and the gradients come back in the inputs' dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto, _ = chunked_distill_loss(h_s, w_s, labels, spec, h_t=h_t.bfloat16(), w_t=w_t.bfloat16(), mask=mask)
    g_auto = torch.autograd.grad(auto, (h_s, w_s))
    g_ref = torch.autograd.grad(ref, (h_s, w_s))
    assert auto.item() == pytest.approx(ref.item(), rel=2e-2)
    for a, b in zip(g_auto, g_ref):
        assert a.dtype == torch.float32
        assert (a - b).norm() <= 5e-2 * b.norm()


def test_peak_memory_below_naive() -> None:
    b, t, d, v = 2, 128, 32, 4096  # full logits: 2*128*4096*4 B = 4 MiB per tensor
    h_s, w_s, h_t, w_t, labels, mask = _inputs(b, t, d, d, v, seed=1, dtype=torch.float32)
    spec = ChunkedLossSpec(kd_weight=1.0, ce_weight=0.5, temperature=2.0, chunk_tokens=16)
    logits_bytes = b * t * v * 4

    def naive() -> None:
        _naive(h_s, w_s, h_t, w_t, labels, mask, spec).backward()

    def chunked() -> None:
        chunked_distill_loss(h_s, w_s, labels, spec, h_t=h_t, w_t=w_t, mask=mask)[0].backward()

    peak_naive, peak_chunked = cpu_peak_bytes(naive), cpu_peak_bytes(chunked)
    # the naive path holds several full [B, T, V] tensors at once; the chunked one none
    assert peak_naive > 3 * logits_bytes
    assert peak_chunked < logits_bytes
    assert peak_chunked < peak_naive / 8
