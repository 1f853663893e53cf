"""Run under TRITON_INTERPRET=1: decode steps through the persistent launch
(`tessera.model.persistent`) against the per-op path on a copy of the same paged cache, for a QK-norm
model (Qwen3-like, 2 query heads a kv head) and a plain one (4 query heads on one kv head), at one and
at 16 context splits a head (most of them empty), over two consecutive steps with the blocks out of
order; and with each phase a launch of its own over 3 and 5 programs, so the spreading of tiles and work
items over programs is checked too (the interpreter runs programs one after another, so only the kernel
boundary can stand in for the grid barrier); three cases in five with two weight tiles in flight (DEPTH 2),
one of them loading a phase's first tiles after its barrier (PREFETCH false); one with L2_AHEAD 2 (the
prefetches compile to nothing here: this checks the option reaches the kernel and changes no result) and
its two splits a head set through OPTIONS.
Logits within 1e-5 (float32), both caches equal after each step, and every head's merge counter back at
zero (each split counted once). Prints `persistent-ok`."""

from __future__ import annotations

import sys

import torch

from tessera.attn import PagedAttentionMetadata, PagedKVCache, PagedKVContext
from tessera.model import Transformer, fuse_projections, persistent
from tessera.specs import KVCacheHandle, KVCacheSpec, ModelConfig

CONFIGS = {
    "qk-norm": ModelConfig(vocab_size=61, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=96,
                           qk_norm=True, max_seq_len=64),
    "mqa": ModelConfig(vocab_size=61, d_model=32, n_layers=3, n_heads=4, n_kv_heads=1, head_dim=16, d_ff=64,
                       max_seq_len=64),
}
BLOCKS = (5, 2, 9, 0)
#: (splits a head, programs, OPTIONS): one program in one launch; or each phase a launch over several programs
#: (tiles and work items spread and strided over them, pid past the last tile). DEPTH 2: two weight tiles in
#: flight a program (PREFETCH false: a phase's first tiles loaded after its barrier); SPLITS through OPTIONS
#: where the module's is None; HEAD_READY: attention waits on per-head counts of q/k/v tiles (two and one
#: tiles a head's q, k or v rows), which must come to the full count each step; POLL 2 (its sleep compiled out)
#: with one program, the barriers and the heads' waits polled as POLL 0.
CASES = ((1, None, {}), (16, None, {"DEPTH": 2}), (4, None, {"DEPTH": 2, "PREFETCH": False}),
         (None, 3, {"L2_AHEAD": 2, "SPLITS": 2}), (3, 5, {"DEPTH": 2}), (4, None, {"HEAD_READY": 1, "BN_QKV": 8}),
         (2, 3, {"HEAD_READY": 1, "BN_QKV": 16, "PREFETCH": False}),
         (2, None, {"POLL": 2, "HEAD_READY": 1, "BN_QKV": 8}))


def model_for(cfg: ModelConfig, seed: int) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    fuse_projections(model)
    return model


def step(model: Transformer, cache: PagedKVCache, ids: list[int], start: int) -> torch.Tensor:
    n = len(ids)
    handle = KVCacheHandle(seq_id=0, block_ids=BLOCKS, num_tokens=start + n, block_size=4)
    meta = PagedAttentionMetadata.from_handles([handle], [n])
    with torch.inference_mode():
        return model(torch.tensor([ids]), positions=torch.arange(start, start + n)[None],
                     kv=PagedKVContext(cache, meta))


def main(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, cfg in CONFIGS.items():
        for splits, programs, options in CASES:
            persistent.STEP_PROGRAMS = programs
            persistent.OPTIONS = options
            model = model_for(cfg, seed)
            spec = KVCacheSpec(n_layers=cfg.n_layers, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                               block_size=4, num_blocks=10, dtype="float32")
            ref, got = PagedKVCache(spec), PagedKVCache(spec)
            prompt = torch.randint(0, cfg.vocab_size, (9,), generator=gen).tolist()
            step(model, ref, prompt, 0)
            for a, b in zip(ref.k + ref.v, got.k + got.v):
                b.copy_(a)
            persistent.SPLITS = splits
            for pos, tok in ((9, 7), (10, 11)):
                persistent.PERSISTENT_DECODE = False
                want = step(model, ref, [tok], pos)
                persistent.PERSISTENT_DECODE = True
                have = step(model, got, [tok], pos)
                assert persistent.launch_built(got), f"{name}: the persistent launch did not run"
                assert len(model.__dict__["_persistent_decode"]) == 1
                assert persistent.unmerged_heads(model) == 0, f"{name}: a head's splits not each merged once"
                assert persistent.unready_heads(model) == 0, f"{name}: a head's q/k/v tiles not each counted once"
                diff = (have - want).abs().max().item()
                assert diff <= 1e-5, \
                    f"{name}, {splits} splits, {programs} programs, position {pos}: max |logit diff| {diff:.3g}"
                for layer in range(cfg.n_layers):
                    for which, a, b in (("k", ref.k[layer], got.k[layer]), ("v", ref.v[layer], got.v[layer])):
                        where = f"{name}: {which} cache, layer {layer}"
                        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=lambda m, w=where: f"{w}: {m}")
            assert persistent.barrier_failures(model) == 0
            print(f"{name}, {splits} splits, {programs or 1} programs, {options or 'defaults'}: ok")
    print("persistent-ok")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
