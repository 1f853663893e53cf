"""`PipelineConfig`: the committed pipeline files equal the built-in presets, invalid pipelines fail naming the
field, and each resolved stage is a config its own command accepts as it is."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from tessera.distill.cli import main_distill, main_train
from tessera.specs import DistillConfig, EngineConfig, PipelineConfig, QuantConfig
from tessera.specs.pipeline import TEACHER_STAGE

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_demo_yaml_is_the_default_pipeline() -> None:
    assert PipelineConfig.load(CONFIGS / "demo.yaml") == PipelineConfig() == PipelineConfig.preset("small")


@pytest.mark.parametrize("scale", ["tiny", "small", "real"])
def test_committed_files_equal_the_presets(scale: str) -> None:
    name = "demo.yaml" if scale == "small" else f"demo-{scale}.yaml"
    assert PipelineConfig.load(CONFIGS / name) == PipelineConfig.preset(scale)


@pytest.mark.parametrize("scale", ["tiny", "small", "real"])
def test_round_trips_through_yaml_and_json(scale: str) -> None:
    cfg = PipelineConfig.preset(scale)
    assert PipelineConfig.from_yaml(cfg.to_yaml()) == cfg
    assert PipelineConfig.from_json(cfg.to_json()) == cfg


def test_presets_grow_with_scale() -> None:
    sizes = [PipelineConfig.preset(s).teacher.student_config().num_params() for s in ("tiny", "small", "real")]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3
    with pytest.raises(KeyError, match="huge"):
        PipelineConfig.preset("huge")


def _with(cfg: PipelineConfig, **changes: object) -> dict:
    data = cfg.model_dump(mode="json")
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        tree = data
        for key in parents:
            tree = tree[key]
        tree[leaf] = value
    return data


@pytest.mark.parametrize(("changes", "message"), [
    ({"teacher__output_dir": "elsewhere"}, "teacher.output_dir is set by the pipeline"),
    ({"student__data__paths": ["a.txt"]}, "student.data.paths is set by the pipeline"),
    ({"student__device": "cuda"}, "student.device is set by the pipeline"),
    ({"teacher__teacher": "some/dir", "teacher__loss": {"kd_weight": 1.0}}, "teacher.teacher must be empty"),
    ({"student__teacher": "some/dir"}, f"student.teacher must be '{TEACHER_STAGE}'"),
    ({"teacher": None}, "student.teacher must name a checkpoint"),
    ({"student__student": "student-6m"}, r"vocab_size \(2048\) differs from the student's \(8192\)"),
    ({"teacher__data__vocab_size": 4096}, r"teacher.data.vocab_size \(4096\) exceeds"),
    ({"serve__engine__model": "x"}, "serve.engine.model, .speculative and .device are set by the pipeline"),
    ({"eval__window": 4096}, r"eval.window \(4096\) exceeds the student's max_seq_len \(256\)"),
    ({"gateway__port": 70000}, "port"),
    ({"quant": {"method": "int3"}}, "int3"),
    ({"serve__prompts": []}, "prompts"),
])
def test_invalid_pipelines_name_the_field(changes: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        PipelineConfig.model_validate(_with(PipelineConfig(), **changes))


def test_an_existing_teacher_skips_the_teacher_stage(tmp_path: Path) -> None:
    cfg = PipelineConfig.model_validate(_with(PipelineConfig(), teacher=None, student__teacher=str(tmp_path)))
    assert cfg.student_stage("train.txt").teacher == str(tmp_path)
    with pytest.raises(ValueError, match="no teacher stage"):
        cfg.teacher_stage("train.txt")


def test_resolved_stages_carry_the_pipeline_fields(tmp_path: Path) -> None:
    cfg = PipelineConfig.model_validate(_with(PipelineConfig(), output_dir=str(tmp_path), device="cpu"))
    teacher, student = cfg.teacher_stage("t.txt"), cfg.student_stage("t.txt")
    assert teacher.output_dir == str(tmp_path / "teacher") and student.output_dir == str(tmp_path / "student")
    assert student.teacher == str(tmp_path / "teacher" / "final")
    assert teacher.data.paths == student.data.paths == ("t.txt",)
    assert teacher.device == student.device == "cpu"
    assert teacher.loss.kd_weight == 0 and student.loss.kd_weight > 0
    engine = cfg.engine_config(tmp_path / "teacher", tmp_path / "draft")
    assert engine.model == str(tmp_path / "teacher") and engine.device == "cpu"
    assert engine.speculative.draft_model == str(tmp_path / "draft")
    assert engine.speculative.num_speculative_tokens == cfg.serve.num_speculative_tokens
    assert cfg.engine_config(tmp_path, None).speculative is None
    assert cfg.path("quantized") == tmp_path / "student-int8"


@pytest.mark.parametrize("stage", ["teacher", "student"])
def test_each_stage_is_what_its_command_takes(stage: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = PipelineConfig()
    resolved = cfg.teacher_stage("t.txt") if stage == "teacher" else cfg.student_stage("t.txt")
    path = tmp_path / f"{stage}.yaml"
    resolved.dump(path)
    command = main_train if stage == "teacher" else main_distill
    assert command(["--config", str(path), "--print-config"]) == 0
    assert DistillConfig.load(yaml.safe_load(capsys.readouterr().out)) == resolved


def test_stage_specs_are_the_packages_specs() -> None:
    cfg = PipelineConfig()
    assert isinstance(cfg.quant, QuantConfig) and cfg.quant.method == "int8"
    assert isinstance(cfg.serve.engine, EngineConfig)
    assert PipelineConfig.model_validate(_with(cfg, quant={"method": "awq", "group_size": 32})).quant.group_size == 32
