"""Run under TRITON_INTERPRET=1 (one program): decode steps of int8 weight-only and int4 (RTN, groups of 32)
models through the persistent launch against the per-op path, on a one-row FlatKVCache (as
bench_quant.py's decode step) and a PagedKVContext, with and without HEAD_READY. Logits within 2e-5
(float32; the quantized products sum in another order), both caches equal. Prints `persistent-quant-ok`."""

from __future__ import annotations

import copy

import torch

from tessera.attn import FlatKVCache, PagedAttentionMetadata, PagedKVCache, PagedKVContext
from tessera.model import Transformer, fuse_projections, persistent
from tessera.quant import quantize
from tessera.specs import KVCacheHandle, KVCacheSpec, ModelConfig, QuantConfig

CFG = ModelConfig(vocab_size=61, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=96, qk_norm=True,
                  max_seq_len=64)


def flat_pair(model: Transformer, prompt: list[int]) -> tuple[FlatKVCache, FlatKVCache]:
    ref = FlatKVCache(CFG, 1, 24)
    model(torch.tensor([prompt]), positions=ref.positions(len(prompt)), kv=ref)
    ref.advance(len(prompt))
    got = copy.deepcopy(ref)
    return ref, got


def main() -> None:
    torch.manual_seed(0)
    base = Transformer(CFG).eval()
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    prompt = torch.randint(0, 61, (9,), generator=torch.Generator().manual_seed(2)).tolist()
    for method, programs, depth, ready in (("int8", None, 1, 0), ("int4_rtn", None, 2, 0), ("int8", 3, 2, 1),
                                           ("int4_rtn", 3, 1, 1)):
        persistent.STEP_PROGRAMS = programs  # 3: each phase a launch over three programs
        persistent.OPTIONS = {"DEPTH": depth}  # 2: two weight tiles in flight
        if ready:  # attention waits on per-head counts of q/k/v tiles, 16 rows a tile (the head dim)
            persistent.OPTIONS.update(HEAD_READY=1, BN_QKV=16)
        config = QuantConfig(method=method) if method == "int8" else QuantConfig(method=method, group_size=32)
        model = quantize(copy.deepcopy(base), config, progress=False)
        fuse_projections(model)
        with torch.inference_mode():
            ref, got = flat_pair(model, prompt)
            for tok in (7, 30):
                persistent.PERSISTENT_DECODE = False
                want = model(torch.tensor([[tok]]), positions=ref.positions(1), kv=ref)
                ref.advance(1)
                persistent.PERSISTENT_DECODE = True
                have = model(torch.tensor([[tok]]), positions=got.positions(1), kv=got)
                got.advance(1)
                assert persistent.launch_built(got), f"{method}: the persistent launch did not run"
                diff = (have - want).abs().max().item()
                assert diff <= 2e-5, f"{method}, flat cache: max |logit diff| {diff:.3g}"
            for a, b in zip(ref.k + ref.v, got.k + got.v):
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
            spec = KVCacheSpec(n_layers=2, n_kv_heads=2, head_dim=16, block_size=4, num_blocks=8, dtype="float32")
            caches = (PagedKVCache(spec), PagedKVCache(spec))
            blocks = (6, 1, 3)
            meta = PagedAttentionMetadata.from_handles([KVCacheHandle(seq_id=0, block_ids=blocks, num_tokens=9,
                                                                      block_size=4)], [9])
            persistent.PERSISTENT_DECODE = False
            model(torch.tensor([prompt]), kv=PagedKVContext(caches[0], meta))
            for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
                b.copy_(a)
            meta = PagedAttentionMetadata.from_handles([KVCacheHandle(seq_id=0, block_ids=blocks, num_tokens=10,
                                                                      block_size=4)], [1])
            outs = []
            for on, cache in zip((False, True), caches):
                persistent.PERSISTENT_DECODE = on
                outs.append(model(torch.tensor([[7]]), positions=torch.tensor([[9]]), kv=PagedKVContext(cache, meta)))
            assert caches[1].__dict__.get("_persistent_decode"), f"{method}: the paged launch did not run"
            diff = (outs[1] - outs[0]).abs().max().item()
            assert diff <= 2e-5, f"{method}, paged cache: max |logit diff| {diff:.3g}"
        assert persistent.barrier_failures(model) == 0
        assert persistent.unmerged_heads(model) == 0
        assert persistent.unready_heads(model) == 0
        print(f"{method}, {programs or 1} programs, depth {depth}{', HEAD_READY' if ready else ''}: ok")
    print("persistent-quant-ok")


if __name__ == "__main__":
    main()
