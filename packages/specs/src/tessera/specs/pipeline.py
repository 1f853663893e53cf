"""`PipelineConfig`: the whole job in one file - pretrain a teacher, distill a student from it, quantize the
student, serve the teacher with the student as speculative draft, and answer over HTTP.

Each stage is the spec of its own command (`tessera train`, `tessera distill`, `tessera quantize`,
`tessera serve`), so any stage can be rerun alone from the resolved config the pipeline writes beside its
output. The pipeline owns what ties the stages together, and fills it in when it resolves a stage: the text
(`data`), the `device`, every output folder, the teacher path of the student stage, and the model and draft
of the engine. Those fields must be left at their defaults inside the stages.

`PipelineConfig()` is the default demo (`configs/demo.yaml`); `PipelineConfig.preset(name)` gives the
other scales: `tiny` (seconds; for tests), `small` (the default, minutes on two CPU cores), `real` (the
distillation figures' model pair, for a GPU).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, PositiveInt, model_validator

from tessera.specs.base import Spec
from tessera.specs.distill import DataConfig, DistillConfig
from tessera.specs.engine import EngineConfig, SpeculativeConfig
from tessera.specs.quant import AnyQuantConfig, Int8Config

TEACHER_STAGE = "stage:teacher"
"""`student.teacher` value meaning "the checkpoint the teacher stage writes"."""

DEFAULT_PROMPTS = (
    "Return the number of items in",
    "This module provides",
    "Raise ValueError if",
    "The default value is",
)


class _V1(Spec):
    SCHEMA_VERSION: ClassVar[int] = 1
    schema_version: Literal[1] = 1


class ServeStage(_V1):
    """How the teacher is served. `draft` picks the speculative draft: the distilled student, its quantized
    copy, or none. The demo generates `max_tokens` greedy tokens for each prompt, with and without the draft."""

    engine: EngineConfig = EngineConfig(max_num_seqs=16, max_num_batched_tokens=2048,
                                        kv_cache_bytes=64 * 2**20)
    draft: Literal["student", "quantized", "none"] = "student"
    num_speculative_tokens: int = Field(default=4, ge=1, le=16)
    prompts: tuple[str, ...] = Field(default=DEFAULT_PROMPTS, min_length=1)
    max_tokens: PositiveInt = 48


class GatewayStage(_V1):
    """Where the HTTP gateway listens; `port=0` picks a free port. Loopback by default: the demo answers its
    own requests and exposes nothing."""

    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)


class EvalStage(_V1):
    """Perplexity on held-out text of the same corpus: every `heldout_every`-th document is kept out of
    training; the held-out text is tokenized once and scored in windows of `window` tokens (context reset at
    each window), at most `max_tokens` tokens (None: all)."""

    heldout_every: int = Field(default=20, ge=2)
    window: PositiveInt = 128
    max_tokens: PositiveInt | None = 60_000


def _teacher_default() -> DistillConfig:
    return DistillConfig.model_validate(PIPELINE_PRESETS["small"]["teacher"])


def _student_default() -> DistillConfig:
    return DistillConfig.model_validate(PIPELINE_PRESETS["small"]["student"])


# Stage fields the pipeline fills in, with the defaults they must keep inside a stage.
_OWNED = {"data.paths": DataConfig.model_fields["paths"].default,
          "output_dir": DistillConfig.model_fields["output_dir"].default,
          "device": DistillConfig.model_fields["device"].default}


class PipelineConfig(Spec):
    """The demo pipeline. `data`: text files (empty: the built-in corpus, the standard library's docstrings),
    at most `max_chars` characters read. `teacher`: the pretraining stage (cross-entropy only), or None to
    distill from the existing checkpoint named by `student.teacher`. Outputs go under `output_dir`. `threads` bounds
    torch's CPU threads: on a busy machine, threads that wait on each other's time slices make small matmuls
    far slower than fewer threads would."""

    SCHEMA_VERSION: ClassVar[int] = 1
    schema_version: Literal[1] = 1
    data: tuple[str, ...] = ()
    max_chars: PositiveInt | None = 2_000_000
    output_dir: str = "runs/demo"
    device: str = "auto"
    threads: PositiveInt | None = Field(default=None, description="CPU threads for torch; None: fewer than the "
                                        "cores only when other work keeps them busy (by the 1-minute load average)")
    teacher: DistillConfig | None = Field(default_factory=_teacher_default)
    student: DistillConfig = Field(default_factory=_student_default)
    quant: AnyQuantConfig = Int8Config()
    eval: EvalStage = EvalStage()
    serve: ServeStage = ServeStage()
    gateway: GatewayStage = GatewayStage()

    @model_validator(mode="after")
    def _check(self) -> PipelineConfig:
        stages = {"student": self.student} if self.teacher is None else {"teacher": self.teacher,
                                                                         "student": self.student}
        for name, stage in stages.items():
            values = {"data.paths": stage.data.paths, "output_dir": stage.output_dir, "device": stage.device}
            for field, value in values.items():
                if value != _OWNED[field]:
                    raise ValueError(f"{name}.{field} is set by the pipeline (from `data`, `output_dir`, `device`); "
                                     f"leave it out, got {value!r}")
        if self.teacher is not None:
            if self.teacher.teacher is not None:
                raise ValueError(f"teacher.teacher must be empty (the teacher stage pretrains with cross-entropy), "
                                 f"got {self.teacher.teacher!r}")
            if self.student.teacher != TEACHER_STAGE:
                raise ValueError(f"student.teacher must be {TEACHER_STAGE!r} when the pipeline trains a teacher, "
                                 f"got {self.student.teacher!r}; set `teacher: null` to distill from a checkpoint")
            t_vocab, s_vocab = self.teacher.student_config().vocab_size, self.student.student_config().vocab_size
            if t_vocab != s_vocab:
                raise ValueError(f"the teacher model's vocab_size ({t_vocab}) differs from the student's ({s_vocab}): "
                                 "distillation and speculative decoding compare logits over one vocabulary")
            if self.teacher.data.vocab_size > t_vocab:
                raise ValueError(f"teacher.data.vocab_size ({self.teacher.data.vocab_size}) exceeds the teacher "
                                 f"model's vocab_size ({t_vocab})")
        elif self.student.teacher in (None, TEACHER_STAGE):
            raise ValueError(f"without a teacher stage, student.teacher must name a checkpoint directory, "
                             f"got {self.student.teacher!r}")
        engine = self.serve.engine
        if engine.model is not None or engine.speculative is not None or engine.device != "auto":
            raise ValueError("serve.engine.model, .speculative and .device are set by the pipeline; leave them out "
                             f"(got model={engine.model!r}, speculative={engine.speculative!r}, "
                             f"device={engine.device!r})")
        limit = self.student.student_config().max_seq_len
        if self.eval.window > limit:
            raise ValueError(f"eval.window ({self.eval.window}) exceeds the student's max_seq_len ({limit})")
        return self

    # -- presets -------------------------------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str) -> PipelineConfig:
        """The pipeline at scale `name` (see `PipelineConfig.presets()`); `small` equals `PipelineConfig()`."""
        if name not in PIPELINE_PRESETS:
            raise KeyError(f"unknown pipeline preset {name!r}; known: {sorted(PIPELINE_PRESETS)}")
        return cls.model_validate(PIPELINE_PRESETS[name])

    @staticmethod
    def presets() -> list[str]:
        return sorted(PIPELINE_PRESETS)

    # -- resolving the stages ------------------------------------------------------------------------------

    def path(self, name: Literal["data", "teacher", "student", "quantized", "summary"]) -> Path:
        """Where the pipeline puts an artifact: `data` (train/held-out text), `teacher` and `student` (the
        training runs; the checkpoint is in `final/`), `quantized` (checkpoint), `summary` (JSON report)."""
        out = Path(self.output_dir)
        leaf = {"data": "data", "teacher": "teacher", "student": "student", "quantized": f"student-{self.quant.method}",
                "summary": "summary.json"}[name]
        return out / leaf

    def teacher_stage(self, train_file: str | Path) -> DistillConfig:
        """The teacher stage as a complete `DistillConfig` (what `tessera train --config` takes). Raises
        ValueError when the pipeline has no teacher stage."""
        if self.teacher is None:
            raise ValueError("this pipeline has no teacher stage (teacher: null)")
        return _with(self.teacher, {"data.paths": [str(train_file)], "output_dir": str(self.path("teacher")),
                                    "device": self.device})

    def student_stage(self, train_file: str | Path) -> DistillConfig:
        """The distillation stage as a complete `DistillConfig` (what `tessera distill --config` takes)."""
        teacher = (str(self.path("teacher") / "final") if self.student.teacher == TEACHER_STAGE
                   else self.student.teacher)
        return _with(self.student, {"teacher": teacher, "data.paths": [str(train_file)],
                                    "output_dir": str(self.path("student")), "device": self.device})

    def engine_config(self, model: str | Path, draft: str | Path | None) -> EngineConfig:
        """The serving engine's config for `model`, with `draft` as speculative draft when given."""
        spec = None if draft is None else SpeculativeConfig(method="draft", draft_model=str(draft),
                                                            num_speculative_tokens=self.serve.num_speculative_tokens)
        return _with(self.serve.engine, {"model": str(model), "device": self.device,
                                         "speculative": None if spec is None else spec.model_dump()})


def _with(spec: Spec, changes: dict[str, Any]) -> Any:
    data = spec.model_dump(mode="json")
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        tree = data
        for key in parents:
            tree = tree[key]
        tree[leaf] = value
    return type(spec).model_validate(data)


def _stages(teacher: str | dict[str, Any], student: str | dict[str, Any], *, steps: tuple[int, int], vocab: int,
            seq_len: int, batch: int, lr: float, warmup: int, compute_dtype: str = "float32") -> dict[str, Any]:
    """The teacher (CE) and student (KD + CE) stages over one model pair, sharing data, optimizer and compute
    dtype; `steps` = (teacher steps, student steps)."""
    common = {"optimizer": {"lr": lr, "warmup_steps": warmup, "weight_decay": 0.01},
              "data": {"vocab_size": vocab, "seq_len": seq_len, "batch_size": batch},
              "parallel": {"compute_dtype": compute_dtype}}
    return {
        "teacher": {"student": teacher, "loss": {"kd_weight": 0.0, "ce_weight": 1.0}, "steps": steps[0],
                    "log_every": max(1, steps[0] // 20), **common},
        "student": {"teacher": TEACHER_STAGE, "student": student, "loss": {"kd_weight": 1.0, "ce_weight": 0.5},
                    "temperature": {"kind": "constant", "start": 2.0}, "steps": steps[1],
                    "log_every": max(1, steps[1] // 20), **common},
    }


_MICRO_TEACHER = {"vocab_size": 512, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128,
                  "max_seq_len": 128, "tie_embeddings": True}
_MICRO_STUDENT = {"vocab_size": 512, "d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "d_ff": 64,
                  "max_seq_len": 128, "tie_embeddings": True}

PIPELINE_PRESETS: dict[str, dict[str, Any]] = {
    # Seconds on a CPU: two micro models, a slice of the corpus, a few steps. Exercises every stage.
    "tiny": {
        "max_chars": 150_000, "output_dir": "runs/demo-tiny",
        **_stages(_MICRO_TEACHER, _MICRO_STUDENT, steps=(12, 12), vocab=512, seq_len=64, batch=4, lr=3e-3, warmup=2),
        "eval": {"window": 64, "max_tokens": 4_000},
        "serve": {"max_tokens": 12, "prompts": list(DEFAULT_PROMPTS[:2]),
                  "engine": {"max_num_seqs": 4, "max_num_batched_tokens": 512, "kv_cache_bytes": 8 * 2**20}},
    },
    # The default demo: the tiny-teacher / tiny-student presets, a few minutes on two CPU cores.
    "small": _stages("tiny-teacher", "tiny-student", steps=(400, 250), vocab=2048, seq_len=128, batch=16, lr=3e-3,
                     warmup=30),
    # The distillation figures' pair (teacher-40m, student-6m) on the whole corpus, in bfloat16: for a GPU
    # (minutes there; hours on a CPU).
    "real": {
        "max_chars": None, "output_dir": "runs/demo-real",
        **_stages("teacher-40m", "student-6m", steps=(1000, 600), vocab=8192, seq_len=512, batch=16, lr=1e-3,
                  warmup=100, compute_dtype="bfloat16"),
        "eval": {"window": 512, "max_tokens": None},
        "serve": {"max_tokens": 128},
    },
}
