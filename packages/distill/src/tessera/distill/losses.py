"""Distillation losses, each a per-token mean over unmasked positions (never scaled by sequence length).

Conventions (tested in tests/distill/test_losses.py):
- `p` is the teacher distribution softmax(z_t / T), `q` the student's softmax(z_s / T).
- `forward_kl` = KL(p || q) (mean-seeking), `reverse_kl` = KL(q || p) (mode-seeking).
- `generalized_jsd(beta)` = [beta KL(p || m) + (1 - beta) KL(q || m)] / (beta (1 - beta)) with
  m = beta p + (1 - beta) q. The 1 / (beta (1 - beta)) normalisation makes the family continuous in
  beta with the two KLs as its ends: beta -> 0 gives forward KL(p || q), beta -> 1 gives reverse
  KL(q || p) (both used exactly at beta = 0 and beta = 1). beta = 0.5 is 4x the Jensen-Shannon divergence.
- `kd_loss` multiplies the divergence by T^2 (Hinton et al., 2015): the gradient of KL at temperature T
  shrinks as 1/T^2, so the scaled term keeps its weight relative to hard-label CE as T changes. As
  T -> inf, T^2 KL(p || q) -> sum_i (d_i - mean(d))^2 / (2V) with d = z_s - z_t (logit matching).

All functions take logits `[..., V]`; half precision is computed (and returned) in float32, float32 and
float64 stay as they are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
IGNORE_INDEX = -100


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.log_softmax(_upcast(logits) / temperature, dim=-1)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(p_teacher || q_student) per position: `[..., V]` logits -> `[...]`."""
    log_q = _log_softmax(student_logits, temperature)
    log_p = _log_softmax(teacher_logits, temperature)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(q_student || p_teacher) per position: `[..., V]` logits -> `[...]`."""
    log_q = _log_softmax(student_logits, temperature)
    log_p = _log_softmax(teacher_logits, temperature)
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5,
                    temperature: float = 1.0) -> torch.Tensor:
    """Normalised generalized Jensen-Shannon divergence per position (see the module docstring).

    Raises ValueError when beta lies outside [0, 1].
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must lie in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, temperature)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, temperature)
    log_q = _log_softmax(student_logits, temperature)
    log_p = _log_softmax(teacher_logits, temperature)
    # log m computed in log space so that tiny probabilities do not underflow to log(0).
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1.0 - beta)]), dim=0)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
    return (beta * kl_pm + (1.0 - beta) * kl_qm) / (beta * (1.0 - beta))


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: Divergence,
               temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """The per-position divergence named by `kind` ("forward_kl", "reverse_kl", "jsd")."""
    if kind == "forward_kl":
        return forward_kl(student_logits, teacher_logits, temperature)
    if kind == "reverse_kl":
        return reverse_kl(student_logits, teacher_logits, temperature)
    if kind == "jsd":
        return generalized_jsd(student_logits, teacher_logits, beta, temperature)
    raise ValueError(f"divergence kind must be forward_kl, reverse_kl or jsd, got {kind!r}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of `values` over positions where `mask` is true (all positions when `mask` is None).

    Raises ValueError when the shapes differ. An all-false mask gives 0 (nothing to learn from).
    """
    if mask is None:
        return values.mean()
    if mask.shape != values.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != values shape {tuple(values.shape)}")
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None, *,
            temperature: float = 1.0, kind: Divergence = "forward_kl", beta: float = 0.5) -> torch.Tensor:
    """T^2 * divergence, averaged over unmasked positions. Logits `[..., V]`, mask `[...]` bool."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    per_token = divergence(student_logits, teacher_logits, kind, temperature, beta)
    return temperature ** 2 * masked_mean(per_token, mask)


def ce_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Hard-label cross-entropy averaged over positions whose label is not -100 (and `mask` is true)."""
    valid = labels != IGNORE_INDEX
    if mask is not None:
        valid = valid & mask
    per_token = F.cross_entropy(_upcast(logits).reshape(-1, logits.shape[-1]),
                                labels.reshape(-1).clamp_min(0), reduction="none").reshape(labels.shape)
    return masked_mean(per_token, valid)


class HiddenStateMatcher(nn.Module):
    """Matches student block outputs to teacher block outputs through learned projections.

    `layer_map` holds (student block, teacher block) pairs; each pair gets its own
    `nn.Linear(student_dim, teacher_dim, bias=False)`. The loss is, for each pair, the per-token mean
    over unmasked positions of the mean squared error over the teacher's feature dimension, then the
    mean over pairs.
    """

    def __init__(self, student_dim: int, teacher_dim: int, layer_map: Sequence[tuple[int, int]]) -> None:
        super().__init__()
        if not layer_map:
            raise ValueError("HiddenStateMatcher needs a non-empty layer_map")
        self.layer_map = tuple((int(s), int(t)) for s, t in layer_map)
        self.proj = nn.ModuleList(nn.Linear(student_dim, teacher_dim, bias=False) for _ in self.layer_map)
        for lin in self.proj:
            nn.init.normal_(lin.weight, std=student_dim ** -0.5)

    @property
    def student_layers(self) -> tuple[int, ...]:
        return tuple(s for s, _ in self.layer_map)

    @property
    def teacher_layers(self) -> tuple[int, ...]:
        return tuple(t for _, t in self.layer_map)

    def forward(self, student: dict[int, torch.Tensor], teacher: dict[int, torch.Tensor],
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """`student[i]` `[B, T, Ds]`, `teacher[j]` `[B, T, Dt]` for every pair; mask `[B, T]` -> scalar."""
        losses = []
        for (s, t), proj in zip(self.layer_map, self.proj):
            if s not in student or t not in teacher:
                raise KeyError(f"hidden-state pair (student {s}, teacher {t}) is missing from the collected blocks")
            diff = _upcast(proj(student[s])) - _upcast(teacher[t])
            losses.append(masked_mean(diff.pow(2).mean(-1), mask))
        return torch.stack(losses).mean()
