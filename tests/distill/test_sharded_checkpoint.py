"""Sharded atomic checkpoints: round trips, incomplete and corrupt saves, and saves killed with SIGKILL."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from tessera.distill.sharded_checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    step_dir,
)
from tessera.distill.strategy import make_strategy
from tessera.specs.distill import OptimizerConfig, ParallelConfig

OPT = OptimizerConfig(name="adamw", lr=1e-2, warmup_steps=0)


class _Net(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(3))
        self.head = nn.Linear(width, 11)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


def _strategy(kind: str, width: int = 16):
    net = _Net(width)
    return make_strategy(net, list(net.blocks), ParallelConfig(strategy=kind), OPT)


def _train(strat, steps: int, seed: int) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, 11, (4, 6), generator=g)
        loss = nn.functional.cross_entropy(strat.module(ids).reshape(-1, 11), ids.reshape(-1))
        loss.backward()
        strat.step(OPT.lr, 1.0)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("save_kind,load_kind", [("zero3", "zero3"), ("zero3", "none"), ("none", "zero3")])
def test_roundtrip_continues_identically(save_kind: str, load_kind: str, tmp_path: Path) -> None:
    a = _strategy(save_kind)
    _train(a, 3, seed=1)
    path = save_checkpoint(tmp_path, 3, a, {"position": 12})
    b = _strategy(load_kind)
    manifest = load_checkpoint(path, b)
    assert manifest["trainer"] == {"position": 12} and manifest["step"] == 3
    for k, v in a.full_state_dict().items():
        assert torch.equal(b.full_state_dict()[k], v), k
    assert b.step_count == 3
    # the optimizer state came along: the next steps agree (the same element-wise Adam update either way)
    torch.testing.assert_close(_train(b, 2, seed=2), _train(a, 2, seed=2), rtol=0, atol=1e-6)


def test_incomplete_and_corrupt_checkpoints_are_skipped(tmp_path: Path) -> None:
    s = _strategy("zero3")
    save_checkpoint(tmp_path, 1, s, {}, keep_last=5)
    save_checkpoint(tmp_path, 2, s, {}, keep_last=5)
    save_checkpoint(tmp_path, 3, s, {}, keep_last=5)
    assert latest_checkpoint(tmp_path) == step_dir(tmp_path, 3)
    (step_dir(tmp_path, 3) / "manifest.json").unlink()          # killed before the manifest
    assert latest_checkpoint(tmp_path) == step_dir(tmp_path, 2)
    shard = next(step_dir(tmp_path, 2).glob("shard-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))                                # bit rot
    assert latest_checkpoint(tmp_path) == step_dir(tmp_path, 1)
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(step_dir(tmp_path, 2), s)
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(step_dir(tmp_path, 1), _strategy("zero3", width=8))


def test_keep_last_prunes_old_and_abandoned(tmp_path: Path) -> None:
    s = _strategy("none")
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, s, {}, keep_last=2)
    step_dir(tmp_path, 4).mkdir()   # a save killed before its manifest: removed once a newer one completes
    step_dir(tmp_path, 9).mkdir()   # one from a later step (a run restarted from older): left to be overwritten
    save_checkpoint(tmp_path, 5, s, {}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003", "step-00000005", "step-00000009"]
    save_checkpoint(tmp_path, 6, s, {}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000005", "step-00000006", "step-00000009"]


def _save_forever(root: str) -> None:
    torch.set_num_threads(1)
    strat = _strategy("none", width=256)
    latest = latest_checkpoint(root)
    step = 0 if latest is None else load_checkpoint(latest, strat)["step"]
    while True:
        step += 1
        with torch.no_grad():
            for p in strat.module.parameters():
                p.fill_(float(step))
        save_checkpoint(root, step, strat, {"step": step}, keep_last=2)


def test_sigkill_during_saves_never_breaks_latest(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    rng = random.Random(0)
    probe = _strategy("none", width=256)
    interrupted, last_step = 0, 0
    for _ in range(24):
        child = ctx.Process(target=_save_forever, args=(str(tmp_path),))
        child.start()
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL
        newest = max((p.name for p in tmp_path.iterdir()), default="")
        interrupted += newest != "" and not (tmp_path / newest / "manifest.json").exists()
        latest = latest_checkpoint(tmp_path)
        if latest is None:
            continue
        manifest = load_checkpoint(latest, probe)
        step = manifest["step"]
        assert manifest["trainer"] == {"step": step}
        assert step >= last_step  # progress is never lost
        for name, t in probe.full_state_dict().items():
            assert torch.all(t == float(step)), f"{latest.name}: {name} is not all {step}"
        last_step = step
    assert last_step > 0
    assert interrupted >= 3, f"only {interrupted} kills landed inside a save; the test did not exercise them"
