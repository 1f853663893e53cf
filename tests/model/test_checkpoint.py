"""Checkpoints: exact round trips (single file and shards), sha256 verification naming the file,
schema-version gating, quantized cards refused, no pickle anywhere on the load path."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tessera.model import Transformer
from tessera.model.checkpoint import (
    ChecksumError,
    load_pretrained,
    load_state_dict,
    model_from_state_dict,
    read_model_card,
    save_pretrained,
)
from tessera.specs import Lineage, ModelConfig, SpecVersionError


def _cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=53, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=40)
    return ModelConfig(**{**base, **kw})


def _model(cfg: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    return model


IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6], [5, 3, 5, 8, 9, 7, 9, 3]])


@pytest.mark.parametrize("kw", [dict(tie_embeddings=True), dict(qk_norm=True, attention_bias=True)])
def test_round_trip_gives_identical_logits(tmp_path: Path, kw: dict) -> None:
    model = _model(_cfg(**kw))
    lineage = Lineage(method="pretrain", steps=7, data=("corpus.txt",))
    save_pretrained(model, tmp_path, lineage=lineage)
    loaded = load_pretrained(tmp_path)
    assert loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(loaded(IDS), model(IDS))
    card = read_model_card(tmp_path)
    assert card.lineage == lineage and card.dtype == "float32"
    assert set(card.versions) >= {"tessera", "torch"} and card.versions["torch"] == torch.__version__
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        names = set(f.keys())
    expect = set(model.state_dict()) - ({"lm_head.weight"} if model.config.tie_embeddings else set())
    assert names == expect
    if model.config.tie_embeddings:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_sharded_save_and_load(tmp_path: Path) -> None:
    model = _model(_cfg(tie_embeddings=False))
    save_pretrained(model, tmp_path, max_shard_bytes=8_000)
    card = read_model_card(tmp_path)
    shards = sorted(f for f in card.weights if f.endswith(".safetensors"))
    assert len(shards) > 2 and "model.safetensors.index.json" in card.weights
    assert not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict()) and sorted(set(index["weight_map"].values())) == shards
    for shard in shards:  # each shard respects the limit unless it holds a single larger tensor
        with safe_open(tmp_path / shard, "pt") as f:
            sizes = [f.get_tensor(k).numel() * 4 for k in f.keys()]
        assert sum(sizes) <= 8_000 or len(sizes) == 1
    sd = load_state_dict(tmp_path)
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(load_pretrained(tmp_path)(IDS), model(IDS))
    save_pretrained(model, tmp_path)  # an unsharded re-save replaces the shards
    assert sorted(p.name for p in tmp_path.glob("model*.safetensors*")) == ["model.safetensors"]


def test_corrupted_or_missing_weight_file_is_named(tmp_path: Path) -> None:
    save_pretrained(_model(_cfg()), tmp_path, max_shard_bytes=8_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01  # one bit of one weight
    shard.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=shard.name):
        load_pretrained(tmp_path)
    shard.unlink()
    with pytest.raises(ChecksumError, match=f"{shard.name} listed in modelcard.json is missing"):
        load_state_dict(tmp_path)


def test_future_card_version_refused_and_quantized_card_redirected(tmp_path: Path) -> None:
    save_pretrained(_model(_cfg()), tmp_path)
    card_path = tmp_path / "modelcard.json"
    card = json.loads(card_path.read_text())
    card_path.write_text(json.dumps({**card, "schema_version": 2}))
    with pytest.raises(SpecVersionError, match="schema_version 2 is newer"):
        load_pretrained(tmp_path)
    card_path.write_text(json.dumps({**card, "quant": {"method": "int8"}}))
    with pytest.raises(ValueError, match=r"tessera\.quant\.load_quantized"):
        load_pretrained(tmp_path)


def test_config_that_does_not_fit_the_weights_is_refused(tmp_path: Path) -> None:
    save_pretrained(_model(_cfg()), tmp_path)
    card_path = tmp_path / "modelcard.json"
    card = json.loads(card_path.read_text())
    card["config"]["d_ff"] = 48
    card_path.write_text(json.dumps(card))
    with pytest.raises(ValueError, match="do not match its config"):
        load_pretrained(tmp_path)


def test_dtype_conversion_and_no_pickle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(_cfg())
    save_pretrained(model, tmp_path, dtype="bfloat16")
    assert read_model_card(tmp_path).dtype == "bfloat16"

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used on the load path")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    loaded = load_pretrained(tmp_path)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.model.rotary_emb.inv_freq.dtype == torch.float32
    as_fp32 = load_pretrained(tmp_path, dtype=torch.float32)
    expect = model.state_dict()["model.layers.1.mlp.up_proj.weight"].to(torch.bfloat16).float()
    assert torch.equal(as_fp32.state_dict()["model.layers.1.mlp.up_proj.weight"], expect)
    with pytest.raises(ValueError, match="int8"):
        save_pretrained(model, tmp_path / "x", dtype="int8")


def test_tokenizer_saved_beside_weights(tmp_path: Path) -> None:
    from tessera.model.tokenizer import Tokenizer

    texts = ["the quick brown fox jumps over the lazy dog"] * 20 + ["pack my box with five dozen liquor jugs"] * 20
    tok = Tokenizer.train(texts, vocab_size=300)
    save_pretrained(_model(_cfg()), tmp_path, tokenizer=tok)
    card = read_model_card(tmp_path)
    assert card.tokenizer is not None and card.tokenizer.vocab_size == tok.vocab_size
    assert card.tokenizer.eos_token_id == tok.eos_token_id
    again = Tokenizer.from_dir(tmp_path)
    assert again.encode(texts[-1]) == tok.encode(texts[-1])


def test_model_from_state_dict_ties_and_names_mismatches() -> None:
    model = _model(_cfg(tie_embeddings=True))
    tensors = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    built = model_from_state_dict(model.config, tensors, dtype="float32")
    assert built.lm_head.weight is built.model.embed_tokens.weight
    assert all(p.requires_grad for p in built.parameters())
    with torch.no_grad():
        assert torch.equal(built(IDS), model(IDS))
    built(IDS).sum().backward()  # trainable as built
    assert built.model.layers[0].mlp.up_proj.weight.grad is not None
    del tensors["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        model_from_state_dict(model.config, tensors)
