"""Checkpoints read and written without torch: round trips, shards, and every refusal names its cause."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from tessera.jaxref import init_params, load_checkpoint, save_checkpoint, to_hf_state
from tessera.jaxref.checkpoint import INDEX, hf_names
from tessera.specs import AWQConfig, ModelCard, ModelConfig

CFG = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=24, qk_norm=True,
                  attention_bias=True, tie_embeddings=True)


def _equal(a: dict, b: dict) -> bool:
    sa, sb = to_hf_state(a, CFG), to_hf_state(b, CFG)
    return sa.keys() == sb.keys() and all(np.array_equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("shard_bytes", [2**31, 2048])
def test_round_trip(tmp_path: Path, shard_bytes: int) -> None:
    params = init_params(CFG, seed=1)
    save_checkpoint(params, CFG, tmp_path, max_shard_bytes=shard_bytes)
    card = ModelCard.load(tmp_path / "modelcard.json")
    assert card.config == CFG and card.dtype == "float32"
    assert (INDEX in card.weights) == (shard_bytes < 2**31)
    loaded, cfg = load_checkpoint(tmp_path)
    assert cfg == CFG and _equal(loaded, params)
    save_checkpoint(params, CFG, tmp_path, max_shard_bytes=2**31 if shard_bytes < 2**31 else 2048)
    left = sorted(p.name for p in tmp_path.glob("model[.-]*"))
    assert left == sorted(ModelCard.load(tmp_path / "modelcard.json").weights), "earlier weight files left behind"
    assert _equal(load_checkpoint(tmp_path)[0], params)
    loaded16, _ = load_checkpoint(tmp_path, dtype="bfloat16")
    assert {str(x.dtype) for x in to_hf_state(loaded16, CFG).values()} == {"bfloat16"}


def test_tensor_names_are_the_hf_llama_names() -> None:
    names = hf_names(CFG)
    assert names[0] == "model.embed_tokens.weight" and "lm_head.weight" not in names
    assert "model.layers.1.self_attn.k_norm.weight" in names and "model.layers.0.self_attn.v_proj.bias" in names
    assert not any("o_proj.bias" in n for n in names)
    untied = ModelConfig.model_validate({**CFG.model_dump(), "tie_embeddings": False})
    assert hf_names(untied)[-1] == "lm_head.weight"
    shapes = to_hf_state(init_params(untied), untied)
    assert shapes["lm_head.weight"].shape == (32, 16)
    assert shapes["model.layers.0.mlp.down_proj.weight"].shape == (16, 24)


def test_corrupted_file_is_refused(tmp_path: Path) -> None:
    save_checkpoint(init_params(CFG), CFG, tmp_path)
    with (tmp_path / "model.safetensors").open("r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ValueError, match=r"sha256 of .*model\.safetensors"):
        load_checkpoint(tmp_path)


def test_quantized_and_missing_checkpoints_are_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"modelcard\.json"):
        load_checkpoint(tmp_path)
    save_checkpoint(init_params(CFG), CFG, tmp_path)
    card = ModelCard.load(tmp_path / "modelcard.json")
    card.model_copy(update={"quant": AWQConfig()}).dump(tmp_path / "modelcard.json")
    with pytest.raises(ValueError, match=r"quant\.method='awq'"):
        load_checkpoint(tmp_path)


def test_tensors_that_do_not_fit_the_config_are_named(tmp_path: Path) -> None:
    save_checkpoint(init_params(CFG), CFG, tmp_path)
    card = json.loads((tmp_path / "modelcard.json").read_text())
    card["config"]["qk_norm"] = False
    (tmp_path / "modelcard.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match="q_norm"):
        load_checkpoint(tmp_path)
    card["config"] |= {"qk_norm": True, "d_ff": 32}
    (tmp_path / "modelcard.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match=r"mlp.gate_proj.weight.*\(24, 16\).*\(32, 16\)"):
        load_checkpoint(tmp_path)
    card["config"] |= {"d_ff": 24, "n_layers": 3}
    (tmp_path / "modelcard.json").write_text(json.dumps(card))
    with pytest.raises(KeyError, match=r"model\.layers\.2"):
        load_checkpoint(tmp_path)


def test_mixed_dtypes_are_refused(tmp_path: Path) -> None:
    params = init_params(CFG)
    params["norm"] = params["norm"].astype(jnp.bfloat16)
    with pytest.raises(ValueError, match="one dtype"):
        save_checkpoint(params, CFG, tmp_path)


def test_importing_jaxref_never_imports_torch(tmp_path: Path) -> None:
    code = ("import sys, tessera.jaxref; "
            "assert 'optax' not in sys.modules, 'inference imported optax'; import tessera.jaxref.train; "
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'tessera.model', "
            "'tessera.attn', 'tessera.kernels'))); print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
