"""HF config translation, directory checks and the refusal of pickle weights."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from tessera.model.hf import UnsupportedModelError, config_from_hf, export_hf, hf_config_from, load_hf
from tessera.model.tokenizer import Tokenizer
from tessera.model.transformer import Transformer
from tessera.specs import ModelConfig

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64, "hidden_size": 32,
         "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False}


@pytest.mark.parametrize("name", ModelConfig.presets())
def test_presets_round_trip_through_hf_config(name: str) -> None:
    cfg = ModelConfig.preset(name)
    back = config_from_hf(hf_config_from(cfg))
    assert back.model_dump(exclude={"family"}) == cfg.model_dump(exclude={"family"})


@pytest.mark.parametrize("name", ["llama-3.2-1b", "qwen3-0.6b", "tiny-student"])
def test_exported_config_means_the_same_to_transformers(name: str, tmp_path: Path) -> None:
    cfg = ModelConfig.preset(name)
    (tmp_path / "config.json").write_text(json.dumps(hf_config_from(cfg)))
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert (hf.hidden_size, hf.num_hidden_layers, hf.num_key_value_heads, hf.head_dim) == (
        cfg.d_model, cfg.n_layers, cfg.n_kv_heads, cfg.head_dim)
    assert hf.rope_parameters["rope_theta"] == cfg.rope_theta
    if cfg.rope_scaling is not None:
        assert hf.rope_parameters["rope_type"] == cfg.rope_scaling.type
        assert hf.rope_parameters["factor"] == cfg.rope_scaling.factor


def test_legacy_rope_fields() -> None:
    linear = config_from_hf({**LLAMA, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert linear.rope_theta == 5e5 and linear.rope_scaling.type == "linear" and linear.rope_scaling.factor == 2.0
    llama3 = config_from_hf({**LLAMA, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                       "high_freq_factor": 4.0}})
    # Without original_max_position_embeddings transformers falls back to max_position_embeddings.
    assert llama3.rope_scaling.original_max_position_embeddings == 64
    current = config_from_hf({**LLAMA, "rope_parameters": {"rope_type": "default", "rope_theta": 1234.0}})
    assert current.rope_theta == 1234.0 and current.rope_scaling is None


def test_family_quirks() -> None:
    qwen2 = config_from_hf({**LLAMA, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"})
    assert qwen2.attention_bias and not qwen2.qk_norm
    qwen3 = config_from_hf({**LLAMA, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"})
    assert qwen3.qk_norm and qwen3.head_dim == 128  # Qwen3Config's default head_dim, not hidden/heads
    eos_list = config_from_hf({**LLAMA, "eos_token_id": [3, 5], "bos_token_id": 1})
    assert (eos_list.bos_token_id, eos_list.eos_token_id) == (1, 3)
    with pytest.warns(UserWarning, match="eos_token_id=151643"):
        assert config_from_hf({**LLAMA, "eos_token_id": 151643}).eos_token_id is None


@pytest.mark.parametrize(("override", "named"), [
    ({"model_type": "gpt2"}, "'gpt2'"),
    ({"architectures": ["LlamaForSequenceClassification"]}, "LlamaForSequenceClassification"),
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "'mistral'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn'"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "'dynamic'"),
    ({"hidden_act": "gelu"}, "'gelu'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, r"layers \[1\]"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
])
def test_unsupported_configs_fail_naming_the_thing(override: dict, named: str) -> None:
    with pytest.raises(UnsupportedModelError, match=named):
        config_from_hf({**LLAMA, **override})


def test_missing_field_is_named() -> None:
    with pytest.raises(ValueError, match="'hidden_size'"):
        config_from_hf({k: v for k, v in LLAMA.items() if k != "hidden_size"})


def _tiny_dir(tmp_path: Path) -> tuple[Path, Transformer]:
    model = Transformer(config_from_hf(LLAMA))
    export_hf(model, tmp_path)
    return tmp_path, model


def test_pickle_only_directories_are_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(ValueError, match=r"pickle weights \['pytorch_model.bin'\]"):
        load_hf(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "pytorch_model.bin"}}))
    with pytest.raises(ValueError, match="non-safetensors"):
        load_hf(tmp_path)


def test_safetensors_are_used_and_pickle_never_touched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory, model = _tiny_dir(tmp_path)
    (directory / "pytorch_model.bin").write_bytes(b"not even a pickle")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle was loaded")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    ids = torch.randint(0, 64, (1, 9))
    assert torch.equal(load_hf(directory)(ids), model(ids))


def test_missing_unexpected_and_misshapen_tensors_are_named(tmp_path: Path) -> None:
    directory, _ = _tiny_dir(tmp_path)
    tensors = load_file(str(directory / "model.safetensors"))
    good = dict(tensors)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(directory / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf(directory)
    save_file({**good, "model.layers.0.extra.weight": torch.zeros(2)}, str(directory / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.extra\.weight"):
        load_hf(directory)
    save_file({**good, "model.norm.weight": torch.ones(31)}, str(directory / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*\[31\]"):
        load_hf(directory)
    (directory / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        load_hf(directory)


def test_dtype_defaults_to_the_stored_one(tmp_path: Path) -> None:
    model = Transformer(config_from_hf(LLAMA))
    export_hf(model, tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_hf(tmp_path).lm_head.weight.dtype == torch.bfloat16
    loaded = load_hf(tmp_path, dtype=torch.float32)
    assert loaded.lm_head.weight.dtype == torch.float32
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.to(torch.bfloat16).float())


def test_tied_embeddings_stay_tied(tmp_path: Path) -> None:
    model = Transformer(ModelConfig.preset("tiny-student"))
    export_hf(model, tmp_path)
    assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))
    loaded = load_hf(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_features_pick_an_hf_family_that_holds_them_exactly(tmp_path: Path) -> None:
    """A Qwen2-family model without biases exports as Qwen2 with zero biases; a QK-norm model with
    biases exports as Qwen3 with a zero o_proj bias: transformers computes the same logits."""
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64)
    for cfg, arch in [(ModelConfig(**base, family="qwen2"), "Qwen2ForCausalLM"),
                      (ModelConfig(**base, qk_norm=True, attention_bias=True), "Qwen3ForCausalLM")]:
        torch.manual_seed(0)
        model = Transformer(cfg).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_()
        export_hf(model, tmp_path / arch)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / arch).eval()
        assert type(hf).__name__ == arch
        ids = torch.randint(0, 64, (2, 11))
        with torch.no_grad():
            torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-4, rtol=0)


def test_export_refuses_a_model_with_foreign_tensors(tmp_path: Path) -> None:
    model = Transformer(config_from_hf(LLAMA))
    model.model.layers[0].mlp.up_proj.register_buffer("scale", torch.ones(1))
    with pytest.raises(UnsupportedModelError, match=r"model\.layers\.0\.mlp\.up_proj\.scale"):
        export_hf(model, tmp_path)


def test_export_with_tokenizer_loads_in_transformers(tmp_path: Path) -> None:
    tok = Tokenizer.train(["hello world, hello tessera"] * 20, vocab_size=300)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=4, n_kv_heads=4,
                                    d_ff=48, eos_token_id=tok.eos_token_id))
    export_hf(model, tmp_path, tok)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "hello tessera<|im_end|>"
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf_tok.eos_token_id == tok.eos_token_id
    assert Tokenizer.from_dir(tmp_path).eos_token_id == tok.eos_token_id
