"""Transformer contract: module tree and names (== HF's), parameter counts, forward/hidden_states,
causality, initialisation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.model import Transformer
from tessera.specs import ModelConfig


def small_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64)
    return ModelConfig(**{**base, **kw})


@st.composite
def configs(draw) -> ModelConfig:
    n_kv = draw(st.integers(1, 3))
    n_heads = n_kv * draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([2, 4, 6, 8]))
    return ModelConfig(
        vocab_size=draw(st.integers(5, 40)), d_model=draw(st.integers(4, 24)), n_layers=draw(st.integers(1, 3)),
        n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, d_ff=draw(st.integers(1, 40)),
        tie_embeddings=draw(st.booleans()), qk_norm=draw(st.booleans()), attention_bias=draw(st.booleans()))


@pytest.mark.parametrize("name", ModelConfig.presets())
def test_preset_param_count_matches_module(name: str) -> None:
    cfg = ModelConfig.preset(name)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()


@settings(max_examples=25, deadline=None)
@given(configs())
def test_random_config_param_count_and_forward_shape(cfg: ModelConfig) -> None:
    model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()
    ids = torch.randint(0, cfg.vocab_size, (2, 5))
    assert model(ids).shape == (2, 5, cfg.vocab_size)


def _hf_model(kind: str):
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=48)
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, tie_word_embeddings=False)), \
            small_cfg()
    if kind == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, tie_word_embeddings=True)), \
            small_cfg(family="qwen2", attention_bias=True, tie_embeddings=True)
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=16, tie_word_embeddings=False)), \
        small_cfg(family="qwen3", qk_norm=True, head_dim=16)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_state_dict_names_and_shapes_equal_hf(kind: str) -> None:
    hf, cfg = _hf_model(kind)
    ours = Transformer(cfg).state_dict()
    theirs = hf.state_dict()
    assert sorted(ours) == sorted(theirs)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_tied_embeddings_share_storage() -> None:
    tied, untied = Transformer(small_cfg(tie_embeddings=True)), Transformer(small_cfg())
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def test_init_statistics() -> None:
    cfg = small_cfg(d_model=64, d_ff=256, vocab_size=512, attention_bias=True, qk_norm=True, init_std=0.05)
    model = Transformer(cfg)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith(".bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        else:
            assert abs(p.std().item() - 0.05) < 0.01 and abs(p.mean().item()) < 0.01, name


def test_hidden_states_contract() -> None:
    torch.manual_seed(0)
    model = Transformer(small_cfg(n_layers=3))
    ids = torch.randint(0, 61, (2, 9))
    h, collected = model.hidden_states(ids, collect=(0, 2))
    assert h.shape == (2, 9, 32) and set(collected) == {0, 2}
    torch.testing.assert_close(model.lm_head(h), model(ids), rtol=0, atol=0)
    # Block 2 is the last block: the final norm of its output is h.
    torch.testing.assert_close(model.model.norm(collected[2]), h, rtol=0, atol=0)
    with pytest.raises(IndexError, match=r"\[3\]"):
        model.hidden_states(ids, collect=(3,))


def test_default_positions_and_explicit_positions() -> None:
    torch.manual_seed(0)
    model = Transformer(small_cfg())
    ids = torch.randint(0, 61, (3, 8))
    pos = torch.arange(8).expand(3, 8)
    torch.testing.assert_close(model(ids), model(ids, positions=pos), rtol=0, atol=0)
    # RoPE scores depend on relative position only: a uniform shift keeps the logits, a gap changes them.
    torch.testing.assert_close(model(ids, positions=pos + 5), model(ids), rtol=1e-5, atol=1e-5)
    gapped = pos + (pos >= 4) * 3
    assert not torch.allclose(model(ids, positions=gapped)[:, 4:], model(ids)[:, 4:], atol=1e-3)
    with pytest.raises(ValueError, match="positions shape"):
        model(ids, positions=pos[:, :4])


def test_causal_and_rows_independent() -> None:
    torch.manual_seed(0)
    model = Transformer(small_cfg())
    ids = torch.randint(0, 61, (2, 10))
    ref = model(ids)
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 61
    out = model(changed)
    torch.testing.assert_close(out[:, :6], ref[:, :6], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out[:, 6:], ref[:, 6:])
    torch.testing.assert_close(model(ids[1:]), ref[1:], rtol=1e-6, atol=1e-6)


def test_bfloat16_cast_keeps_rope_frequencies_float32() -> None:
    model = Transformer(small_cfg()).to(torch.bfloat16)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    ids = torch.randint(0, 61, (1, 6))
    assert model(ids).dtype == torch.bfloat16


def test_projections_are_called_as_modules() -> None:
    model = Transformer(small_cfg(n_layers=1))
    seen = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            mod.register_forward_hook(lambda m, i, o, name=name: seen.append(name))
    model(torch.randint(0, 61, (1, 3)))
    assert sorted(seen) == sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))


class _CountingRegistry:
    """Stands in for the registry in the model's modules: counts op names, delegates the calls."""

    def __init__(self, real: object) -> None:
        self.real, self.calls = real, {}

    def __call__(self, op: str, *args: object) -> object:
        self.calls[op] = self.calls.get(op, 0) + 1
        return self.real(op, *args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_defers_each_residual_add_into_the_next_norm(dtype: torch.dtype, monkeypatch) -> None:
    from tessera.attn import FlatKVCache
    from tessera.model import layers, transformer

    cfg = ModelConfig.preset("tiny-student")
    torch.manual_seed(0)
    model = Transformer(cfg).to(dtype).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    counting = _CountingRegistry(layers.registry)
    monkeypatch.setattr(layers, "registry", counting)
    monkeypatch.setattr(transformer, "registry", counting)

    def run(grad: bool) -> tuple[torch.Tensor, torch.Tensor, dict]:
        counting.calls = {}
        with torch.set_grad_enabled(grad):
            full = model(ids)
            cache = FlatKVCache(cfg, 2, 9, dtype=dtype)
            model(ids[:, :8], positions=cache.positions(8), kv=cache)
            cache.advance(8)
            step = model(ids[:, 8:], positions=cache.positions(1), kv=cache)
        return full, step, dict(counting.calls)

    full, step, plain = run(grad=True)
    full_nograd, step_nograd, deferred = run(grad=False)
    # The same values, bit for bit: the fused op rounds each sum to the input dtype before normalising.
    assert torch.equal(full, full_nograd) and torch.equal(step, step_nograd)
    # Per forward: plain, n + 1 norms and n fused add-norms (and n separate adds); deferred, one norm (the
    # first block's) and 2n fused ones: n - 1 in front of blocks, n inside them, one final.
    n = cfg.n_layers
    assert plain["rms_norm"] == 3 * (n + 1) and plain["rms_norm_residual"] == 3 * n
    assert deferred["rms_norm"] == 3 and deferred["rms_norm_residual"] == 3 * 2 * n


def test_deferred_adds_step_aside_for_hooks_and_collection() -> None:
    from tessera.model.interp import capture

    cfg = ModelConfig.preset("tiny-student")
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 7))
    with torch.no_grad():
        want = model(ids)
        h, blocks = model.hidden_states(ids, collect=(0,))  # collected block outputs are materialised
        with capture(model, ["model.layers.0", "model.norm"]) as acts:
            got = model(ids)
    assert torch.equal(got, want) and torch.equal(model.lm_head(h), want)
    assert isinstance(acts["model.layers.0"], torch.Tensor) and torch.equal(acts["model.layers.0"], blocks[0])
    assert torch.equal(model.lm_head(acts["model.norm"]), want)
