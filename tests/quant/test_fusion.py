"""Quantized q/k/v and gate/up projections fused into one module (`fuse_projections` on a quantized
model): same outputs as the separate modules, state_dict unchanged, reload works, and parts that
cannot share one module stay separate."""

from __future__ import annotations

import copy

import pytest
import torch

from tessera.model import Transformer, fuse_projections, layers
from tessera.quant import FP8Linear, Int4Linear, Int8Linear, QuantLinear, load_quantized, quantize, save_quantized
from tessera.specs import ModelConfig, QuantConfig

CONFIGS = {
    "int8": QuantConfig(method="int8"),
    "fp8": QuantConfig(method="fp8"),
    "int4_rtn": QuantConfig(method="int4_rtn", group_size=32),
    "awq": QuantConfig(method="awq", group_size=32, calib_samples=2, calib_seq_len=16, n_grid=3, clip_grid=3),
}


@pytest.fixture(scope="module")
def base() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny-student").model_copy(update={"attention_bias": True})
    return Transformer(cfg).eval()


@pytest.mark.parametrize("method", list(CONFIGS))
def test_fused_quantized_model_matches_separate_projections(base: Transformer, method: str, tmp_path) -> None:
    calib = torch.randint(0, base.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    model = quantize(copy.deepcopy(base), CONFIGS[method], calib, progress=False)
    ids = torch.randint(0, base.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        separate = model(ids)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        assert fuse_projections(model) == 2 * base.config.n_layers
        attn = model.model.layers[0].self_attn
        assert attn.qkv is not None and type(attn.qkv.fused) is type(attn.q_proj)
        assert attn.qkv.fused.out_features == sum(p.out_features for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        fused = model(ids)
        after = model.state_dict()
    torch.testing.assert_close(fused, separate)  # float32 defaults: a wider GEMM may round the last bit apart
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) and after[k].shape == before[k].shape for k in before)
    assert fuse_projections(model) == 2 * base.config.n_layers  # idempotent: the same objects stay
    assert model.model.layers[0].self_attn.qkv is attn.qkv

    save_quantized(model, tmp_path)
    with torch.inference_mode():
        torch.testing.assert_close(load_quantized(tmp_path)(ids), separate)


def test_a_replaced_part_falls_back_to_separate_modules(base: Transformer) -> None:
    model = quantize(copy.deepcopy(base), CONFIGS["int8"], None, progress=False)
    fuse_projections(model)
    mlp = model.model.layers[0].mlp
    assert mlp.gate_up.active(mlp.gate_proj, mlp.up_proj)
    # A load that re-allocates a buffer (not an in-place copy) breaks the view: fall back, stay correct.
    mlp.up_proj.weight = mlp.up_proj.weight.clone()
    mlp.up_proj.weight[0].zero_()
    assert not mlp.gate_up.active(mlp.gate_proj, mlp.up_proj)
    x = torch.randn(3, base.config.d_model)
    with torch.inference_mode():
        expected = mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        torch.testing.assert_close(mlp(x), expected, rtol=0, atol=0)


def test_an_in_place_load_updates_the_fused_module(base: Transformer) -> None:
    model = quantize(copy.deepcopy(base), CONFIGS["int8"], None, progress=False)
    fuse_projections(model)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        attn.k_proj.weight_scale.mul_(2)
    k_rows = slice(attn.q_proj.out_features, attn.q_proj.out_features + attn.k_proj.out_features)
    torch.testing.assert_close(attn.qkv.fused.weight_scale[k_rows], attn.k_proj.weight_scale, rtol=0, atol=0)
    assert attn.qkv.active(attn.q_proj, attn.k_proj, attn.v_proj)


def test_parts_that_cannot_share_a_module_stay_separate() -> None:
    per_tensor = tuple(FP8Linear(32, 16, weight_scale="per_tensor") for _ in range(2))
    assert FP8Linear.fuse_parts(per_tensor) is None  # one scale per part is not a row buffer
    groups = (Int4Linear(64, 16, group_size=32), Int4Linear(64, 16, group_size=64))
    assert Int4Linear.fuse_parts(groups) is None
    inputs = (Int8Linear(32, 16), Int8Linear(64, 16))
    assert Int8Linear.fuse_parts(inputs) is None
    bias = (Int8Linear(32, 16, bias=True), Int8Linear(32, 16))
    assert Int8Linear.fuse_parts(bias) is None
    fused = Int8Linear.fuse_parts((Int8Linear(32, 16), Int8Linear(32, 8)))
    assert fused is not None and fused.sizes == (16, 8) and fused.fused.weight.shape == (24, 32)


@pytest.mark.parametrize("kind", ["int8", "int4", "fp8"])
def test_forward_gated_is_forward_of_silu_mul(kind: str) -> None:
    """A quantized down projection's `forward_gated(gu)` on a fused gate/up output is its forward of
    silu_mul(gate, up) (on a CPU through the references, the same arithmetic exactly)."""
    torch.manual_seed(5)
    linear = torch.nn.Linear(64, 24, bias=True)
    module = {"int8": lambda: Int8Linear.from_linear(linear), "int4": lambda: Int4Linear.from_linear(linear, 32),
              "fp8": lambda: FP8Linear.from_linear(linear)}[kind]()
    gu = torch.randn(3, 5, 128)
    with torch.inference_mode():
        want = module(torch.nn.functional.silu(gu[..., :64]) * gu[..., 64:])
        assert torch.equal(module.forward_gated(gu), want)


def test_a_fused_int4_gate_up_gives_silu_mul_from_one_op(base: Transformer, monkeypatch) -> None:
    """An int4 model's fused gate/up has a one-op SwiGLU (`matmul.int4_awq_swiglu`, whose decode GEMV stores
    silu_mul): the MLP takes it, with the same output as the separate projections and silu_mul (on a CPU through
    the references, the same arithmetic exactly), and the down projection still runs as a module. int8, a biased
    or an odd-rowed int4 module has none, and asking one for it names why."""
    model = quantize(copy.deepcopy(base), CONFIGS["int4_rtn"], None, progress=False)
    fuse_projections(model)
    mlp = model.model.layers[0].mlp
    assert mlp.gate_up.has_swiglu()
    calls = []
    real = Int4Linear.forward_swiglu
    monkeypatch.setattr(Int4Linear, "forward_swiglu", lambda self, x: calls.append(x.shape) or real(self, x))
    downs = []
    mlp.down_proj.register_forward_pre_hook(lambda module, args: downs.append(args[0].shape))
    x = torch.randn(2, 3, base.config.d_model)
    with torch.inference_mode():
        got = mlp(x)
        want = mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    assert calls == [x.shape] and downs[0] == (2, 3, base.config.d_ff)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    monkeypatch.setattr(layers, "FUSED_SWIGLU", False)  # switched off: the projection, then silu_mul
    with torch.inference_mode():
        torch.testing.assert_close(mlp(x), want, rtol=0, atol=0)
    assert calls == [x.shape]

    int8 = quantize(copy.deepcopy(base), CONFIGS["int8"], None, progress=False)
    fuse_projections(int8)
    assert not int8.model.layers[0].mlp.gate_up.has_swiglu()
    biased = Int4Linear(64, 16, bias=True, group_size=32)
    odd = Int4Linear(64, 15, group_size=32)
    for module in (biased, odd):
        assert not module.has_swiglu()
        with pytest.raises(ValueError, match=f"out_features={module.out_features}, bias={module.bias is not None}"):
            module.forward_swiglu(torch.randn(1, 64))


@pytest.mark.parametrize("method", ["int4_rtn", "int8"])
def test_a_quantized_decode_step_rotates_and_writes_the_cache_in_its_qkv_op(monkeypatch, method: str) -> None:
    """An int4 or int8 model's fused q/k/v has a one-op rope and cache write (`matmul.int4_awq_qkv_rope`,
    `matmul.int8_weight_only_qkv_rope`). A one-token step
    through a `FlatKVCache` or a decode-only `PagedKVContext` takes it and attends to the cache
    (`attend_cached`); the logits and the caches equal those of the projection, rope and write apart (on a CPU
    through the references, the same arithmetic exactly), and with the switch off the op is not called. Prefill
    steps, a biased projection and a QK-norm model keep the separate ops."""
    from tessera.attn import FlatKVCache, PagedAttentionMetadata, PagedKVCache, PagedKVContext
    from tessera.specs import KVCacheHandle, KVCacheSpec

    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny-student")
    model = quantize(Transformer(cfg).eval(), CONFIGS[method], None, progress=False)
    fuse_projections(model)
    assert model.model.layers[0].self_attn.qkv.has_qkv_rope()
    calls = []
    real = QuantLinear.forward_qkv_rope
    monkeypatch.setattr(QuantLinear, "forward_qkv_rope",
                        lambda self, x, *a: calls.append(tuple(x.shape)) or real(self, x, *a))
    ids = torch.randint(0, cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(3))

    def flat(fused: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        monkeypatch.setattr(layers, "FUSED_QKV_ROPE", fused)
        cache = FlatKVCache(cfg, 2, 6)
        with torch.inference_mode():
            model(ids[:, :5], positions=cache.positions(5), kv=cache)
            cache.advance(5)
            step = model(ids[:, 5:], positions=cache.positions(1), kv=cache)
        return step, [t.clone() for t in (*cache.k, *cache.v)]

    want, want_caches = flat(False)
    assert calls == []
    got, got_caches = flat(True)
    assert calls == [(2, cfg.d_model)] * cfg.n_layers  # the step only, every layer; not the prefill
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(got_caches, want_caches))

    # a decode-only paged step: three sequences packed as one row, one token each
    spec = KVCacheSpec(n_layers=cfg.n_layers, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, block_size=4,
                       num_blocks=8, dtype="float32")
    handles = [KVCacheHandle(seq_id=i, block_ids=[2 * i, 2 * i + 1], num_tokens=5 + i, block_size=4) for i in range(3)]
    meta = PagedAttentionMetadata.from_handles(handles, [1, 1, 1])
    tokens = torch.randint(0, cfg.vocab_size, (1, 3), generator=torch.Generator().manual_seed(4))
    positions = torch.tensor([[4, 5, 6]])

    def paged(fused: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        monkeypatch.setattr(layers, "FUSED_QKV_ROPE", fused)
        torch.manual_seed(5)
        cache = PagedKVCache(spec)
        for t in (*cache.k, *cache.v):
            t.normal_()
        with torch.inference_mode():
            out = model(tokens, positions=positions, kv=PagedKVContext(cache, meta))
        return out, [*cache.k, *cache.v]

    calls.clear()
    want, want_caches = paged(False)
    got, got_caches = paged(True)
    assert calls == [(3, cfg.d_model)] * cfg.n_layers
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(got_caches, want_caches))

    biased = quantize(Transformer(cfg.model_copy(update={"attention_bias": True})).eval(), CONFIGS[method], None,
                      progress=False)
    fuse_projections(biased)
    assert not biased.model.layers[0].self_attn.qkv.has_qkv_rope()
    with pytest.raises(ValueError, match="bias=True"):
        biased.model.layers[0].self_attn.qkv.fused.forward_qkv_rope(torch.zeros(1, cfg.d_model), *[None] * 7)
