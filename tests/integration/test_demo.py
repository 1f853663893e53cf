"""`tessera demo` end to end at the tiny scale, through the real command line: every stage runs, the figures
obey the properties they must (trained models beat a uniform guess, int8 barely moves perplexity, greedy
speculative decoding reproduces plain greedy decoding, HTTP answers agree with offline generation), the
server stops cleanly, every artifact exists, and a rerun resumes while a different pipeline is refused."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tessera.demo import main_demo
from tessera.pipeline_data import RunMismatch, claim_output_dir
from tessera.specs import PipelineConfig


def demo(*args: str, timeout: float = 170) -> subprocess.CompletedProcess:
    """`tessera demo` at the tiny scale in a subprocess, on one CPU thread (the suite runs one worker per core)."""
    return subprocess.run([sys.executable, "-m", "tessera.cli", "demo", "--preset-scale", "tiny", "--no-progress",
                           "--device", "cpu", "--threads", "1", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("demo") / "run"
    return out, demo("--out", str(out))


@pytest.mark.slow
def test_demo_completes_and_prints_the_table(run) -> None:
    _, proc = run
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("data", "pretrain the teacher", "distill the student", "quantize the student", "perplexity",
                  "serve:", "HTTP gateway"):
        assert stage in proc.stdout
    for section in ("Held-out perplexity", "Generation (", "HTTP gateway http://127.0.0.1:", "Training", "Artifacts"):
        assert section in proc.stdout


@pytest.mark.slow
def test_figures_hold_their_properties(run) -> None:
    out, proc = run
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    vocab = PipelineConfig.preset("tiny").teacher.student_config().vocab_size
    ppl = {k: v["ppl"] for k, v in s["perplexity"].items()}
    assert set(ppl) == {"teacher", "student", "quantized_student"}
    assert all(math.isfinite(p) and 1 < p < vocab for p in ppl.values()), ppl  # better than a uniform guess
    assert abs(ppl["quantized_student"] / ppl["student"] - 1) < 0.02, ppl
    assert s["perplexity"]["quantized_student"]["checkpoint_bytes"] < s["perplexity"]["student"]["checkpoint_bytes"]
    spec, plain = s["serving"]["speculative"], s["serving"]["teacher"]
    assert spec["same_text_as_teacher"] and spec["tokens"] == plain["tokens"]
    assert 0 <= spec["acceptance_rate"] <= 1 and spec["speedup"] > 0
    assert plain["tokens"] == len(s["serving"]["prompts"]) * s["serving"]["max_tokens"]
    http = s["http"]
    assert http["url"].startswith("http://127.0.0.1:")
    assert http["completion"]["status"] == 200 and http["completion"]["matches_offline_greedy"]
    assert http["chat"]["chunks"] >= 2 and http["chat"]["text"]
    assert http["server_stopped"] and http["engine_stopped"]


@pytest.mark.slow
def test_every_artifact_exists(run) -> None:
    out, _ = run
    s = json.loads((out / "summary.json").read_text())
    for name, path in s["artifacts"].items():
        assert Path(path).exists(), name
    for stage in ("teacher", "student", "quantized"):
        assert (Path(s[stage]["checkpoint"]) / "modelcard.json").exists()
    card = json.loads((Path(s["quantized"]["checkpoint"]) / "modelcard.json").read_text())
    assert card["quant"]["method"] == "int8" and card["lineage"]["parent"] == s["student"]["checkpoint"]
    assert (out / "configs" / "teacher.yaml").exists() and (out / "configs" / "quant.yaml").exists()


@pytest.mark.slow
def test_rerun_resumes_and_another_pipeline_is_refused(run, tmp_path: Path) -> None:
    out, _ = run
    again = demo("--out", str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    for stage in ("teacher", "student"):
        assert s[stage]["resumed_from"] == s[stage]["steps"]
    text = tmp_path / "mine.txt"
    text.write_text("A line of my own text.\n" * 4000)
    before = (out / "data" / "train.txt").read_text()
    refused = demo("--out", str(out), "--data", str(text))
    assert refused.returncode == 2 and "different training stages" in refused.stderr
    assert (out / "data" / "train.txt").read_text() == before  # refused before writing anything
    text.write_text("Too short.\n")
    refused = demo("--out", str(tmp_path / "other"), "--data", str(text))
    assert refused.returncode == 2 and "too few" in refused.stderr


@pytest.mark.slow
def test_demo_on_your_own_text(tmp_path: Path) -> None:
    text = tmp_path / "mine.txt"
    text.write_text("".join(f"Entry {i}: the quick brown fox jumps over dog number {i % 13}.\n" for i in range(6000)))
    proc = demo("--out", str(tmp_path / "run"), "--data", str(text))
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["data"]["source"] == str(text) and s["data"]["heldout_documents"] >= 1
    train = (tmp_path / "run" / "data" / "train.txt").read_text()
    for doc in (tmp_path / "run" / "data" / "heldout.txt").read_text().split("\n\n"):
        assert doc in text.read_text() and doc not in train  # held out = never trained on
    assert s["perplexity"]["teacher"]["ppl"] < PipelineConfig.preset("tiny").teacher.student_config().vocab_size


@pytest.mark.slow
def test_demo_distills_from_an_existing_teacher(run, tmp_path: Path) -> None:
    out, proc = run
    assert proc.returncode == 0, proc.stderr[-3000:]
    teacher = out / "teacher" / "final"
    data = PipelineConfig.preset("tiny").model_dump(mode="json")
    data["teacher"], data["student"]["teacher"] = None, str(teacher)
    config = tmp_path / "pipeline.yaml"
    PipelineConfig.model_validate(data).dump(config)
    proc = subprocess.run([sys.executable, "-m", "tessera.cli", "demo", "--config", str(config), "--no-progress",
                           "--threads", "1", "--out", str(tmp_path / "run")], capture_output=True, text=True,
                          timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[6/6]" in proc.stdout and "pretrain the teacher" not in proc.stdout
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["teacher"]["checkpoint"] == str(teacher) and "teacher's tokenizer" in s["eval"]["tokenizer"]
    first = json.loads((out / "summary.json").read_text())
    assert s["perplexity"]["teacher"]["ppl"] == pytest.approx(first["perplexity"]["teacher"]["ppl"], rel=1e-5)


@pytest.mark.gpu
@pytest.mark.slow
def test_demo_on_cuda(tmp_path: Path) -> None:
    # 122 s alone on an H200 (Triton compiles and tunes every decode shape); 170 s ran out under -n 12.
    proc = demo("--out", str(tmp_path / "run"), "--device", "cuda", timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["device"].startswith("cuda") and s["serving"]["speculative"]["same_text_as_teacher"]


def test_an_output_dir_refuses_other_stages_or_text(tmp_path: Path) -> None:
    cfg = PipelineConfig.preset("tiny").model_copy(update={"output_dir": str(tmp_path)})
    claim_output_dir(cfg, "abc")
    claim_output_dir(cfg, "abc")  # the same run again: resumable
    changed = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"max_tokens": 3}), "threads": 2})
    claim_output_dir(changed, "abc")  # serving and execution settings do not touch the checkpoints
    with pytest.raises(RunMismatch, match="different training text"):
        claim_output_dir(cfg, "def")
    other = cfg.model_copy(update={"student": cfg.student.model_copy(update={"steps": 99})})
    with pytest.raises(RunMismatch, match="different training stages"):
        claim_output_dir(other, "abc")


def test_print_config_is_the_preset_with_overrides(capsys: pytest.CaptureFixture) -> None:
    assert main_demo(["--preset-scale", "tiny", "--out", "x", "--device", "cpu", "--print-config"]) == 0
    cfg = PipelineConfig.from_yaml(capsys.readouterr().out)
    assert cfg == PipelineConfig.preset("tiny").model_copy(update={"output_dir": "x", "device": "cpu"})
