"""The training step: losses against torch.nn.functional, gradients against PyTorch autograd on the
torch Transformer, the optimizer against torch.optim.AdamW, and the sharded step on an 8-device CPU
mesh against the single-device step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tessera.jaxref.losses import kd_divergence
from tessera.model.checkpoint import load_pretrained
from tessera.specs import LossConfig

sys.path.insert(0, str(Path(__file__).parent))
import sharded_worker as worker

REL = 1e-5  # fp32 reduction-order noise, relative to a tensor's largest entry


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    out = tmp_path_factory.mktemp("sharded")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, worker.__file__, str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with np.load(out / "result.npz") as result:
        return out, dict(result)


def _tensors(result: dict[str, np.ndarray], tag: str) -> dict[str, np.ndarray]:
    prefix = f"{tag}/"
    return {k[len(prefix):]: v for k, v in result.items() if k.startswith(prefix) and not k.endswith("/loss")}


def _assert_close(got: dict[str, np.ndarray], expected: dict[str, np.ndarray], what: str) -> None:
    assert got.keys() == expected.keys()
    for name, ref in expected.items():
        err = float(np.abs(got[name].astype(np.float64) - ref).max())
        assert err <= REL * float(np.abs(ref).max()) + 1e-12, f"{what}: {name} max|diff| {err:.3g}"


def test_sharded_gradients_equal_single_device(run: tuple[Path, dict[str, np.ndarray]]) -> None:
    _, result = run
    single = _tensors(result, "grad/single")
    for dp, tp in worker.GRAD_MESHES:
        tag = f"grad/{dp}x{tp}"
        assert abs(result[f"{tag}/loss"] - result["grad/single/loss"]) <= 1e-6 * abs(result["grad/single/loss"])
        _assert_close(_tensors(result, tag), single, f"mesh data={dp} model={tp}")


def _first_adam_direction(grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Adam's first bias-corrected step direction g / (|g| + eps), after global-norm clipping."""
    norm = np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values()))
    scale = min(1.0, worker.OPT.grad_clip / norm)
    return {k: scale * g / (np.abs(scale * g) + worker.OPT.eps) for k, g in grads.items()}


def test_sharded_step_equals_single_device_step(run: tuple[Path, dict[str, np.ndarray]]) -> None:
    """Adam's first step normalises each gradient entry, so an entry whose gradient is near eps moves
    differently under fp32 noise: each parameter may differ by at most what the two (recorded)
    gradients predict, lr * |u_single - u_sharded|, plus the float32 rounding of the update on each
    side (the direction's moments, sqrt and division, the decay and the subtraction: 8 units of
    float32 epsilon at the operands' scale |p| + lr). A real discrepancy would be of order lr."""
    _, result = run
    assert str(result["step/sharded_spec_wq"]) == "P(None, None, 'model')"  # the update kept the layout
    single, sharded = _tensors(result, "step/single"), _tensors(result, "step/sharded")
    dp, tp = worker.STEP_MESH
    u_single = _first_adam_direction(_tensors(result, "grad/single"))
    u_sharded = _first_adam_direction(_tensors(result, f"grad/{dp}x{tp}"))
    for name, p in single.items():
        rounding = 8 * np.finfo(np.float32).eps * (np.abs(p) + worker.OPT.lr)
        bound = worker.OPT.lr * np.abs(u_single[name] - u_sharded[name]) + rounding
        assert np.all(np.abs(sharded[name] - p) <= bound), name
    assert abs(result["step/sharded/loss"] - result["step/single/loss"]) <= 1e-6 * result["step/single/loss"]


def _torch_loss(model: torch.nn.Module, batch: dict[str, np.ndarray], loss: LossConfig,
                temperature: float) -> torch.Tensor:
    ids = torch.from_numpy(batch["input_ids"]).long()
    logits = model(ids)
    v = logits.shape[-1]
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, v), ids[:, 1:].reshape(-1))
    student = F.log_softmax(logits.reshape(-1, v) / temperature, dim=-1)
    teacher = F.log_softmax(torch.from_numpy(batch["teacher_logits"]).reshape(-1, v) / temperature, dim=-1)
    kd = F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2
    return loss.ce_weight * ce + loss.kd_weight * kd


def test_gradients_match_torch_autograd(run: tuple[Path, dict[str, np.ndarray]]) -> None:
    out, result = run
    model = load_pretrained(out / "ckpt")
    with np.load(out / "batch.npz") as batch:
        loss = _torch_loss(model, dict(batch), worker.LOSS, worker.TEMPERATURE)
    loss.backward()
    expected = {k: p.grad.double().numpy() for k, p in model.named_parameters()}
    assert abs(loss.item() - result["grad/single/loss"]) <= 1e-6 * loss.item()
    _assert_close(_tensors(result, "grad/single"), expected, "jax vs torch autograd")
    dp, tp = worker.STEP_MESH
    _assert_close(_tensors(result, f"grad/{dp}x{tp}"), expected, "sharded jax vs torch autograd")


def test_optimizer_step_matches_torch_adamw(run: tuple[Path, dict[str, np.ndarray]]) -> None:
    """Fed the same gradients, torch's clip_grad_norm_ + AdamW (matrices decayed, norms and biases
    not) moves the parameters as the jax step did."""
    out, result = run
    model = load_pretrained(out / "ckpt")
    grads = _tensors(result, "grad/single")
    named = dict(model.named_parameters())
    for name, p in named.items():
        p.grad = torch.from_numpy(grads[name].copy())
    decayed = [p for n, p in named.items() if "norm" not in n and not n.endswith(".bias")]
    plain = [p for n, p in named.items() if "norm" in n or n.endswith(".bias")]
    opt = worker.OPT
    torch.nn.utils.clip_grad_norm_(list(named.values()), opt.grad_clip)
    adamw = torch.optim.AdamW([{"params": decayed, "weight_decay": opt.weight_decay},
                               {"params": plain, "weight_decay": 0.0}], lr=opt.lr, betas=opt.betas, eps=opt.eps)
    adamw.step()
    stepped = _tensors(result, "step/single")
    for name, p in named.items():
        np.testing.assert_allclose(stepped[name], p.detach().numpy(), rtol=0, atol=1e-8, err_msg=name)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_kd_divergences_match_torch(divergence: str) -> None:
    rng = np.random.default_rng(0)
    s, t = (3 * rng.standard_normal((2, 5, 11))).astype(np.float32), (3 * rng.standard_normal((2, 5, 11))).astype(
        np.float32)
    tau, beta = 1.7, 0.3
    log_q = F.log_softmax(torch.from_numpy(s).reshape(-1, 11) / tau, -1)
    log_p = F.log_softmax(torch.from_numpy(t).reshape(-1, 11) / tau, -1)
    if divergence == "forward_kl":
        expected = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    elif divergence == "reverse_kl":
        expected = F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")
    else:
        log_m = torch.log(beta * log_p.exp() + (1 - beta) * log_q.exp())
        expected = (beta * F.kl_div(log_m, log_p, log_target=True, reduction="batchmean")
                    + (1 - beta) * F.kl_div(log_m, log_q, log_target=True, reduction="batchmean"))
    got = float(kd_divergence(s, t, tau, divergence, beta))
    assert got == pytest.approx(float(expected) * tau**2, rel=1e-5)
