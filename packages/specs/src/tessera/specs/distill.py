"""`DistillConfig`: a teacher, a student, the losses, the optimizer, the data, the parallel strategy."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

from tessera.specs.base import Spec
from tessera.specs.model_config import ModelConfig


class _V1(Spec):
    SCHEMA_VERSION: ClassVar[int] = 1
    schema_version: Literal[1] = 1


class TemperatureSchedule(_V1):
    """Temperature over training: constant at `start`, or linear/cosine from `start` to `end`."""

    kind: Literal["constant", "linear", "cosine"] = "constant"
    start: PositiveFloat = 2.0
    end: PositiveFloat | None = None


class LossConfig(_V1):
    """Weights of the loss terms. The KD term is multiplied by T^2 (Hinton et al.) so its gradient
    scale does not shrink as the temperature grows."""

    kd_weight: NonNegativeFloat = 1.0
    ce_weight: NonNegativeFloat = 0.0
    hidden_weight: NonNegativeFloat = 0.0
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    jsd_beta: float = Field(default=0.5, ge=0.0, le=1.0)
    layer_map: tuple[tuple[NonNegativeInt, NonNegativeInt], ...] = Field(
        default=(), description="(student layer, teacher layer) pairs for hidden-state matching")
    chunk_tokens: PositiveInt = 1024

    @model_validator(mode="after")
    def _check(self) -> LossConfig:
        if self.kd_weight + self.ce_weight + self.hidden_weight == 0:
            raise ValueError("at least one of kd_weight, ce_weight, hidden_weight must be positive")
        if self.hidden_weight > 0 and not self.layer_map:
            raise ValueError("hidden_weight > 0 needs a layer_map")
        return self


class OptimizerConfig(_V1):
    name: Literal["adamw", "adam"] = "adamw"
    lr: PositiveFloat = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: PositiveFloat = 1e-8
    weight_decay: NonNegativeFloat = 0.1
    warmup_steps: NonNegativeInt = 100
    schedule: Literal["constant", "cosine"] = "cosine"
    min_lr_ratio: float = Field(default=0.1, ge=0.0, le=1.0)
    grad_clip: NonNegativeFloat = 1.0


class DataConfig(_V1):
    """Text files (empty: the built-in corpus), tokenized, packed into `seq_len` windows."""

    paths: tuple[str, ...] = ()
    tokenizer: str | None = Field(default=None, description="tokenizer.json; None trains one")
    vocab_size: PositiveInt = 8192
    seq_len: PositiveInt = 256
    batch_size: PositiveInt = 16
    grad_accum: PositiveInt = 1
    seed: int = 0


class ParallelConfig(_V1):
    strategy: Literal["none", "zero3", "fsdp2"] = "none"
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    prefetch: bool = True


class CheckpointConfig(_V1):
    dir: str | None = None
    every_steps: PositiveInt = 500
    keep_last: PositiveInt = 2
    resume: bool = True


class DistillConfig(_V1):
    """`teacher`: a checkpoint directory (or None to pretrain `student` with CE only).
    `student`: a preset name or a full ModelConfig."""

    teacher: str | None = None
    student: str | ModelConfig = "student-6m"
    temperature: TemperatureSchedule = TemperatureSchedule()
    loss: LossConfig = LossConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    data: DataConfig = DataConfig()
    parallel: ParallelConfig = ParallelConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    steps: PositiveInt = 1000
    log_every: PositiveInt = 10
    output_dir: str = "runs/distill"
    device: str = "auto"
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> DistillConfig:
        if self.teacher is None and (self.loss.kd_weight > 0 or self.loss.hidden_weight > 0):
            raise ValueError("loss.kd_weight and loss.hidden_weight need a teacher; set teacher or use ce only")
        if isinstance(self.student, str) and self.student not in ModelConfig.presets():
            raise ValueError(f"student preset {self.student!r} is unknown; known: {ModelConfig.presets()}")
        return self

    def student_config(self) -> ModelConfig:
        return ModelConfig.preset(self.student) if isinstance(self.student, str) else self.student
