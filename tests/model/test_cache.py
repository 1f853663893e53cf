"""Incremental decoding through the flat and the paged cache equals the full forward (fp32, 1e-5)."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.attn import FlatKVCache, PagedAttentionMetadata, PagedKVCache, PagedKVContext
from tessera.model import Transformer
from tessera.specs import KVCacheHandle, KVCacheSpec, ModelConfig

ATOL = 1e-5


@st.composite
def configs(draw) -> ModelConfig:
    n_kv = draw(st.integers(1, 3))
    ratio = draw(st.sampled_from([1, 2, 3, 4]))  # 1: MHA; n_kv == 1 with ratio > 1: MQA
    return ModelConfig(
        vocab_size=draw(st.integers(8, 50)), d_model=draw(st.sampled_from([8, 16, 24])),
        n_layers=draw(st.integers(1, 2)), n_heads=n_kv * ratio, n_kv_heads=n_kv,
        head_dim=draw(st.sampled_from([2, 4, 8, 14])), d_ff=draw(st.integers(4, 32)),
        qk_norm=draw(st.booleans()), attention_bias=draw(st.booleans()), tie_embeddings=draw(st.booleans()),
        rope_theta=draw(st.sampled_from([100.0, 10000.0])), max_seq_len=64)


def _model(cfg: ModelConfig, seed: int) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so their code paths matter
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    return model


def _chunks(draw, total: int) -> list[int]:
    sizes, left = [], total
    while left:
        n = draw(st.integers(1, min(left, 5)))
        sizes.append(n)
        left -= n
    return sizes


@settings(max_examples=20, deadline=None)
@given(cfg=configs(), batch=st.integers(1, 3), data=st.data())
@torch.no_grad()
def test_flat_cache_chunked_prefill_then_decode_equals_full_forward(cfg, batch, data) -> None:
    model = _model(cfg, data.draw(st.integers(0, 2**16)))
    length = data.draw(st.integers(1, 17))
    ids = torch.randint(0, cfg.vocab_size, (batch, length))
    full = model(ids)
    prefill = data.draw(st.integers(1, length))
    steps = _chunks(data.draw, prefill) + [1] * (length - prefill)  # chunked prefill, then decode
    cache = FlatKVCache(cfg, batch, max_len=length + data.draw(st.integers(0, 3)))
    for n in steps:
        start = cache.length
        out = model(ids[:, start:start + n], positions=cache.positions(n), kv=cache)
        cache.advance(n)
        torch.testing.assert_close(out, full[:, start:start + n], rtol=0, atol=ATOL)
    assert cache.length == length


@settings(max_examples=20, deadline=None)
@given(cfg=configs(), data=st.data())
@torch.no_grad()
def test_paged_cache_equals_full_forward(cfg, data) -> None:
    """Several sequences of odd lengths share a pool of randomly assigned blocks; each step packs every
    unfinished sequence's next chunk (prefill chunks, then one-token decode steps with a padding lane)."""
    model = _model(cfg, data.draw(st.integers(0, 2**16)))
    block_size = data.draw(st.sampled_from([1, 2, 3, 4, 8]))
    lengths = data.draw(st.lists(st.integers(1, 13), min_size=1, max_size=4))
    need = [-(-n // block_size) for n in lengths]
    num_blocks = sum(need) + data.draw(st.integers(0, 3))
    order = data.draw(st.permutations(range(num_blocks)))
    tables, at = [], 0
    for n in need:
        tables.append(tuple(order[at:at + n]))
        at += n
    seqs = [torch.randint(0, cfg.vocab_size, (n,)) for n in lengths]
    fulls = [model(s[None])[0] for s in seqs]
    spec = KVCacheSpec(n_layers=cfg.n_layers, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                       block_size=block_size, num_blocks=num_blocks, dtype="float32")
    cache = PagedKVCache(spec, device="cpu")
    done = [0] * len(seqs)
    prefill = [data.draw(st.integers(1, n)) for n in lengths]
    plans = [_chunks(data.draw, p) + [1] * (n - p) for p, n in zip(prefill, lengths)]
    while any(plans):
        active = [i for i, plan in enumerate(plans) if plan]
        qlens = [plans[i].pop(0) for i in active]
        handles = [KVCacheHandle(seq_id=i, block_ids=tables[i], num_tokens=done[i] + n, block_size=block_size)
                   for i, n in zip(active, qlens)]
        meta = PagedAttentionMetadata.from_handles(handles, qlens)
        ids = torch.cat([seqs[i][done[i]:done[i] + n] for i, n in zip(active, qlens)])
        pos = torch.cat([torch.arange(done[i], done[i] + n) for i, n in zip(active, qlens)])
        if meta.decode_only and data.draw(st.booleans()):
            meta, ids, pos = _with_padding_lane(meta, ids, pos)
        out = model(ids[None], positions=pos[None], kv=PagedKVContext(cache, meta))[0]
        at = 0
        for i, n in zip(active, qlens):
            torch.testing.assert_close(out[at:at + n], fulls[i][done[i]:done[i] + n], rtol=0, atol=ATOL)
            at += n
            done[i] += n
    assert done == lengths


def _with_padding_lane(meta: PagedAttentionMetadata, ids: torch.Tensor, pos: torch.Tensor):
    """Append a padded decode lane (slot -1, empty context), as a CUDA-graph batch would."""
    padded = PagedAttentionMetadata(
        slot_mapping=torch.cat([meta.slot_mapping, torch.tensor([-1])]),
        block_tables=torch.cat([meta.block_tables, torch.zeros_like(meta.block_tables[:1])]),
        context_lens=torch.cat([meta.context_lens, torch.tensor([0], dtype=torch.int32)]),
        cu_seqlens_q=torch.cat([meta.cu_seqlens_q, meta.cu_seqlens_q[-1:] + 1]),
        max_seqlen_q=1, decode_only=True)
    return padded, torch.cat([ids, ids[:1]]), torch.cat([pos, torch.zeros(1, dtype=pos.dtype)])


def test_flat_cache_overflow_and_truncate() -> None:
    cfg = ModelConfig(vocab_size=11, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=8)
    model = _model(cfg, 0)
    ids = torch.randint(0, 11, (1, 6))
    cache = FlatKVCache(cfg, 1, max_len=4)
    with pytest.raises(ValueError, match="overflow max_len=4"):
        model(ids, kv=cache)
    with torch.no_grad():
        model(ids[:, :3], positions=cache.positions(3), kv=cache)
        cache.advance(3)
        cache.truncate(2)  # drop token 2, then write a different token in its place
        out = model(ids[:, 5:6], positions=cache.positions(1), kv=cache)
        cache.advance(1)
    expect = model(torch.cat([ids[:, :2], ids[:, 5:6]], dim=1))[:, -1:]
    torch.testing.assert_close(out, expect, rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate(4)


def test_paged_cache_refuses_int8_and_allocates_spec_layout() -> None:
    spec = KVCacheSpec(n_layers=2, n_kv_heads=3, head_dim=4, block_size=5, num_blocks=7, dtype="bfloat16")
    cache = PagedKVCache(spec)
    assert len(cache.k) == len(cache.v) == 2
    assert cache.k[1].shape == (7, 5, 3, 4) and cache.v[0].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="int8"):
        PagedKVCache(spec.model_copy(update={"dtype": "int8"}))


def test_metadata_from_handles_slots() -> None:
    h0 = KVCacheHandle(seq_id=0, block_ids=(5, 2), num_tokens=6, block_size=4)
    h1 = KVCacheHandle(seq_id=1, block_ids=(7,), num_tokens=1, block_size=4)
    meta = PagedAttentionMetadata.from_handles([h0, h1], [3, 1])
    assert meta.slot_mapping.tolist() == [23, 8, 9, 28]
    assert meta.block_tables.tolist() == [[5, 2], [7, 0]] and meta.block_tables.dtype == torch.int32
    assert meta.context_lens.tolist() == [6, 1] and meta.cu_seqlens_q.tolist() == [0, 3, 4]
    assert meta.max_seqlen_q == 3 and not meta.decode_only
    with pytest.raises(ValueError, match="query length 2"):
        PagedAttentionMetadata.from_handles([h1], [2])


@pytest.mark.parametrize("qk_norm", [False, True])
def test_a_paged_decode_step_runs_rope_write_and_attention_as_one_op(qk_norm: bool, monkeypatch) -> None:
    """The model hands a decode step's attention to `attention.decode_paged_rope` (one launch on a GPU), and a
    prefill step to rope, `kv_cache.write` and `attention.prefill_paged`; with the fusion switched off, decode
    goes back to the separate ops. The registry's backend choices are counted per op."""
    from tessera.attn import paged_cache
    from tessera.kernels import registry

    monkeypatch.setattr(paged_cache, "FUSED_DECODE", True)  # off by default (slower at batch 1 on the H200)

    cfg = ModelConfig(vocab_size=31, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=24,
                      qk_norm=qk_norm, max_seq_len=32)
    model = _model(cfg, 0)
    spec = KVCacheSpec(n_layers=2, n_kv_heads=2, head_dim=8, block_size=4, num_blocks=8, dtype="float32")
    cache = PagedKVCache(spec, device="cpu")
    calls: list[str] = []
    choose = type(registry).get

    def counting(self, op: str, *args, **kwargs):
        calls.append(op)
        return choose(self, op, *args, **kwargs)

    monkeypatch.setattr(type(registry), "get", counting)
    rope = "rope_qk_norm" if qk_norm else "rope"

    def step(ids: list[int], start: int, n: int) -> dict[str, int]:
        calls.clear()
        handle = KVCacheHandle(seq_id=0, block_ids=(3, 5), num_tokens=start + n, block_size=4)
        meta = PagedAttentionMetadata.from_handles([handle], [n])
        with torch.no_grad():
            model(torch.tensor([ids]), positions=torch.arange(start, start + n)[None], kv=PagedKVContext(cache, meta))
        return {op: calls.count(op) for op in set(calls)}

    prefill = step([1, 2, 3, 4, 5], 0, 5)
    assert prefill[rope] == prefill["kv_cache.write"] == prefill["attention.prefill_paged"] == 2
    assert "attention.decode_paged_rope" not in prefill
    decode = step([6], 5, 1)
    assert decode["attention.decode_paged_rope"] == 2
    assert not {rope, "kv_cache.write", "attention.decode_paged", "attention.decode_paged_write"} & set(decode)
    monkeypatch.setattr(paged_cache, "FUSED_DECODE", False)
    unfused = step([7], 6, 1)
    assert unfused[rope] == unfused["kv_cache.write"] == unfused["attention.decode_paged"] == 2
    assert "attention.decode_paged_rope" not in unfused


def test_decode_steps_take_the_separate_ops_by_default() -> None:
    """The fused rope/write/decode op is opt-in (TESSERA_FUSED_DECODE=1): a process started without it runs a
    decode step as rope, `kv_cache.write` and `attention.decode_paged`."""
    import subprocess
    import sys

    code = "from tessera.attn import paged_cache; from tessera.model import layers; " \
           "print(paged_cache.FUSED_DECODE, layers.FUSED_NORMS)"
    env = {k: v for k, v in os.environ.items() if k not in ("TESSERA_FUSED_DECODE", "TESSERA_FUSED_NORM")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
    env.update(TESSERA_FUSED_DECODE="1", TESSERA_FUSED_NORM="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]


def test_a_flat_cache_decode_step_also_runs_one_attention_op(monkeypatch) -> None:
    from tessera.attn import paged_cache
    from tessera.kernels import registry

    monkeypatch.setattr(paged_cache, "FUSED_DECODE", True)

    cfg = ModelConfig(vocab_size=31, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=24,
                      qk_norm=True, max_seq_len=32)
    model = _model(cfg, 1)
    ids = torch.randint(0, 31, (2, 6))
    cache = FlatKVCache(cfg, batch_size=2, max_len=8)
    calls: list[str] = []
    choose = type(registry).get
    monkeypatch.setattr(type(registry), "get",
                        lambda self, op, *a, **kw: calls.append(op) or choose(self, op, *a, **kw))
    with torch.no_grad():
        model(ids[:, :5], positions=cache.positions(5), kv=cache)
        cache.advance(5)
        calls.clear()
        step = model(ids[:, 5:], positions=cache.positions(1), kv=cache)[:, 0]
        full = model(ids)[:, 5]
    assert calls.count("attention.decode_paged_rope") == 2 and "kv_cache.write" not in calls
    torch.testing.assert_close(step, full, rtol=0, atol=ATOL)
