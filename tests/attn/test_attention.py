"""Attention paths of tessera.attn against torch's own scaled_dot_product_attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tessera.attn import FlatKVCache, PagedAttentionMetadata, PagedKVCache, PagedKVContext, causal_attention
from tessera.specs import KVCacheHandle, KVCacheSpec, ModelConfig


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """[B, T, H, D] layout in and out; GQA by repeating kv heads; bottom-right aligned causal mask."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    tq, tk = q.shape[1], k.shape[1]
    mask = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq) if causal else None
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


@pytest.mark.parametrize(("hq", "hkv"), [(4, 4), (6, 2), (5, 1)])
def test_causal_attention_matches_sdpa(hq: int, hkv: int) -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 11, hq, 8), torch.randn(3, 11, hkv, 8), torch.randn(3, 11, hkv, 8)
    torch.testing.assert_close(causal_attention(q, k, v), _sdpa(q, k, v), rtol=1e-5, atol=1e-5)


def test_flat_cache_attend_matches_sdpa_over_history() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=8, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=8)
    cache = FlatKVCache(cfg, batch_size=2, max_len=12)
    ks, vs = torch.randn(2, 10, 2, 4), torch.randn(2, 10, 2, 4)
    for start, n in [(0, 6), (6, 1), (7, 3)]:
        q = torch.randn(2, n, 4, 4)
        out = cache.attend(1, q, ks[:, start:start + n], vs[:, start:start + n])
        cache.advance(n)
        expect = _sdpa(q, ks[:, :start + n], vs[:, :start + n])
        torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.k[1][:, :10], ks, rtol=0, atol=0)
    assert not cache.k[0].any()  # layer 0 was never written


@pytest.mark.parametrize("max_len", [13, 513])
def test_flat_cache_hands_the_paged_kernels_a_layout_they_accept(max_len: int, monkeypatch) -> None:
    """The Triton paged kernels need power-of-two pages; any max_len must reach them, not the
    host-syncing reference (which also breaks CUDA-graph capture)."""
    pytest.importorskip("triton")
    import tessera.attn.flat_cache as flat
    from tessera.kernels.triton.paged_attention import _cache_reasons

    seen = []

    def spy(op: str, *args: torch.Tensor, **kwargs: object) -> torch.Tensor:
        seen.append((op, args))
        return real(op, *args, **kwargs)

    def spy_fused(op: str, *args: torch.Tensor, **kwargs: object):
        seen.append((op, args))
        return real_fused(op, *args, **kwargs)

    real, real_fused = flat.registry, flat.paged_cache.fused_impl
    monkeypatch.setattr(flat.paged_cache, "FUSED_DECODE", True)  # the fused write's layout (opt-in)
    monkeypatch.setattr(flat, "registry", spy)
    monkeypatch.setattr(flat.paged_cache, "fused_impl", spy_fused)
    cfg = ModelConfig(vocab_size=8, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=8)
    cache = FlatKVCache(cfg, batch_size=2, max_len=max_len)
    torch.manual_seed(0)
    for n in (5, 1):
        q, k, v = torch.randn(2, n, 4, 16), torch.randn(2, n, 2, 16), torch.randn(2, n, 2, 16)
        cache.attend(0, q, k, v)
        cache.advance(n)
    assert [op for op, _ in seen] == ["kv_cache.write", "attention.prefill_paged", "attention.decode_paged_write"]
    # the decode step's slots and context lengths are rows of tables built once, not new tensors
    q, _, _, k_cache, v_cache, slots, tables, lens = seen[2][1]
    assert slots.tolist() == [5, cache._slots.shape[0] + 5] and lens.tolist() == [6, 6]
    assert slots._base is cache._slots and lens._base is cache._lens
    assert _cache_reasons(q, k_cache, v_cache, tables, lens) == []
    q, k_cache, v_cache, tables, _, ctx, _ = seen[1][1]
    assert _cache_reasons(q, k_cache, v_cache, tables, ctx) == []


@pytest.mark.parametrize("decode", [False, True])
def test_paged_context_writes_slots_and_matches_sdpa(decode: bool) -> None:
    torch.manual_seed(0)
    spec = KVCacheSpec(n_layers=1, n_kv_heads=2, head_dim=8, block_size=3, num_blocks=9, dtype="float32")
    cache = PagedKVCache(spec)
    lens, qlens = [7, 4], ([1, 1] if decode else [3, 4])
    handles = [KVCacheHandle(seq_id=0, block_ids=(8, 1, 4), num_tokens=7, block_size=3),
               KVCacheHandle(seq_id=1, block_ids=(0, 6), num_tokens=4, block_size=3)]
    hist_k = [torch.randn(n, 2, 8) for n in lens]
    hist_v = [torch.randn(n, 2, 8) for n in lens]
    for h, hk, hv, n in zip(handles, hist_k, hist_v, qlens):  # tokens cached by earlier steps
        for p in range(h.num_tokens - n):
            s = h.slot(p)
            cache.k[0].view(-1, 2, 8)[s], cache.v[0].view(-1, 2, 8)[s] = hk[p], hv[p]
    meta = PagedAttentionMetadata.from_handles(handles, qlens)
    assert meta.decode_only == decode
    q = torch.randn(1, sum(qlens), 6, 8)
    new_k = torch.cat([hk[-n:] for hk, n in zip(hist_k, qlens)])[None]
    new_v = torch.cat([hv[-n:] for hv, n in zip(hist_v, qlens)])[None]
    out = PagedKVContext(cache, meta).attend(0, q, new_k, new_v)
    at = 0
    for hk, hv, n in zip(hist_k, hist_v, qlens):
        expect = _sdpa(q[:, at:at + n], hk[None], hv[None])
        torch.testing.assert_close(out[:, at:at + n], expect, rtol=1e-5, atol=1e-5)
        at += n
    for h, hk in zip(handles, hist_k):
        for p in range(h.num_tokens):
            torch.testing.assert_close(cache.k[0].view(-1, 2, 8)[h.slot(p)], hk[p], rtol=0, atol=0)


def test_paged_context_rejects_misshapen_steps() -> None:
    spec = KVCacheSpec(n_layers=1, n_kv_heads=1, head_dim=4, block_size=2, num_blocks=4, dtype="float32")
    handles = [KVCacheHandle(seq_id=s, block_ids=(s,), num_tokens=1, block_size=2) for s in range(2)]
    ctx = PagedKVContext(PagedKVCache(spec), PagedAttentionMetadata.from_handles(handles, [1, 1]))
    q, kv = torch.randn(1, 3, 2, 4), torch.randn(1, 3, 1, 4)
    with pytest.raises(ValueError, match="decode_only step with 3 tokens for 2 sequences"):
        ctx.attend(0, q, kv, kv)
    with pytest.raises(ValueError, match="packed as one row"):
        ctx.attend(0, q.expand(2, -1, -1, -1), kv.expand(2, -1, -1, -1), kv.expand(2, -1, -1, -1))


@pytest.mark.parametrize("qk_norm", [False, True])
def test_paged_context_rotary_decode_equals_rope_then_attend(qk_norm: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from tessera.attn import paged_cache
    from tessera.kernels import reference

    monkeypatch.setattr(paged_cache, "FUSED_DECODE", True)  # opt-in (TESSERA_FUSED_DECODE=1)

    torch.manual_seed(1)
    spec = KVCacheSpec(n_layers=2, n_kv_heads=2, head_dim=8, block_size=3, num_blocks=9, dtype="float32")
    handles = [KVCacheHandle(seq_id=0, block_ids=(8, 1, 4), num_tokens=7, block_size=3),
               KVCacheHandle(seq_id=1, block_ids=(0, 6), num_tokens=4, block_size=3)]
    caches = [PagedKVCache(spec), PagedKVCache(spec)]
    for layer in range(2):
        fill_k, fill_v = torch.randn(9, 3, 2, 8), torch.randn(9, 3, 2, 8)
        for c in caches:
            c.k[layer].copy_(fill_k)
            c.v[layer].copy_(fill_v)
    q, k, v = torch.randn(2, 6, 8), torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    cos, sin = torch.randn(2, 8), torch.randn(2, 8)
    norm = (torch.rand(8) + 0.5, torch.rand(8) + 0.5, 1e-6) if qk_norm else None
    decode = PagedAttentionMetadata.from_handles(handles, [1, 1])
    got = PagedKVContext(caches[0], decode).attend_rotary(1, q, k, v, cos, sin, norm)
    qr, kr = reference.rope_qk_norm(q, k, cos, sin, *norm) if qk_norm else reference.rope(q, k, cos, sin)
    want = PagedKVContext(caches[1], decode).attend(1, qr[None], kr[None], v[None])[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for a, b in ((caches[0].k[1], caches[1].k[1]), (caches[0].v[1], caches[1].v[1]), (caches[0].k[0], caches[1].k[0])):
        assert torch.equal(a, b)
    off = PagedKVContext(caches[0], decode)
    monkeypatch.setattr(paged_cache, "FUSED_DECODE", False)  # switched off, decode steps take the separate ops
    assert off.attend_rotary(1, q, k, v, cos, sin, norm) is None
    again = off.attend(1, qr[None], kr[None], v[None])[0]
    torch.testing.assert_close(again, want, rtol=0, atol=0)
    prefill = PagedAttentionMetadata.from_handles(handles, [2, 1])  # not decode-only: the caller ropes
    assert PagedKVContext(caches[0], prefill).attend_rotary(0, torch.randn(3, 6, 8), torch.randn(3, 2, 8),
                                                            torch.randn(3, 2, 8), cos[:1].expand(3, 8),
                                                            sin[:1].expand(3, 8)) is None


def test_flat_cache_decode_tables_are_the_step_rows_it_attends_with() -> None:
    cfg = ModelConfig(vocab_size=8, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=8)
    cache = FlatKVCache(cfg, batch_size=2, max_len=20)
    cache.advance(5)
    block, slots, tables, lens = cache.decode_tables()
    capacity = cache.k[0].shape[1]
    assert block == 16 and slots.tolist() == [5, capacity + 5] and lens.tolist() == [6, 6]
    assert tables.tolist() == [[0, 1], [2, 3]]
    k, v = cache.paged(1)
    assert k.shape == (4, 16, 2, 8) and k.data_ptr() == cache.k[1].data_ptr() and v.data_ptr() == cache.v[1].data_ptr()
    cache.advance(15)
    with pytest.raises(ValueError, match="overflows max_len=20"):
        cache.decode_tables()
