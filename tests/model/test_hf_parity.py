"""HF import/export against `transformers` itself (CPU, fp32): random-init Llama, Llama-3-rope, linear-rope
Llama, Qwen2 and Qwen3 models saved by `transformers`, with config.json in the current (`rope_parameters`)
and the older (`rope_theta` + `rope_scaling`) format."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers

from tessera.attn import FlatKVCache
from tessera.model.hf import export_hf, load_hf
from tessera.model.transformer import Transformer

VOCAB = 101
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, bos_token_id=None,
            eos_token_id=None, pad_token_id=None)
# initializer_range 0.2 makes the random models' next-token distributions peaked, so greedy decoding
# does not hinge on near-ties at float32 rounding level.
VARIANTS = {
    "llama": ("LlamaForCausalLM", dict(initializer_range=0.2)),
    "llama3-rope": ("LlamaForCausalLM", dict(
        initializer_range=0.2, num_key_value_heads=1,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "llama-linear-rope": ("LlamaForCausalLM", dict(
        initializer_range=0.2, num_key_value_heads=4, tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})),
    "qwen2": ("Qwen2ForCausalLM", dict(initializer_range=0.2, rope_parameters={"rope_type": "default",
                                                                              "rope_theta": 1e6})),
    "qwen3": ("Qwen3ForCausalLM", dict(initializer_range=0.2, head_dim=24, tie_word_embeddings=True)),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """These models are tiny: on a shared CPU, intra-op threads cost more in hand-offs than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _to_legacy_config(path: Path) -> None:
    """Rewrite a transformers-5 config.json the way most published checkpoints carry RoPE."""
    cfg = json.loads(path.read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type")
    cfg["rope_scaling"] = None if kind == "default" else {"type": kind, **rope}
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    path.write_text(json.dumps(cfg))


def _save_hf(variant: str, fmt: str, directory: Path) -> transformers.PreTrainedModel:
    arch, extra = VARIANTS[variant]
    torch.manual_seed(sum(map(ord, variant)))
    config = transformers.AutoConfig.for_model(arch.removesuffix("ForCausalLM").lower(), **{**BASE, **extra})
    model = getattr(transformers, arch)(config).eval()
    # One variant per format goes through transformers' own sharded writer.
    shard = "40KB" if variant == "qwen2" else "2GB"
    model.save_pretrained(directory, max_shard_size=shard)
    if fmt == "legacy":
        _to_legacy_config(directory / "config.json")
        reread = transformers.AutoConfig.from_pretrained(directory)
        # The legacy file means the same to transformers (which keeps the legacy `type` key beside `rope_type`).
        assert {k: v for k, v in reread.rope_parameters.items() if k != "type"} == config.rope_parameters
    return model


def _greedy_ours(model: Transformer, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    cache = FlatKVCache(model.config, prompt.shape[0], prompt.shape[1] + steps)
    ids, out = prompt, []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(ids, positions=cache.positions(ids.shape[1]), kv=cache)
            cache.advance(ids.shape[1])
            ids = logits[:, -1].argmax(-1, keepdim=True)
            out.append(ids)
    return torch.cat(out, dim=1)


def _greedy_hf(model: transformers.PreTrainedModel, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps, min_new_tokens=steps,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[:, prompt.shape[1]:]


@pytest.mark.parametrize("fmt", ["current", "legacy"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_transformers(variant: str, fmt: str, tmp_path: Path) -> None:
    hf = _save_hf(variant, fmt, tmp_path / "hf")
    if variant == "qwen2":
        assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    ours = load_hf(tmp_path / "hf")
    assert ours.config.family == {"Llama": "llama", "Qwen2": "qwen2", "Qwen3": "qwen3"}[type(hf).__name__[:5]]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 37), generator=gen)
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)

    prompt = ids[:, :5]
    ours_tokens = _greedy_ours(ours, prompt, 32)
    hf_tokens = _greedy_hf(hf, prompt, 32)
    assert torch.equal(ours_tokens, hf_tokens)
    assert len(set(ours_tokens.flatten().tolist())) > 3  # a real continuation, not one repeated token

    export_hf(ours, tmp_path / "exported", max_shard_bytes=30_000 if variant == "llama" else 2**31)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    assert type(reloaded) is type(hf)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-4, rtol=0)
    assert torch.equal(load_hf(tmp_path / "exported")(ids), got)  # our own round trip is bit-exact
