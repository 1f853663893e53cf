"""tessera.distill: knowledge distillation with a from-scratch ZeRO-3, sharded atomic checkpoints and the trainer.

    from tessera.distill import DistillTrainer
    DistillTrainer(DistillConfig(teacher="runs/teacher/final", student="student-6m")).fit()
"""

from tessera.distill.chunked_kd import ChunkedLossSpec, chunked_distill_loss
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
from tessera.distill.sharded_adam import ShardedAdam
from tessera.distill.sharded_checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from tessera.distill.strategy import Strategy, make_strategy
from tessera.distill.trainer import DistillTrainer, FitResult
from tessera.distill.zero3 import Zero3

__all__ = [
    "ChunkedLossSpec",
    "DistillTrainer",
    "FitResult",
    "HiddenStateMatcher",
    "ShardedAdam",
    "Strategy",
    "Zero3",
    "ce_loss",
    "chunked_distill_loss",
    "divergence",
    "forward_kl",
    "generalized_jsd",
    "kd_loss",
    "latest_checkpoint",
    "load_checkpoint",
    "make_strategy",
    "masked_mean",
    "reverse_kl",
    "save_checkpoint",
]
