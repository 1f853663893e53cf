"""The trainer end to end: pretrain a teacher, distill a student, resume from the latest checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tessera.distill.cli import main_distill, main_train
from tessera.distill.corpus import builtin_corpus
from tessera.distill.data import PackedLoader
from tessera.distill.trainer import DistillTrainer
from tessera.model.checkpoint import read_model_card
from tessera.model.loading import load_model
from tessera.specs import DistillConfig, ModelConfig

TINY = ModelConfig(vocab_size=320, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64,
                   tie_embeddings=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "docs.txt"
    path.write_text("\n\n".join(builtin_corpus(max_chars=60_000)))
    return path


def _cfg(corpus: Path, out: Path, **kw) -> DistillConfig:
    base = {"student": TINY.model_dump(mode="json"), "steps": 6, "log_every": 1, "output_dir": str(out),
            "data": {"paths": [str(corpus)], "vocab_size": 300, "seq_len": 32, "batch_size": 2, "grad_accum": 2},
            "optimizer": {"lr": 3e-3, "warmup_steps": 2},
            "loss": {"kd_weight": 0.0, "ce_weight": 1.0},
            "checkpoint": {"every_steps": 3, "keep_last": 3},
            "parallel": {"strategy": "zero3"}, "device": "cpu"}
    for k, v in kw.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return DistillConfig.model_validate(base)


def test_resume_from_latest_continues_with_the_same_losses(corpus: Path, tmp_path: Path) -> None:
    cfg = _cfg(corpus, tmp_path / "run")
    full = DistillTrainer(cfg, progress=False).fit()
    losses = [r["loss"] for r in full.metrics]
    assert len(losses) == 6 and losses[-1] < losses[0]
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-00000006")   # as if killed after step 3's save
    resumed = DistillTrainer(cfg, progress=False).fit()
    assert resumed.resumed_from == 3
    again = [r["loss"] for r in resumed.metrics]
    assert again[:3] == losses[:3]                                       # the log kept steps 1-3
    assert again[3:] == pytest.approx(losses[3:], abs=1e-6)


def test_pretrain_then_distill_cli(corpus: Path, tmp_path: Path) -> None:
    teacher_cfg = _cfg(corpus, tmp_path / "teacher", parallel={"strategy": "none"})
    (tmp_path / "teacher.yaml").write_text(teacher_cfg.to_yaml())
    assert main_train(["--config", str(tmp_path / "teacher.yaml"), "--no-progress"]) == 0
    teacher_dir = tmp_path / "teacher" / "final"
    card = read_model_card(teacher_dir)
    assert card.lineage.method == "pretrain" and card.lineage.data == (str(corpus),)
    assert (tmp_path / "teacher" / "loss_curve.png").stat().st_size > 0
    student = TINY.model_copy(update={"d_model": 16, "n_layers": 1, "d_ff": 32})
    cfg = _cfg(corpus, tmp_path / "student", teacher=str(teacher_dir), student=student.model_dump(mode="json"),
               loss={"kd_weight": 1.0, "ce_weight": 0.5, "hidden_weight": 0.5, "layer_map": [[0, 1]]},
               temperature={"kind": "linear", "start": 3.0, "end": 1.0}, data={"tokenizer": None})
    (tmp_path / "student.yaml").write_text(cfg.to_yaml())
    assert main_distill(["--config", str(tmp_path / "student.yaml"), "--no-progress", "--steps", "4"]) == 0
    final = tmp_path / "student" / "final"
    card = read_model_card(final)
    assert card.lineage.method == "distill" and card.lineage.teacher == str(teacher_dir) and card.lineage.steps == 4
    rows = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["kd"] > 0 and r["ce"] > 0 and r["hidden"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert rows[0]["temperature"] == 3.0 and rows[-1]["temperature"] == 1.0
    model, tok = load_model(final)
    assert tok is not None and tok.vocab_size == 300   # the teacher's tokenizer travelled with the student
    assert model.config.d_model == 16


def test_loader_is_deterministic_and_resumable() -> None:
    from tessera.distill.comm import Group

    tokens = torch.arange(1000)
    a = PackedLoader(tokens, 10, 3, 2, Group(None, 0, 1), seed=5)
    seen = [torch.cat(a.next_step()) for _ in range(40)]   # several epochs of 99 windows
    b = PackedLoader(tokens, 10, 3, 2, Group(None, 0, 1), seed=5)
    for _ in range(7):
        b.next_step()
    c = PackedLoader(tokens, 10, 3, 2, Group(None, 0, 1), seed=5)
    c.load_state_dict(b.state_dict())
    assert all(torch.equal(c_step, s) for c_step, s in zip((torch.cat(c.next_step()) for _ in range(33)), seen[7:]))
    first_epoch = torch.cat(seen)[:99 * 1]
    assert sorted(first_epoch[:, 0].tolist()[:99]) != first_epoch[:, 0].tolist()[:99]   # shuffled
    # every window of the first epoch is used exactly once, and windows follow each other in the text
    starts = torch.cat([s[:, 0] for s in seen])[:99]
    assert sorted(starts.tolist()) == list(range(0, 990, 10))
    assert all(torch.equal(w, torch.arange(w[0], w[0] + 11)) for s in seen for w in s)
    # two ranks split each step's windows between them
    r0 = PackedLoader(tokens, 10, 3, 2, Group(None, 0, 2), seed=5)
    r1 = PackedLoader(tokens, 10, 3, 2, Group(None, 1, 2), seed=5)
    both = torch.cat([torch.cat(r0.next_step()), torch.cat(r1.next_step())])[:, 0]
    one = PackedLoader(tokens, 10, 3, 2, Group(None, 0, 1), seed=5)
    single = torch.cat(one.next_step() + one.next_step())[:, 0]
    assert sorted(both.tolist()) == sorted(single.tolist())


def test_torchrun_two_ranks_then_resume_in_one_process(corpus: Path, tmp_path: Path) -> None:
    """`tessera train` under torchrun on 2 gloo ranks; its checkpoint resumes in 1 process with the same
    global batch (grad_accum doubled) and continues with the same losses (up to the order in which the
    two runs sum the same micro-batch gradients)."""
    import os
    import subprocess
    import sys

    from ._launch import free_port

    out = tmp_path / "run"
    cfg = _cfg(corpus, out)
    (tmp_path / "cfg.yaml").write_text(cfg.to_yaml())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(free_port()), "-m", "tessera.cli", "train", "--config", str(tmp_path / "cfg.yaml"), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert read_model_card(out / "final").lineage.notes.startswith("strategy=zero3 world=2")
    shutil.rmtree(out / "checkpoints" / "step-00000006")
    one = _cfg(corpus, out, data={"grad_accum": 4})
    resumed = DistillTrainer(one, progress=False).fit()
    assert resumed.resumed_from == 3
    assert [r["loss"] for r in resumed.metrics[3:]] == pytest.approx([r["loss"] for r in rows[3:]], abs=1e-5)
