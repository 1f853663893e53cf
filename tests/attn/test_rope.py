"""RoPE against transformers' own frequency functions and rotary application."""

from __future__ import annotations

import pytest
import torch

from tessera.attn import RotaryEmbedding, apply_rope, rope_inv_freq
from tessera.specs import RopeScaling

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: E402


def _hf_inv_freq(head_dim: int, theta: float, rope_scaling: dict | None) -> torch.Tensor:
    params = {"rope_type": "default", "rope_theta": theta}
    if rope_scaling:
        params.update(rope_scaling)
    cfg = transformers.LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                                   max_position_embeddings=8192, rope_parameters=params)
    fn = ROPE_INIT_FUNCTIONS.get(params["rope_type"])
    if fn is None:
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    inv_freq, _ = fn(cfg, "cpu")
    return inv_freq


CASES = [
    (64, 10000.0, None),
    (128, 500000.0, {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192}),
    (32, 10000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
                   "original_max_position_embeddings": 64}),
    (16, 1000.0, {"rope_type": "linear", "factor": 4.0}),
]


@pytest.mark.parametrize(("head_dim", "theta", "scaling"), CASES)
def test_inv_freq_matches_transformers(head_dim: int, theta: float, scaling: dict | None) -> None:
    ours_scaling = None
    if scaling:
        ours_scaling = RopeScaling(type=scaling["rope_type"], **{k: v for k, v in scaling.items() if k != "rope_type"})
    ours = rope_inv_freq(head_dim, theta, ours_scaling)
    torch.testing.assert_close(ours, _hf_inv_freq(head_dim, theta, scaling), rtol=0, atol=0)


def test_apply_rope_matches_transformers() -> None:
    torch.manual_seed(0)
    b, t, h, d = 2, 7, 3, 16
    q, k = torch.randn(b, t, h, d), torch.randn(b, t, 1, d)
    positions = torch.randint(0, 1000, (b, t))
    cos, sin = RotaryEmbedding(d, 10000.0)(positions, torch.float32)
    ref_q, ref_k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    torch.testing.assert_close(apply_rope(q, cos, sin), ref_q.transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(apply_rope(k, cos, sin), ref_k.transpose(1, 2), rtol=0, atol=0)


def test_rotation_preserves_norm_and_relative_position() -> None:
    torch.manual_seed(0)
    rope = RotaryEmbedding(8, 10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(pq: int, pk: int) -> torch.Tensor:
        cq, sq = rope(torch.tensor([[pq]]), torch.float32)
        ck, sk = rope(torch.tensor([[pk]]), torch.float32)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(score(10, 3), score(107, 100), rtol=1e-5, atol=1e-5)
    c, s = rope(torch.tensor([[37]]), torch.float32)
    torch.testing.assert_close(apply_rope(q, c, s).norm(), q.norm(), rtol=1e-6, atol=1e-6)


def test_tables_are_exact_cos_sin_rounded_once() -> None:
    """cos/sin of `position * inv_freq` (the float32 frequencies) rounded once to float32, out to Llama-3's
    131k positions: a float32 angle alone would be 4e-3 off there, and 1.5e-5 at position 511."""
    scaling = RopeScaling(type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192)
    rope = RotaryEmbedding(64, 500000.0, scaling)
    positions = torch.cat([torch.arange(4096), torch.arange(4096, 131072, 61), torch.tensor([131071])])[None]
    cos, sin = rope(positions, torch.float32)
    angles = positions[0, :, None].double() * rope.inv_freq.double()
    torch.testing.assert_close(cos[0, :, :32], angles.cos().float(), rtol=0, atol=0)
    torch.testing.assert_close(sin[0, :, 32:], angles.sin().float(), rtol=0, atol=0)


def test_frequencies_land_on_the_default_device() -> None:
    """Computed on the CPU (a GPU's float32 pow may round differently), then moved where the model is built."""
    with torch.device("meta"):
        rope = RotaryEmbedding(64, 500000.0)
    assert rope.inv_freq.device.type == "meta"


def test_odd_head_dim_rejected() -> None:
    with pytest.raises(ValueError, match="head_dim, got 7"):
        rope_inv_freq(7, 10000.0)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_registry_rope_equals_apply_rope_on_token_rows(qk_norm: bool) -> None:
    """The model's registry call on [B*T, H, D] views is apply_rope (after rms_norm when qk_norm), exactly in fp32."""
    from tessera.kernels import registry

    torch.manual_seed(0)
    b, t, d = 2, 5, 32
    qkv = torch.randn(b, t, (4 + 2 * 2) * d)  # head slices of a fused projection: non-contiguous rows
    q, k = qkv[..., : 4 * d].view(b, t, 4, d), qkv[..., 4 * d : 6 * d].view(b, t, 2, d)
    cos, sin = RotaryEmbedding(d, 10000.0)(torch.randint(0, 500, (b, t)), torch.float32)
    rows = (q.reshape(b * t, 4, d), k.reshape(b * t, 2, d), cos.reshape(b * t, d), sin.reshape(b * t, d))
    if qk_norm:
        wq, wk = torch.randn(d), torch.randn(d)
        got = registry("rope_qk_norm", *rows, wq, wk, 1e-6)
        q, k = registry("rms_norm", q, wq, 1e-6), registry("rms_norm", k, wk, 1e-6)
    else:
        got = registry("rope", *rows)
    torch.testing.assert_close(got[0].view(b, t, 4, d), apply_rope(q, cos, sin), rtol=0, atol=0)
    torch.testing.assert_close(got[1].view(b, t, 2, d), apply_rope(k, cos, sin), rtol=0, atol=0)
