"""`attention.decode_paged_write` and `attention.decode_paged_rope`: a decode step's cache write (and rope)
inside the paged decode launch. Parity with the references runs in test_parity; here, on a GPU, the fused
write gives exactly the bits of `kv_cache.write` followed by `attention.decode_paged` (the same kernel reads
the same cache), for contexts that put the newest position in every split, eager and replayed from a CUDA
graph, where a write that raced its read would show; and the fused rope matches the rope kernels.

On the H200 (2026-12-05, c6c1a8b) the write tests and the refusal test passed; the plain-rope test
failed its bit equality of the output before it was relaxed to the tolerance, as the note there says."""

from __future__ import annotations

import pytest
import torch

from tessera.kernels.triton import kv_cache
from tessera.kernels.triton import paged_attention as pa


def _case(batch: int, hq: int, hkv: int, hd: int, page: int, width: int, dev: torch.device) -> dict:
    gen = torch.Generator(device=dev).manual_seed(batch * 1000 + hq)
    blocks = batch * width + 1
    k_cache = torch.randn(blocks, page, hkv, hd, device=dev, dtype=torch.bfloat16, generator=gen)
    tables = (torch.randperm(blocks - 1, device=dev, generator=gen)[: batch * width] + 1).view(batch, width)
    return {"q": torch.randn(batch, hq, hd, device=dev, dtype=torch.bfloat16, generator=gen),
            "k": torch.randn(batch, hkv, hd, device=dev, dtype=torch.bfloat16, generator=gen),
            "v": torch.randn(batch, 2 * hkv, hd, device=dev, dtype=torch.bfloat16, generator=gen)[:, ::2],
            "k_cache": k_cache, "v_cache": torch.randn_like(k_cache), "tables": tables.to(torch.int32)}


def _slots(tables: torch.Tensor, lens: torch.Tensor, page: int) -> torch.Tensor:
    pos = (lens - 1).long()
    return tables.long().gather(1, (pos // page)[:, None])[:, 0] * page + pos % page


@pytest.mark.gpu
@pytest.mark.parametrize("batch,hq,hkv", [(1, 16, 8), (4, 32, 8), (16, 16, 8)])
def test_fused_write_gives_the_bits_of_write_then_decode(batch: int, hq: int, hkv: int) -> None:
    dev, hd, page, width = torch.device("cuda"), 128, 16, 64
    c = _case(batch, hq, hkv, hd, page, width, dev)
    gen = torch.Generator(device=dev).manual_seed(7)
    for trial in range(40):  # lengths that move the newest position through every split and tile
        lens = torch.randint(1, width * page + 1, (batch,), device=dev, generator=gen, dtype=torch.int32)
        if trial == 0:
            lens[0] = 1
        slots = _slots(c["tables"], lens, page)
        if batch > 1:
            slots[-1] = -1  # a padding lane: nothing written, its context read as it is
        kc, vc = c["k_cache"].clone(), c["v_cache"].clone()
        kv_cache.kv_cache_write(c["k"], c["v"], kc, vc, slots)
        want = pa.attention_decode_paged(c["q"], kc, vc, c["tables"], lens)
        kf, vf = c["k_cache"].clone(), c["v_cache"].clone()
        got = pa.attention_decode_paged_write(c["q"], c["k"], c["v"], kf, vf, slots, c["tables"], lens)
        assert torch.equal(got, want), trial
        assert torch.equal(kf, kc) and torch.equal(vf, vc), trial


@pytest.mark.gpu
def test_fused_write_replays_from_a_cuda_graph() -> None:
    dev, hd, page, width, batch = torch.device("cuda"), 128, 16, 32, 8
    c = _case(batch, 16, 8, hd, page, width, dev)
    lens = torch.full((batch,), 1, device=dev, dtype=torch.int32)
    slots = _slots(c["tables"], lens, page)
    kf, vf = c["k_cache"].clone(), c["v_cache"].clone()
    out = pa.attention_decode_paged_write(c["q"], c["k"], c["v"], kf, vf, slots, c["tables"], lens)  # compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = pa.attention_decode_paged_write(c["q"], c["k"], c["v"], kf, vf, slots, c["tables"], lens)
    kc, vc = c["k_cache"].clone(), c["v_cache"].clone()
    for n in range(1, width * page, 37):  # each replay a step further along every sequence
        lens.fill_(n)
        slots.copy_(_slots(c["tables"], lens, page))
        c["k"].normal_()
        graph.replay()
        kv_cache.kv_cache_write(c["k"], c["v"], kc, vc, slots)
        want = pa.attention_decode_paged(c["q"], kc, vc, c["tables"], lens)
        assert torch.equal(out, want), n
    assert torch.equal(kf, kc) and torch.equal(vf, vc)


def test_supports_names_what_is_wrong() -> None:
    q = torch.zeros(2, 4, 32)
    cache = torch.zeros(5, 4, 2, 32)
    tables, lens = torch.zeros(2, 3, dtype=torch.int32), torch.ones(2, dtype=torch.int32)
    reasons = pa.supports_decode_write(q, torch.zeros(2, 3, 32), torch.zeros(2, 2, 32).half(), cache, cache,
                                       torch.zeros(2, dtype=torch.int32), tables, lens)
    text = " | ".join(reasons)
    assert "k.shape=(2, 3, 32) is not [B, Hkv, D]=(2, 2, 32)" in text
    assert "v.dtype=torch.float16" in text
    assert "slot_mapping (2,)/torch.int32 is not [B=2] int64" in text


@pytest.mark.gpu
@pytest.mark.parametrize("qk_norm", [False, True])
def test_fused_rope_matches_rope_then_write_then_decode(qk_norm: bool) -> None:
    """`attention.decode_paged_rope` against the Triton rope (or rope_qk_norm) kernel, the write and the decode.
    Plain rope runs the same expression (`rope.rotate_halves`, explicit fmas) elementwise, so the cached k
    has the same bits; the output is within the op's tolerance, since its q enters the dot from registers
    rather than memory (on the H200, 7 of 8192 elements differed by 1.2e-4 at magnitude 0.5). QK-norm's sum
    of squares is reduced over another register layout: caches too within tolerance."""
    from tessera.kernels import registry
    from tessera.kernels.triton import rope

    dev, hd, page, width, batch, hq, hkv = torch.device("cuda"), 128, 16, 64, 4, 16, 8
    c = _case(batch, hq, hkv, hd, page, width, dev)
    gen = torch.Generator(device=dev).manual_seed(3)
    angles = torch.randint(0, 4096, (batch, 1), device=dev, generator=gen) * 1e4 ** (-torch.arange(
        0, hd, 2, device=dev) / hd)
    emb = torch.cat((angles, angles), -1)
    cos, sin = emb.cos().bfloat16(), emb.sin().bfloat16()
    weights = (torch.rand(hd, device=dev, dtype=torch.bfloat16) + 0.5,
               torch.rand(hd, device=dev, dtype=torch.bfloat16) + 0.5) if qk_norm else None
    tol = registry.catalogue["attention.decode_paged_rope"].tolerance("bfloat16")
    for _ in range(20):
        lens = torch.randint(1, width * page + 1, (batch,), device=dev, generator=gen, dtype=torch.int32)
        slots = _slots(c["tables"], lens, page)
        if weights is None:
            qr, kr = rope.rope(c["q"], c["k"], cos, sin)
        else:
            qr, kr = rope.rope_qk_norm(c["q"], c["k"], cos, sin, *weights, 1e-6)
        kc, vc = c["k_cache"].clone(), c["v_cache"].clone()
        want = pa.attention_decode_paged_write(qr, kr, c["v"], kc, vc, slots, c["tables"], lens)
        kf, vf = c["k_cache"].clone(), c["v_cache"].clone()
        qw, kw = weights if weights is not None else (None, None)
        got = pa.attention_decode_paged_rope(c["q"], c["k"], c["v"], cos, sin, kf, vf, slots, c["tables"], lens,
                                             q_weight=qw, k_weight=kw)
        torch.testing.assert_close(got, want, atol=tol.atol, rtol=tol.rtol)
        if weights is None:
            assert torch.equal(kf, kc)
        else:
            torch.testing.assert_close(kf, kc, atol=tol.atol, rtol=tol.rtol)
        assert torch.equal(vf, vc)


@pytest.mark.gpu
def test_a_context_leaves_to_the_separate_ops_what_the_fused_kernel_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU the fused ops' fallback would be the reference, which reads context lengths on the host (no
    CUDA graph could hold it): `PagedKVContext` hands such a step back to the separate ops instead."""
    from tessera.attn import PagedAttentionMetadata, PagedKVCache, PagedKVContext, paged_cache
    from tessera.specs import KVCacheHandle, KVCacheSpec

    monkeypatch.setattr(paged_cache, "FUSED_DECODE", True)  # off by default
    dev = torch.device("cuda")
    spec = KVCacheSpec(n_layers=1, n_kv_heads=2, head_dim=64, block_size=16, num_blocks=4, dtype="bfloat16")
    handle = KVCacheHandle(seq_id=0, block_ids=(1, 2), num_tokens=20, block_size=16)
    meta = PagedAttentionMetadata.from_handles([handle], [1], device=dev)
    ctx = PagedKVContext(PagedKVCache(spec, device=dev), meta)
    q, kv = torch.randn(1, 4, 64, device=dev, dtype=torch.bfloat16), torch.randn(1, 2, 64, device=dev,
                                                                                dtype=torch.bfloat16)
    cos, sin = torch.ones(1, 64, device=dev, dtype=torch.bfloat16), torch.zeros(1, 64, device=dev,
                                                                               dtype=torch.bfloat16)
    weight = torch.ones(128, device=dev, dtype=torch.bfloat16)[::2]  # a strided norm weight: refused
    assert ctx.attend_rotary(0, q, kv, kv, cos, sin, (weight, weight, 1e-6)) is None
    assert ctx.attend_rotary(0, q, kv, kv, cos, sin, (weight.contiguous(), weight.contiguous(), 1e-6)) is not None
