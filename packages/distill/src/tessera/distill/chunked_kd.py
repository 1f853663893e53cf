"""The distillation loss computed in token chunks, never materialising full-vocabulary logits for the
whole batch.

The student's logits for a chunk of `chunk_tokens` positions are formed from its final hidden state and
`lm_head` weight, the teacher's likewise, and the chunk's loss and its gradient with respect to those
logits are computed at once; the gradient is folded straight into the hidden-state and weight gradients.
Peak memory is then O(chunk_tokens x V) instead of O(B T V) (measured in tests/distill/test_chunked_kd.py
and benchmarks/bench_distill.py), at the price of computing the logit gradients during the forward pass.
The result equals `kd_weight * kd_loss(...) + ce_weight * ce_loss(...)` on full logits, gradients included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tessera.distill.losses import IGNORE_INDEX, Divergence, divergence


@dataclass(frozen=True)
class ChunkedLossSpec:
    """What to compute: `kd_weight * T^2 * divergence + ce_weight * CE`, each a per-token mean."""

    kd_weight: float = 1.0
    ce_weight: float = 0.0
    temperature: float = 1.0
    kind: Divergence = "forward_kl"
    beta: float = 0.5
    chunk_tokens: int = 1024


class _ChunkedLMLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s: torch.Tensor, w_s: torch.Tensor, h_t: torch.Tensor | None, w_t: torch.Tensor | None,
                labels: torch.Tensor, rows: torch.Tensor, spec: ChunkedLossSpec,
                parts: dict[str, torch.Tensor]) -> torch.Tensor:
        want_grad = h_s.requires_grad or w_s.requires_grad
        n = max(int(rows.numel()), 1)
        acc = torch.float64 if h_s.dtype == torch.float64 else torch.float32
        dev = h_s.device.type
        # Under autocast the matmuls run in its dtype; the casts are explicit so that the gradients come back
        # in the inputs' own dtypes.
        compute = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h_s.dtype
        with torch.autocast(dev, enabled=False):
            return _ChunkedLMLoss._run(ctx, h_s, w_s, h_t, w_t, labels, rows, spec, parts, want_grad, n, acc,
                                       compute)

    @staticmethod
    def _run(ctx, h_s, w_s, h_t, w_t, labels, rows, spec, parts, want_grad, n, acc, compute) -> torch.Tensor:
        w_c = w_s.to(compute)
        w_tc = w_t.to(compute) if w_t is not None else None
        grad_h = torch.zeros_like(h_s) if want_grad else None
        grad_w = torch.zeros(w_s.shape, dtype=acc, device=w_s.device) if want_grad else None
        kd_sum = torch.zeros((), dtype=acc, device=h_s.device)
        ce_sum = torch.zeros((), dtype=acc, device=h_s.device)
        t2 = spec.temperature ** 2
        for chunk in rows.split(spec.chunk_tokens):
            hs = h_s.index_select(0, chunk).to(compute)
            z_s = F.linear(hs, w_c).to(acc).requires_grad_(want_grad)
            with torch.enable_grad() if want_grad else torch.no_grad():
                objective = torch.zeros((), dtype=acc, device=h_s.device)
                if spec.kd_weight > 0:
                    z_t = F.linear(h_t.index_select(0, chunk).to(compute), w_tc)
                    kd = divergence(z_s, z_t, spec.kind, spec.temperature, spec.beta).sum()
                    objective = objective + spec.kd_weight * t2 * kd
                    kd_sum += kd.detach()
                if spec.ce_weight > 0:
                    ce = F.cross_entropy(z_s, labels.index_select(0, chunk), reduction="sum")
                    objective = objective + spec.ce_weight * ce
                    ce_sum += ce.detach()
                objective = objective / n
            if want_grad:
                (dz,) = torch.autograd.grad(objective, z_s)
                dz = dz.to(compute)
                grad_h.index_copy_(0, chunk, (dz @ w_c).to(grad_h.dtype))
                grad_w += (dz.t() @ hs).to(acc)
        ctx.save_for_backward(*(t for t in (grad_h, grad_w) if t is not None))
        ctx.w_dtype = w_s.dtype
        parts["kd"] = t2 * kd_sum / n
        parts["ce"] = ce_sum / n
        return spec.kd_weight * parts["kd"] + spec.ce_weight * parts["ce"]

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_out.to(grad_h.dtype), (grad_w * grad_out).to(ctx.w_dtype),
                None, None, None, None, None, None)


def chunked_distill_loss(h_s: torch.Tensor, w_s: torch.Tensor, labels: torch.Tensor, spec: ChunkedLossSpec, *,
                         h_t: torch.Tensor | None = None, w_t: torch.Tensor | None = None,
                         mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss (scalar float32; float64 for float64 inputs), differentiable in `h_s` and `w_s`, and its
    detached parts {"kd", "ce"}.

    Shapes: `h_s` `[B, T, Ds]` student final hidden, `w_s` `[V, Ds]` student lm_head weight, `labels`
    `[B, T]` int64 (-100 = ignore), `mask` `[B, T]` bool (None = all). The teacher's `h_t` `[B, T, Dt]`
    and `w_t` `[V, Dt]` are needed when `spec.kd_weight > 0` (they get no gradient). Positions count
    when their mask is true and their label is not -100; every term is a mean over those positions.
    Raises ValueError on mismatched shapes or a missing teacher.
    """
    if h_s.dim() != 3 or labels.shape != h_s.shape[:2]:
        raise ValueError(f"h_s must be [B, T, D] with labels [B, T]; got {tuple(h_s.shape)} and {tuple(labels.shape)}")
    if spec.kd_weight > 0:
        if h_t is None or w_t is None:
            raise ValueError("kd_weight > 0 needs the teacher's hidden states h_t and lm_head weight w_t")
        if h_t.shape[:2] != h_s.shape[:2] or w_t.shape[0] != w_s.shape[0]:
            raise ValueError(f"teacher h_t {tuple(h_t.shape)} / w_t {tuple(w_t.shape)} do not match student "
                             f"h_s {tuple(h_s.shape)} / w_s {tuple(w_s.shape)}")
    valid = labels != IGNORE_INDEX
    if mask is not None:
        valid = valid & mask
    rows = valid.reshape(-1).nonzero().squeeze(1)
    flat_t = h_t.reshape(-1, h_t.shape[-1]).detach() if h_t is not None else None
    parts: dict[str, torch.Tensor] = {}
    loss = _ChunkedLMLoss.apply(h_s.reshape(-1, h_s.shape[-1]), w_s, flat_t,
                                w_t.detach() if w_t is not None else None, labels.reshape(-1), rows, spec, parts)
    return loss, parts
