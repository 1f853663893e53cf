"""Run as a script under TRITON_INTERPRET=1: the one-row decode GEMVs that normalise x + residual as they load x
(NORM) against the Triton rms_norm_residual followed by the plain GEMV at the same config, on every path that
takes one row: dense and int8 on the CUDA cores, the int8 and int4 word paths, int4 tiles inside a group and of
whole groups, split-K, ragged N and K (masked tiles), K past the prologue's 1024-element block, PDL modes 0, 3
and 4 (the early-weights prologues, where the norm statistics are taken after the wait), float32 and bfloat16,
a float32 norm weight beside a bf16 x. h must be the op's bits exactly; the product may differ from the
unfused one only by the rounding of 1 / rms (the prologue sums the squares in another order), so it is held
to a few units in the last place of its dtype. Prints one JSON list of failures, then "normed-ok"."""

from __future__ import annotations

import torch
from check_report import report, seed_arg

from tessera.kernels import reference, registry  # noqa: F401  (registering installs the interpreter fixes)
from tessera.kernels.triton import gemv, norm, pdl, quant_gemv, split_k

#: Allowed |normed - unfused| relative to the output's scale, per dtype: a few ulps.
_REL = {torch.float32: 2e-6, torch.bfloat16: 3e-2}


def _run(kind: str, x: torch.Tensor, y: torch.Tensor, ws: dict, meta: dict, nrm: tuple | None) -> None:
    if kind == "dense":
        gemv.launch(x, ws["w"], y, kernel=gemv.dense_gemv_kernel, norm=nrm, **meta)
    elif kind == "int8":
        quant_gemv.launch_int8(x, ws["w_q"], ws["scale"], y, kernel=quant_gemv.int8_gemv_kernel, norm=nrm, **meta)
    else:
        quant_gemv.launch_int4(x, ws["qweight"], ws["scales"], ws["zeros"], ws["group"], y,
                               kernel=quant_gemv.int4_gemv_kernel, norm=nrm, **meta)


def _compare(failures: list[str], counters: torch.Tensor, name: str, kind: str, x: torch.Tensor, r: torch.Tensor,
             nw: torch.Tensor, ws: dict, n: int, meta: dict) -> None:
    eps = 1e-6
    normed, h_ref = norm.rms_norm_residual(x, r, nw, eps)
    plain = torch.full((1, n), float("nan"), dtype=x.dtype)
    _run(kind, normed, plain, ws, meta, None)
    for mode in (pdl.OFF, pdl.EARLY, pdl.EARLY_ALL):
        pdl.launch_options = lambda device, gemv=False, mode=mode: {"PDL": mode}
        got = torch.full_like(plain, float("nan"))
        h = torch.full_like(x, float("nan"))
        _run(kind, x, got, ws, meta, (r, nw, h, eps))
        label = f"{name} pdl{mode}"
        if not torch.equal(h, h_ref):
            failures.append(f"{label}: h differs from x + residual")
        scale = plain.float().abs().max().item() + 1e-30
        diff = (got.float() - plain.float()).abs().max().item()
        if plain.isnan().any() or got.isnan().any() or not diff <= _REL[x.dtype] * scale:
            failures.append(f"{label}: differs from rms_norm_residual + GEMV by {diff:.3g} (scale {scale:.3g})")
        if counters.any():
            failures.append(f"{label}: split-K counters left at {counters.nonzero().flatten().tolist()}")


def main(seed: int) -> int:
    gen = torch.Generator().manual_seed(seed)
    failures: list[str] = []
    counters = split_k.stream_counters(torch.device("cpu"), 0)
    original = pdl.launch_options
    try:
        for dtype in (torch.float32, torch.bfloat16):
            for nw_dtype in {dtype, torch.float32}:
                def row(k: int, dtype: torch.dtype = dtype,
                        nw_dtype: torch.dtype = nw_dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
                    x = (torch.randn(1, k, generator=gen) * 3).to(dtype)
                    r = (torch.randn(1, k, generator=gen) * 3).to(dtype)
                    return x, r, (torch.rand(k, generator=gen) + 0.5).to(nw_dtype)

                for n, k in ((37, 200), (48, 256), (16, 1280)):
                    x, r, nw = row(k)
                    ws = {"w": (torch.randn(n, k, generator=gen) * k**-0.5).to(dtype),
                          "w_q": torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8),
                          "scale": ((torch.rand(n, generator=gen) + 0.5) / 127 * k**-0.5).to(dtype)}
                    for bn, bk, split, flags in ((16, 64, 1, {}), (8, 32, 3, {}), (8, 64, 2, {"WORDS": True})):
                        meta = {"BN": bn, "BK": bk, "SPLIT_K": split, **flags}
                        label = (f"{dtype} w{nw_dtype} n{n} k{k} bn{bn} bk{bk} split{split} "
                                 f"{','.join(flags) or 'plain'}")
                        for kind in ("int8",) if "WORDS" in flags else ("int8", "dense"):  # no dense word path
                            _compare(failures, counters, f"{kind} {label}", kind, x, r, nw, ws, n, meta)
                for k, n, group in ((224, 19, 32), (256, 16, 64), (600, 21, 128), (1280, 8, 128)):
                    x, r, nw = row(k)
                    groups = -(-k // group)
                    ws = {"qweight": reference.pack_int4(torch.randint(0, 16, (n, k), generator=gen)),
                          "scales": ((torch.rand(n, groups, generator=gen) + 0.2) * k**-0.5 / 8).to(dtype),
                          "zeros": torch.randint(0, 16, (n, groups), generator=gen).to(dtype), "group": group}
                    tiles = [(16, 32, 1, False), (16, 2 * group, 2, False)]
                    if k % 8 == 0:
                        tiles.append((8, group, 2, True))
                    for bn, bk, split, words in tiles:
                        meta = {"BN": bn, "BK": bk, "SPLIT_K": split, "WORDS": words}
                        _compare(failures, counters, f"int4 {dtype} w{nw_dtype} k{k} g{group} bn{bn} bk{bk} "
                                 f"split{split} words{int(words)}", "int4", x, r, nw, ws, n, meta)
    finally:
        pdl.launch_options = original
    return report(failures, "normed-ok")


if __name__ == "__main__":
    raise SystemExit(main(seed_arg()))
