"""Run as a script (under TRITON_INTERPRET=1 without a GPU): paged decode over tables wide enough to split
the context, with the splits merged in the same launch (arrival counters) and by the second kernel
(MERGE_SLOTS forced to 0), against the torch reference; contexts of 0, 1, a partial tile and the whole
table, GQA groups of 1, 2 and 4. After every fused launch the counters must be back at zero. Prints
one JSON list of failures, then "paged-decode-ok" if none."""

from __future__ import annotations

import torch
from check_report import report, seed_arg

from tessera.kernels import reference, registry  # registering installs the interpreter fixes
from tessera.kernels.triton import paged_attention as pa


def main(seed: int) -> int:
    gen = torch.Generator().manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    failures: list[str] = []
    page, width, d = 4, 16, 16  # 64-token tables: more than two tiles, so the context splits
    for n_rep in (1, 2, 4):
        hkv = 2
        hq = hkv * n_rep
        ctx = torch.tensor([0, 1, 7, 33, page * width], dtype=torch.int32)
        batch = len(ctx)
        blocks = batch * width + 3
        k_cache = torch.randn(blocks, page, hkv, d, generator=gen).to(device, torch.bfloat16)
        v_cache = torch.randn(blocks, page, hkv, d, generator=gen).to(device, torch.bfloat16)
        tables = torch.randperm(blocks, generator=gen)[: batch * width].view(batch, width).to(device, torch.int32)
        q = torch.randn(batch, hq, d, generator=gen).to(device, torch.bfloat16)
        ctx = ctx.to(device)
        want = reference.attention_decode_paged(q, k_cache, v_cache, tables, ctx)
        tol = registry.catalogue["attention.decode_paged"].tolerance("bfloat16")
        splits = pa._decode_plan(batch, hkv, width * page, 16 if device.type == "cpu" else 64)
        if splits < 2:
            failures.append(f"n_rep {n_rep}: the table does not split ({splits}); the check tests nothing")
        for slots, how in ((pa.MERGE_SLOTS, "fused merge"), (0, "merge kernel")):
            saved, pa.MERGE_SLOTS = pa.MERGE_SLOTS, slots
            try:
                got = pa.attention_decode_paged(q, k_cache, v_cache, tables, ctx)
            finally:
                pa.MERGE_SLOTS = saved
            try:
                torch.testing.assert_close(got, want, atol=tol.atol, rtol=tol.rtol)
            except AssertionError as e:
                failures.append(f"n_rep {n_rep}, {how}: {str(e).splitlines()[0]}")
        counters = pa._merge_counters(q.device, pa._stream_key(q.device))
        if counters.any():
            failures.append(f"n_rep {n_rep}: merge counters left at {counters.nonzero().flatten().tolist()}")
    return report(failures, "paged-decode-ok")


if __name__ == "__main__":
    raise SystemExit(main(seed_arg()))
