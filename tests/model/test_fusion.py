"""Fused q/k/v and gate/up projections (`fuse_projections`): same outputs as the separate projections,
the same state_dict and memory, Parameters that are views of the fused weight, idempotence, and a
fall-back to the separate projections whenever the fused weight would be wrong or gradients are wanted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tessera.model import Transformer, fuse_projections
from tessera.model.hf import export_hf, load_hf
from tessera.specs import ModelConfig

CONFIGS = {
    "qwen3": dict(family="qwen3", qk_norm=True, head_dim=16),
    "qwen2-bias": dict(family="qwen2", attention_bias=True, tie_embeddings=True),
    "llama-mqa": dict(n_kv_heads=1),
}


def _pair(kind: str) -> tuple[Transformer, Transformer]:
    cfg = ModelConfig(**{**dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                                max_seq_len=64), **CONFIGS[kind]})
    torch.manual_seed(0)
    plain = Transformer(cfg)
    for p in plain.parameters():  # non-zero biases, so a misplaced bias row shows
        torch.nn.init.normal_(p, std=0.2)
    fused = Transformer(cfg)
    fused.load_state_dict(plain.state_dict())
    return plain, fused


def _unique_storage_bytes(model: torch.nn.Module) -> int:
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    return sum(storages.values())


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_fused_forward_equals_separate_projections(kind: str) -> None:
    plain, fused = _pair(kind)
    assert fuse_projections(fused) == 2 * fused.config.n_layers
    ids = torch.randint(0, 61, (3, 9))
    with torch.no_grad():
        torch.testing.assert_close(fused(ids), plain(ids), atol=1e-5, rtol=1e-5)
        layer = fused.model.layers[0]
        assert layer.self_attn.qkv.active(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)
        assert layer.mlp.gate_up.active(layer.mlp.gate_proj, layer.mlp.up_proj)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_state_dict_and_memory_are_unchanged_and_parameters_are_views(kind: str) -> None:
    plain, fused = _pair(kind)
    before_bytes = _unique_storage_bytes(fused)
    fuse_projections(fused)
    got, want = fused.state_dict(), plain.state_dict()
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert _unique_storage_bytes(fused) == before_bytes
    for layer in fused.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for fused_linear, parts in ((attn.qkv, (attn.q_proj, attn.k_proj, attn.v_proj)),
                                    (mlp.gate_up, (mlp.gate_proj, mlp.up_proj))):
            storage = fused_linear.weight.untyped_storage().data_ptr()
            assert all(p.weight.untyped_storage().data_ptr() == storage for p in parts)
            assert torch.equal(torch.cat([p.weight for p in parts]), fused_linear.weight)
            if fused_linear.bias is not None:
                assert all(p.bias.untyped_storage().data_ptr() == fused_linear.bias.untyped_storage().data_ptr()
                           for p in parts)
    with torch.no_grad():  # load_state_dict copies in place, so the fused weight follows
        fused.load_state_dict({k: v * 2 for k, v in want.items()})
        plain.load_state_dict({k: v * 2 for k, v in want.items()})
        ids = torch.randint(0, 61, (1, 7))
        torch.testing.assert_close(fused(ids), plain(ids), atol=1e-5, rtol=1e-5)


def test_fusing_is_idempotent() -> None:
    _, fused = _pair("qwen3")
    fuse_projections(fused)
    first = [(layer.self_attn.qkv, layer.mlp.gate_up) for layer in fused.model.layers]
    weight_ptr = fused.model.layers[0].self_attn.q_proj.weight.data_ptr()
    assert fuse_projections(fused) == 2 * fused.config.n_layers
    assert [(layer.self_attn.qkv, layer.mlp.gate_up) for layer in fused.model.layers] == first
    assert fused.model.layers[0].self_attn.q_proj.weight.data_ptr() == weight_ptr


def test_training_after_fusing_uses_separate_projections_and_keeps_fused_weight_in_sync() -> None:
    plain, fused = _pair("qwen2-bias")
    fuse_projections(fused)
    ids = torch.randint(0, 61, (2, 8))
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (plain, fused)]
    for model, opt in zip((plain, fused), opts):
        model(ids).float().logsumexp(-1).mean().backward()
        opt.step()
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        assert q.grad is not None, name
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)
    with torch.no_grad():  # the fused path now reads the stepped weights
        torch.testing.assert_close(fused(ids), plain(ids), atol=1e-5, rtol=1e-5)


def test_reallocated_or_replaced_projections_fall_back_until_fused_again() -> None:
    plain, fused = _pair("llama-mqa")
    fuse_projections(fused)
    fused.double()
    plain.double()
    ids = torch.randint(0, 61, (1, 5))
    attn = fused.model.layers[0].self_attn
    with torch.no_grad():
        assert not attn.qkv.active(attn.q_proj, attn.k_proj, attn.v_proj)
        torch.testing.assert_close(fused(ids), plain(ids))
        fuse_projections(fused)
        assert attn.qkv.weight.dtype == torch.float64
        assert attn.qkv.active(attn.q_proj, attn.k_proj, attn.v_proj)
        torch.testing.assert_close(fused(ids), plain(ids))
        attn.k_proj = torch.nn.Linear(32, attn.k_proj.out_features, bias=False, dtype=torch.float64)
        plain.model.layers[0].self_attn.k_proj = attn.k_proj
        assert not attn.qkv.active(attn.q_proj, attn.k_proj, attn.v_proj)
        torch.testing.assert_close(fused(ids), plain(ids))


def test_quantized_projections_fuse_through_their_own_class() -> None:
    quant = pytest.importorskip("tessera.quant")
    plain, fused = _pair("qwen3")
    quant.quantize(plain, "int8", progress=False)
    quant.quantize(fused, "int8", progress=False)
    assert fuse_projections(fused) == 2 * fused.config.n_layers
    assert isinstance(fused.model.layers[0].mlp.gate_up.fused, quant.Int8Linear)
    ids = torch.randint(0, 61, (1, 6))
    with torch.no_grad():  # one GEMM of a wider weight may round the last bit differently (as unquantized)
        torch.testing.assert_close(fused(ids), plain(ids))


def test_hf_export_of_a_fused_model_round_trips(tmp_path: Path) -> None:
    plain, fused = _pair("qwen3")
    fuse_projections(fused)
    export_hf(fused, tmp_path)
    reloaded = load_hf(tmp_path)
    ids = torch.randint(0, 61, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids), plain(ids), atol=1e-5, rtol=1e-5)


def test_routed_linears_keep_outputs_and_hooks() -> None:
    from tessera.model.fusion import route_decode_linears

    model, _ = _pair("qwen2-bias")
    ids = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(ids)
    seen = []
    model.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    plain = sum(type(m) is torch.nn.Linear for m in model.modules())
    assert route_decode_linears(model) == plain == route_decode_linears(model)  # idempotent
    with torch.no_grad():
        assert torch.equal(model(ids), want)  # CPU calls are F.linear as before
    assert seen == [want.shape]


def test_routed_down_projection_takes_the_fused_gate_up_output_unless_hooked() -> None:
    """With gate/up fused and the linears routed, each MLP hands its fused output to the down projection's
    `forward_gated` (on a CPU: silu_mul, then F.linear, as before); a forward hook on the down projection
    turns that off, so the hook still sees silu_mul's output."""
    from tessera.model.fusion import route_decode_linears

    _, model = _pair("qwen3")
    fuse_projections(model)
    ids = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(ids)
    route_decode_linears(model)
    mlps = [layer.mlp for layer in model.model.layers]
    calls = []
    for mlp in mlps:
        inner = mlp.down_proj.forward_gated
        mlp.down_proj.forward_gated = lambda gu, inner=inner: calls.append(tuple(gu.shape)) or inner(gu)
    with torch.no_grad():
        assert torch.equal(model(ids), want)
    assert calls == [(2, 7, 2 * model.config.d_ff)] * len(mlps)
    seen = []
    mlps[0].down_proj.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    with torch.no_grad():
        assert torch.equal(model(ids), want)
    assert seen == [(2, 7, model.config.d_ff)] and len(calls) == 2 * len(mlps) - 1


def test_chained_norms_go_to_the_fused_projections_unless_hooked(monkeypatch: pytest.MonkeyPatch) -> None:
    """With q/k/v and gate/up fused, every norm that adds a residual (the post-attention norm of each layer,
    the input norm of each layer after the first) runs through the fused projection's `matmul_normed`
    (`dense.normed_linear`; on a CPU the two ops, so the same bits); a forward hook on a layer's attention or
    MLP sends its norm back to the separate op, so the hook still sees the normalised input."""
    from tessera.model import fusion
    from tessera.model import layers as model_layers

    monkeypatch.setattr(model_layers, "FUSED_NORMS", True)  # opt-in (TESSERA_FUSED_NORM=1)
    _, model = _pair("qwen2-bias")
    fuse_projections(model)
    ids = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(5))
    calls = []
    original = fusion.normed_linear
    monkeypatch.setattr(fusion, "normed_linear", lambda x, *rest: calls.append(tuple(x.shape)) or original(x, *rest))
    with torch.no_grad():
        fused_out = model(ids)
    layers = model.config.n_layers
    assert calls == [(2, 7, 32)] * (2 * layers - 1)
    monkeypatch.setattr(fusion, "normed_linear", original)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.qkv = layer.mlp.gate_up = None
        torch.testing.assert_close(model(ids), fused_out, atol=1e-5, rtol=1e-5)  # all separate
    fuse_projections(model)
    monkeypatch.setattr(fusion, "normed_linear", lambda x, *rest: calls.append(tuple(x.shape)) or original(x, *rest))
    seen = []
    model.model.layers[1].self_attn.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape))
    model.model.layers[1].mlp.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape))
    calls.clear()
    with torch.no_grad():
        assert torch.equal(model(ids), fused_out)
    assert len(calls) == 2 * layers - 3 and len(seen) == 2


def test_a_plain_fused_gate_up_gives_swiglu_as_matmul_then_silu_mul() -> None:
    """`FusedProjections.swiglu` outside the int4 linears: not one op (`has_swiglu` False), but the fused matmul and
    then silu_mul, equal to silu(gate(x)) * up(x); q/k/v (three parts) is refused by name."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny-student")).eval()
    fuse_projections(model)
    mlp, attn = model.model.layers[0].mlp, model.model.layers[0].self_attn
    x = torch.randn(2, 3, model.config.d_model)
    with torch.inference_mode():
        assert not mlp.gate_up.has_swiglu()
        want = torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)
        torch.testing.assert_close(mlp.gate_up.swiglu(x), want)
        with pytest.raises(ValueError, match=r"sizes=\("):
            attn.qkv.swiglu(x)


def test_a_plain_fused_qkv_rope_is_matmul_rope_then_the_cache_write() -> None:
    """`FusedProjections.qkv_rope` outside the int4 linears: not one op (`has_qkv_rope` False), but the fused matmul,
    the rope op and the cache write: q and the caches as the reference ops composed by hand give them."""
    from tessera.kernels import reference

    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny-student")
    model = Transformer(cfg).eval()
    fuse_projections(model)
    attn = model.model.layers[0].self_attn
    hq, hkv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    x, cos, sin = torch.randn(3, cfg.d_model), torch.randn(3, d), torch.randn(3, d)
    k_cache, v_cache = torch.zeros(4, 2, hkv, d), torch.zeros(4, 2, hkv, d)
    slots = torch.tensor([5, -1, 0])
    want_k, want_v = k_cache.clone(), v_cache.clone()
    with torch.inference_mode():
        assert not attn.qkv.has_qkv_rope()
        q = attn.qkv.qkv_rope(x, cos, sin, k_cache, v_cache, slots, hq, hkv)
        wq, wk, wv = (p(x).view(3, -1, d) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        wq, wk = reference.rope(wq, wk, cos, sin)
        reference.kv_cache_write(wk, wv, want_k, want_v, slots)
    torch.testing.assert_close(q, wq)
    torch.testing.assert_close(k_cache, want_k)
    torch.testing.assert_close(v_cache, want_v)
