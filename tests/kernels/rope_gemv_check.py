"""Run as a script under TRITON_INTERPRET=1: the int8 decode GEMV with rope and the cache write in its epilogue
(`launch_int8(..., rope=...)`, ROPE_D) gives exactly the bits of the plain GEMV at the same config followed by the
Triton rope and the Triton cache write: y (q and k rotated, v as computed), both caches at the written slots, and
every other slot untouched. Every path (M == 1 on the CUDA cores, padded to tl.dot, the word path; M = 3 and 16 on
tl.dot), split-K, a ragged K, GQA and MHA heads of 16 and 32, no q heads, a padding slot (-1), the normalised
prologue with the rope epilogue, float32 and bfloat16. Prints one JSON list of failures, then "rope-ok"."""

from __future__ import annotations

import torch
from check_report import report, seed_arg

from tessera.kernels import reference, registry  # noqa: F401  (registering installs the interpreter fixes)
from tessera.kernels.triton import kv_cache, norm, quant_gemv, rope, split_k


def _case(gen: torch.Generator, m: int, hq: int, hkv: int, d: int, k: int, dtype: torch.dtype) -> dict:
    n = (hq + 2 * hkv) * d
    blocks, page = m + 1, 2  # paged caches [blocks, page, Hkv, D], as `kv_cache.write` takes them
    angles = torch.rand(m, d // 2, generator=gen) * 6.0
    slots = torch.randperm(blocks * page, generator=gen)[:m]
    if m > 1:
        slots[m // 2] = -1  # a padding lane writes nothing
    return {"x": (torch.randn(m, k, generator=gen) * 2).to(dtype),
            "w_q": torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8),
            "scale": ((torch.rand(n, generator=gen) + 0.5) / 127 * k**-0.5).to(dtype),
            "cos": torch.cat([angles.cos(), angles.cos()], dim=1).to(dtype),
            "sin": torch.cat([angles.sin(), angles.sin()], dim=1).to(dtype),
            "k_cache": torch.randn(blocks, page, hkv, d, generator=gen).to(dtype),
            "v_cache": torch.randn(blocks, page, hkv, d, generator=gen).to(dtype), "slots": slots, "hq": hq,
            "hkv": hkv, "residual": torch.randn(m, k, generator=gen).to(dtype),
            "nw": (torch.rand(k, generator=gen) + 0.5).to(dtype)}


def _compare(failures: list[str], counters: torch.Tensor, name: str, c: dict, meta: dict, normed: bool) -> None:
    x, w_q, scale = c["x"], c["w_q"], c["scale"]
    m, n = x.shape[0], w_q.shape[0]
    norm_of = (lambda: (c["residual"], c["nw"], torch.empty_like(x), 1e-6)) if normed else (lambda: None)
    plain = torch.full((m, n), float("nan"), dtype=x.dtype)
    nrm = norm_of()
    quant_gemv.launch_int8(x, w_q, scale, plain, kernel=quant_gemv.int8_gemv_kernel, norm=nrm, **meta)
    q, k, v = reference.qkv_heads(plain, c["hq"], c["hkv"])
    q, k = rope.rope(q, k, c["cos"], c["sin"])
    want_k, want_v = c["k_cache"].clone(), c["v_cache"].clone()
    kv_cache.kv_cache_write(k, v, want_k, want_v, c["slots"])
    want = torch.cat([q.reshape(m, -1), k.reshape(m, -1), v.reshape(m, -1)], dim=1)

    got = torch.full_like(plain, float("nan"))
    got_k, got_v = c["k_cache"].clone(), c["v_cache"].clone()
    nrm2 = norm_of()
    quant_gemv.launch_int8(x, w_q, scale, got, kernel=quant_gemv.int8_gemv_kernel, norm=nrm2,
                           rope=(c["cos"], c["sin"], got_k, got_v, c["slots"], c["hq"], c["hkv"]), **meta)
    for what, a, b in (("y", got, want), ("k_cache", got_k, want_k), ("v_cache", got_v, want_v)):
        if plain.isnan().any() or not torch.equal(a, b):
            diff = (a.float() - b.float()).abs().nan_to_num(float("inf")).max().item()
            failures.append(f"{name}: {what} differs from GEMV + rope + cache write by up to {diff:.3g}")
    if normed and not torch.equal(nrm[2], nrm2[2]):
        failures.append(f"{name}: h differs from the plain normalised GEMV's")
    if counters.any():
        failures.append(f"{name}: split-K counters left at {counters.nonzero().flatten().tolist()}")


def main(seed: int) -> int:
    gen = torch.Generator().manual_seed(seed)
    failures: list[str] = []
    counters = split_k.stream_counters(torch.device("cpu"), 0)
    assert norm  # the normalised prologue's op is registered with the others
    for dtype in (torch.float32, torch.bfloat16):
        for m in (1, 3, 16) if dtype == torch.bfloat16 else (1, 16):
            for hq, hkv, d, k in ((4, 2, 16, 96), (2, 2, 32, 64), (0, 1, 16, 64)):
                if m > 1 and d > 16:
                    continue  # the wider head at one row only: the check runs under the interpreter
                c = _case(gen, m, hq, hkv, d, k, dtype)
                paths = [(16, 32, 1, {}), (8, 32, 3, {})]
                if m == 1:
                    paths += [(16, 32, 1, {"M1_DOT": True}), (8, 64, 2, {"WORDS": True})]
                for bn, bk, split, flags in paths:
                    if bn > d:
                        continue
                    meta = {"BN": bn, "BK": bk, "SPLIT_K": split, **flags}
                    label = (f"{dtype} m{m} hq{hq} hkv{hkv} d{d} k{k} bn{bn} bk{bk} split{split} "
                             f"{','.join(flags) or 'plain'}")
                    _compare(failures, counters, label, c, meta, False)
                    if m == 1 and "M1_DOT" not in flags:
                        _compare(failures, counters, label + " normed", c, meta, True)
    return report(failures, "rope-ok")


if __name__ == "__main__":
    raise SystemExit(main(seed_arg()))
