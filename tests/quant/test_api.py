"""`quantize` / `save_quantized` / `load_quantized` on a small `Transformer`: module swap, outputs
against the float model, AWQ's folding invariance, save -> load identity, config mismatches and
layers a method cannot handle."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from tessera.model import Transformer
from tessera.quant import (
    FP8Linear,
    Int4Linear,
    Int8Linear,
    QuantConfigMismatch,
    load_quantized,
    quantize,
    save_quantized,
)
from tessera.quant.awq import apply_awq, calibration_batch
from tessera.specs import ModelConfig, QuantConfig

CFG = ModelConfig(vocab_size=320, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=256, max_seq_len=64,
                  tie_embeddings=True)
MHA = CFG.model_copy(update={"n_kv_heads": 4, "tie_embeddings": False, "attention_bias": True})

CONFIGS = {
    "int8": QuantConfig(method="int8"),
    "fp8": QuantConfig(method="fp8"),
    "fp8_tensor": QuantConfig(method="fp8", weight_scale="per_tensor"),
    "int4_rtn": QuantConfig(method="int4_rtn", group_size=64),
    "awq": QuantConfig(method="awq", group_size=64, n_grid=5, clip_grid=10, calib_samples=4, calib_seq_len=32),
}
# Relative logit error vs. the float model on random weights: a step of each format on weights of
# std 0.02 (int8: 1/127 of the row max; fp8: 2^-4 relative; int4: 1/15 of the group range).
MAX_REL_ERR = {"int8": 0.02, "fp8": 0.08, "fp8_tensor": 0.1, "int4_rtn": 0.3, "awq": 0.3}
MODULE = {"int8": Int8Linear, "fp8": FP8Linear, "fp8_tensor": FP8Linear, "int4_rtn": Int4Linear, "awq": Int4Linear}


def _model(cfg: ModelConfig = CFG, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # non-trivial norms and a few large-activation channels, as trained models have
        for layer in model.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
            layer.input_layernorm.weight[:4] *= 8
            layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    return model


def _ids(seed: int, rows: int = 2, t: int = 24) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (rows, t), generator=torch.Generator().manual_seed(seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_quantize_swaps_linears_and_stays_close(name: str) -> None:
    model = _model()
    ids = _ids(1)
    with torch.no_grad():
        ref = model(ids)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    quantize(model, CONFIGS[name], _ids(2, 6, 32), progress=False)
    for n in names:
        expected = nn.Linear if n == "lm_head" else MODULE[name]
        assert isinstance(model.get_submodule(n), expected), n
    with torch.no_grad():
        out = model(ids)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert _rel(out, ref) < MAX_REL_ERR[name]
    assert model.quant_config == CONFIGS[name]


@pytest.mark.parametrize("model_cfg", [MHA, CFG.model_copy(update={"attention_bias": True})], ids=["mha", "gqa"])
def test_awq_folding_preserves_the_float_function(model_cfg: ModelConfig) -> None:
    """Without clipping, AWQ's transform only moves scales between ops (norm -> q/k/v, v -> o when the
    shapes match, norm -> gate/up, up -> down): the float model is unchanged."""
    model = _model(model_cfg)
    ids = _ids(3)
    with torch.no_grad():
        ref = model(ids)
        before = {n: p.clone() for n, p in model.named_parameters()}
    cfg = CONFIGS["awq"].model_copy(update={"clip_search": False})
    plan = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    apply_awq(model, cfg, _ids(4, 4, 32), plan, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref, rtol=1e-4, atol=1e-4)
    # and every scale group did move scales (alpha = 0 would leave its prev op untouched)
    prevs = ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"]
    if model_cfg.n_kv_heads == model_cfg.n_heads:
        prevs.append("self_attn.v_proj")
    for prev in prevs:
        name = f"model.layers.1.{prev}.weight"
        assert not torch.equal(before[name], model.get_parameter(name)), name


def test_awq_beats_rtn_on_outlier_channels() -> None:
    """With a few input channels carrying 8x the activation, AWQ's error is below RTN's at the same
    group size (the search includes alpha=0, i.e. RTN, so it can only tie or win on calibration data)."""
    model = _model()
    ids = _ids(5, 4, 32)
    with torch.no_grad():
        ref = model(ids)
    errs = {}
    for name in ("int4_rtn", "awq"):
        q = quantize(copy.deepcopy(model), CONFIGS[name], _ids(6, 8, 32), progress=False)
        with torch.no_grad():
            errs[name] = _rel(q(ids), ref)
    assert errs["awq"] < errs["int4_rtn"], errs


@pytest.mark.parametrize("name", ["int8", "fp8_tensor", "awq"])
def test_save_load_round_trip_is_exact(tmp_path: Path, name: str) -> None:
    cfg = MHA if name == "awq" else CFG
    model = quantize(_model(cfg), CONFIGS[name], _ids(7, 4, 32), progress=False)
    ids = _ids(8)
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path, config=CONFIGS[name])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert ("lm_head.weight" in keys) == (not cfg.tie_embeddings)
    assert not any(k.endswith("proj.weight") and k.replace(".weight", ".weight_scale") not in keys for k in keys)


def test_load_refuses_mismatched_config(tmp_path: Path) -> None:
    model = quantize(_model(), CONFIGS["int4_rtn"], progress=False)
    save_quantized(model, tmp_path)
    with pytest.raises(QuantConfigMismatch, match="group_size: checkpoint 64 vs requested 128"):
        load_quantized(tmp_path, config=QuantConfig(method="int4_rtn"))
    with pytest.raises(QuantConfigMismatch, match="method='int4_rtn', not 'awq'"):
        load_quantized(tmp_path, config="awq")
    load_quantized(tmp_path, config="int4_rtn")


def test_load_detects_tampered_weights(tmp_path: Path) -> None:
    save_quantized(quantize(_model(), CONFIGS["int8"], progress=False), tmp_path)
    data = bytearray((tmp_path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_quantized(tmp_path)


def test_load_rejects_tensors_that_contradict_the_card(tmp_path: Path) -> None:
    save_quantized(quantize(_model(), CONFIGS["int8"], progress=False), tmp_path)
    card = (tmp_path / "modelcard.json").read_text().replace('"method": "int8"', '"method": "fp8"')
    (tmp_path / "modelcard.json").write_text(card)
    with pytest.raises(ValueError, match=r"layer 'model.layers.0.self_attn.q_proj': weight dtype torch.int8"):
        load_quantized(tmp_path)


def test_unsupported_layer_raises_or_is_skipped() -> None:
    cfg = CFG.model_copy(update={"d_ff": 192})  # down_proj has in_features 192, not a multiple of 128
    with pytest.raises(ValueError, match=r"layer 'model.layers.0.mlp.down_proj' \(weight shape \(128, 192\)\)"):
        quantize(_model(cfg), QuantConfig(method="int4_rtn"), progress=False)
    model = quantize(_model(cfg), QuantConfig(method="int4_rtn", skip_unsupported=True), progress=False)
    assert isinstance(model.model.layers[0].mlp.down_proj, nn.Linear)
    assert isinstance(model.model.layers[0].mlp.up_proj, Int4Linear)


def test_awq_needs_calibration_and_refuses_requantizing() -> None:
    with pytest.raises(ValueError, match="needs calibration data"):
        quantize(_model(), CONFIGS["awq"], None, progress=False)
    model = quantize(_model(), CONFIGS["int8"], progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        quantize(model, CONFIGS["fp8"], progress=False)


def test_calibration_batch_windows_sequences() -> None:
    batch = calibration_batch([[1, 2, 3], [4, 5, 6, 7, 8]], samples=10, seq_len=3)
    assert batch.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert calibration_batch([[1, 2]], samples=4, seq_len=8).tolist() == [[1, 2]]
    assert calibration_batch(torch.arange(20).view(4, 5), samples=2, seq_len=3).tolist() == [[0, 1, 2], [5, 6, 7]]
    with pytest.raises(ValueError, match="no tokens"):
        calibration_batch([[]], samples=1, seq_len=4)
