"""The module a training step calls: the student, its hidden-state projections, and the chunked loss.

Wrapping the whole loss in one module gives both sharding strategies a single root whose forward covers
every use of the student's embeddings, final norm and head (tied or not)."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from tessera.distill.chunked_kd import ChunkedLossSpec, chunked_distill_loss
from tessera.distill.losses import HiddenStateMatcher
from tessera.model.transformer import Transformer
from tessera.specs.distill import LossConfig


class DistillObjective(nn.Module):
    """`forward(input_ids, labels, temperature, teacher=...) -> (loss, parts)`.

    `teacher` is `(h_t [B, T, Dt], w_t [V, Dt], blocks {j: [B, T, Dt]})` from the teacher's
    `hidden_states` and `lm_head.weight`, or None for CE-only training. `parts` holds detached float
    tensors "kd", "ce" and "hidden" (each before its weight).
    """

    def __init__(self, student: Transformer, loss: LossConfig, teacher_dim: int | None = None) -> None:
        super().__init__()
        self.student = student
        self.loss_cfg = loss
        self.matcher = (HiddenStateMatcher(student.config.d_model, teacher_dim, loss.layer_map)
                        if loss.hidden_weight > 0 and teacher_dim is not None else None)
        self.spec = ChunkedLossSpec(kd_weight=loss.kd_weight, ce_weight=loss.ce_weight, kind=loss.divergence,
                                    beta=loss.jsd_beta, chunk_tokens=loss.chunk_tokens)

    @property
    def student_layers(self) -> tuple[int, ...]:
        return self.matcher.student_layers if self.matcher is not None else ()

    @property
    def teacher_layers(self) -> tuple[int, ...]:
        return self.matcher.teacher_layers if self.matcher is not None else ()

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, temperature: float,
                teacher: tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]] | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if (self.spec.kd_weight > 0 or self.matcher is not None) and teacher is None:
            raise ValueError("this objective distills (kd_weight or hidden_weight > 0) and needs teacher outputs")
        h, blocks = self.student.hidden_states(input_ids, collect=self.student_layers)
        h_t, w_t, blocks_t = teacher if teacher is not None else (None, None, {})
        spec = replace(self.spec, temperature=temperature)
        loss, parts = chunked_distill_loss(h, self.student.lm_head.weight, labels, spec, h_t=h_t, w_t=w_t)
        parts["hidden"] = torch.zeros((), device=loss.device)
        if self.matcher is not None:
            hidden = self.matcher(blocks, blocks_t)
            loss = loss + self.loss_cfg.hidden_weight * hidden
            parts["hidden"] = hidden.detach().float()
        return loss, parts
