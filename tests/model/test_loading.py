"""`load_model` tells tessera and HF directories apart and returns the tokenizer stored beside the weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from tessera.model.checkpoint import save_pretrained
from tessera.model.hf import export_hf
from tessera.model.loading import load_model, model_dir_kind
from tessera.model.tokenizer import Tokenizer
from tessera.model.transformer import Transformer
from tessera.specs import ModelConfig


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(["the cat sat on the mat; the dog sat on the log"] * 30, vocab_size=300)


@pytest.fixture(scope="module")
def model(tokenizer: Tokenizer) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                      tie_embeddings=True, eos_token_id=tokenizer.eos_token_id)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("kind", ["tessera", "hf"])
def test_either_kind_of_directory_loads_with_its_tokenizer(kind: str, model: Transformer, tokenizer: Tokenizer,
                                                           tmp_path: Path) -> None:
    if kind == "tessera":
        save_pretrained(model, tmp_path, tokenizer=tokenizer)
    else:
        export_hf(model, tmp_path, tokenizer)
    assert model_dir_kind(tmp_path) == kind
    loaded, tok = load_model(tmp_path)
    ids = torch.tensor([tokenizer.encode("the cat sat on the log")])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), atol=0, rtol=0)
    assert tok is not None and tok.encode("the dog<|im_end|>") == tokenizer.encode("the dog<|im_end|>")
    assert tok.eos_token_id == tokenizer.eos_token_id
    messages = [{"role": "user", "content": "sat?"}]
    assert tok.apply_chat_template(messages) == tokenizer.apply_chat_template(messages)
    half, _ = load_model(tmp_path, dtype=torch.bfloat16)
    assert half.lm_head.weight.dtype == torch.bfloat16


def test_hf_directory_without_tokenizer(tmp_path: Path) -> None:
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    hf.save_pretrained(tmp_path)
    loaded, tok = load_model(tmp_path)
    assert tok is None and loaded.config.vocab_size == 40


def test_card_wins_and_quantized_cards_point_to_quant(model: Transformer, tmp_path: Path) -> None:
    save_pretrained(model, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))  # would fail if it were read
    assert model_dir_kind(tmp_path) == "tessera"
    load_model(tmp_path)
    card = json.loads((tmp_path / "modelcard.json").read_text())
    (tmp_path / "modelcard.json").write_text(json.dumps({**card, "quant": {"method": "int8"}}))
    with pytest.raises(ValueError, match=r"tessera\.quant\.load_quantized"):
        load_model(tmp_path)


def test_neither_kind_is_named(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"neither modelcard\.json \(tessera\) nor config\.json"):
        load_model(tmp_path)
