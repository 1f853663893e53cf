"""Logits of tessera.jaxref equal those of the PyTorch `tessera.model.Transformer` loaded from the
same checkpoint: written by `save_pretrained` and read by `load_checkpoint`, and the other way round."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tessera.jaxref import forward, init_params, load_checkpoint, save_checkpoint
from tessera.model import Transformer
from tessera.model.checkpoint import load_pretrained, save_pretrained
from tessera.specs import ModelConfig

FP32_TOL = 2e-5


def random_torch_model(cfg: ModelConfig, seed: int) -> Transformer:
    """A Transformer with the model's own init for matrices (N(0, init_std)), and random norm weights
    (init 1) and biases (init 0) so that they matter."""
    model = Transformer(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else cfg.init_std * noise)
    return model


def torch_logits(model: Transformer, ids: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        pos = None if positions is None else torch.from_numpy(positions).long()
        return model(torch.from_numpy(ids).long(), positions=pos).float().numpy()


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


@st.composite
def configs(draw: st.DrawFn) -> ModelConfig:
    n_kv = draw(st.integers(1, 3))
    scaling = draw(st.sampled_from([None, "linear", "llama3"]))
    rope_scaling = None
    if scaling == "linear":
        rope_scaling = {"type": "linear", "factor": draw(st.floats(1.0, 8.0))}
    elif scaling == "llama3":
        low = draw(st.sampled_from([1.0, 2.0]))
        rope_scaling = {"type": "llama3", "factor": draw(st.sampled_from([2.0, 8.0, 32.0])),
                        "low_freq_factor": low, "high_freq_factor": low * draw(st.sampled_from([2.0, 4.0])),
                        # small originals put the head's wavelengths inside all three bands
                        "original_max_position_embeddings": draw(st.sampled_from([16, 64, 8192]))}
    return ModelConfig(
        vocab_size=draw(st.integers(8, 96)), d_model=draw(st.sampled_from([16, 24, 32])),
        n_layers=draw(st.integers(1, 3)), n_heads=n_kv * draw(st.integers(1, 3)), n_kv_heads=n_kv,
        head_dim=draw(st.sampled_from([4, 8, 16])), d_ff=draw(st.integers(4, 48)),
        rope_theta=draw(st.sampled_from([100.0, 10000.0, 500000.0])), rope_scaling=rope_scaling,
        norm_eps=draw(st.sampled_from([1e-5, 1e-6])), tie_embeddings=draw(st.booleans()),
        qk_norm=draw(st.booleans()), attention_bias=draw(st.booleans()))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs(), seed=st.integers(0, 2**16), batch=st.integers(1, 3), seq=st.integers(1, 12),
       offset=st.sampled_from([None, 0, 7, 3000]), shard_bytes=st.sampled_from([2**31, 4096]))
def test_torch_checkpoint_read_by_jax(cfg: ModelConfig, seed: int, batch: int, seq: int, offset: int | None,
                                      shard_bytes: int) -> None:
    model = random_torch_model(cfg, seed)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, (batch, seq))
    positions = None
    if offset is not None:  # per-row starts, as a batch of continuing sequences would have
        positions = offset + rng.integers(0, 50, (batch, 1)) + np.arange(seq)[None, :]
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp, max_shard_bytes=shard_bytes)
        params, loaded_cfg = load_checkpoint(tmp)
    assert loaded_cfg == cfg
    expected = torch_logits(model, ids, positions)
    got = np.asarray(forward(params, cfg, ids.astype(np.int32), None if positions is None else positions))
    assert got.shape == expected.shape == (batch, seq, cfg.vocab_size)
    assert max_diff(got, expected) <= FP32_TOL


@settings(max_examples=3, deadline=None)
@given(cfg=configs(), seed=st.integers(0, 2**16))
def test_jax_checkpoint_read_by_torch(cfg: ModelConfig, seed: int) -> None:
    params = init_params(cfg, seed)
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, 9))
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(params, cfg, tmp, max_shard_bytes=8192)
        model = load_pretrained(tmp).eval()
    assert max_diff(forward(params, cfg, ids), torch_logits(model, ids)) <= FP32_TOL


def _shrunk(name: str) -> ModelConfig:
    """A published family's preset with its features (RoPE scaling, QK-norm, head_dim, theta, GQA
    ratio) kept and its width, depth and vocabulary cut to CPU size."""
    cfg = ModelConfig.preset(name)
    return ModelConfig.model_validate({**cfg.model_dump(), "vocab_size": 512, "d_model": 128, "n_layers": 2,
                                       "d_ff": 256, "n_heads": cfg.n_heads // 4, "n_kv_heads": cfg.n_kv_heads // 4,
                                       "bos_token_id": None, "eos_token_id": None})


PRESET_CASES = ["tiny-student", "tiny-teacher", "student-6m", "teacher-40m", "llama-3.2-1b~", "qwen3-0.6b~"]


@pytest.mark.parametrize("name", PRESET_CASES)
def test_presets_fp32_and_bf16(name: str, tmp_path: Path, record_property: Callable[[str, object], None]) -> None:
    cfg = _shrunk(name[:-1]) if name.endswith("~") else ModelConfig.preset(name)
    model = random_torch_model(cfg, 0)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 24))
    save_pretrained(model, tmp_path)
    params, _ = load_checkpoint(tmp_path)
    reference = torch_logits(model, ids)
    fp32 = max_diff(forward(params, cfg, ids), reference)
    assert fp32 <= FP32_TOL, f"{name}: fp32 max |logit diff| {fp32:.3g}"

    # bf16: both frameworks from the same bf16 checkpoint. Reported, and bounded by each side's own
    # rounding error against the fp32 logits (a bf16-only bug in either would exceed it).
    save_pretrained(model, tmp_path / "bf16", dtype="bfloat16")
    params16, _ = load_checkpoint(tmp_path / "bf16")
    jax16 = np.asarray(forward(params16, cfg, ids), np.float32)
    torch16 = torch_logits(load_pretrained(tmp_path / "bf16").eval(), ids)
    bf16 = max_diff(jax16, torch16)
    err_jax, err_torch = max_diff(jax16, reference), max_diff(torch16, reference)
    record_property("bf16_max_abs_diff", bf16)
    print(f"{name}: fp32 max|diff| {fp32:.2e}; bf16 max|jax - torch| {bf16:.2e} "
          f"(vs fp32: jax {err_jax:.2e}, torch {err_torch:.2e}; max|logit| {np.abs(reference).max():.2f})")
    assert bf16 <= err_jax + err_torch + 1e-6
    assert err_jax <= 2 * err_torch + 1e-6


@pytest.mark.parametrize("preset", ModelConfig.presets())
def test_rope_tables_agree_at_long_positions(preset: str) -> None:
    """The two stacks' cos/sin tables agree to a few float32 ulps over 8192 positions: one ulp of
    inverse frequency alone would grow to ~3e-5 by position 511 and dominate the logit difference."""
    import jax.numpy as jnp

    from tessera.attn import RotaryEmbedding
    from tessera.jaxref.layers import rope_inv_freq, rope_tables

    cfg = ModelConfig.preset(preset)
    hd = cfg.head_dim or cfg.d_model // cfg.n_heads
    cos_t, sin_t = RotaryEmbedding(hd, cfg.rope_theta, cfg.rope_scaling)(torch.arange(8192)[None], torch.float32)
    cos_j, sin_j = rope_tables(jnp.arange(8192)[None], rope_inv_freq(hd, cfg.rope_theta, cfg.rope_scaling),
                               jnp.float32)
    assert np.abs(cos_t.numpy() - np.asarray(cos_j)).max() <= 5e-7
    assert np.abs(sin_t.numpy() - np.asarray(sin_j)).max() <= 5e-7
