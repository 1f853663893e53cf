"""Run as a script under TRITON_INTERPRET=1: the decode GEMVs reading silu_mul(gate, up) from a fused gate/up
output (GATED) give exactly the bits of silu_mul (the Triton op) followed by the plain GEMV at the same
config, on every path: M == 1 on the CUDA cores, padded to tl.dot, the int8 and int4 word paths, M = 4 and 16,
split-K, ragged N and K (masked tiles), int4 tiles inside a group and of whole groups, a gate/up output that
is a strided view, float32 and bfloat16. Prints one JSON list of failures, then "gated-ok"."""

from __future__ import annotations

import torch
from check_report import report, seed_arg

from tessera.kernels import reference, registry  # noqa: F401  (registering installs the interpreter fixes)
from tessera.kernels.triton import gemv, quant_gemv, split_k, swiglu


def _run(kind: str, x: torch.Tensor, y: torch.Tensor, ws: dict, meta: dict, gated: bool) -> None:
    if kind == "dense":
        gemv.launch(x, ws["w"], y, kernel=gemv.dense_gemv_kernel, gated=gated, **meta)
    elif kind == "int8":
        quant_gemv.launch_int8(x, ws["w_q"], ws["scale"], y, kernel=quant_gemv.int8_gemv_kernel, gated=gated, **meta)
    else:
        quant_gemv.launch_int4(x, ws["qweight"], ws["scales"], ws["zeros"], ws["group"], y,
                               kernel=quant_gemv.int4_gemv_kernel, gated=gated, **meta)


def _compare(failures: list[str], counters: torch.Tensor, name: str, kind: str, gu: torch.Tensor, ws: dict,
             n: int, meta: dict) -> None:
    k = gu.shape[1] // 2
    act = swiglu.silu_mul(gu[:, :k], gu[:, k:])
    plain = torch.full((gu.shape[0], n), float("nan"), dtype=gu.dtype)
    gated = torch.full_like(plain, float("nan"))
    _run(kind, act, plain, ws, meta, False)
    _run(kind, gu, gated, ws, meta, True)
    if plain.isnan().any() or not torch.equal(gated, plain):
        diff = (gated.float() - plain.float()).abs().max().item()
        failures.append(f"{name}: gated differs from silu_mul + GEMV by up to {diff:.3g}")
    if counters.any():
        failures.append(f"{name}: split-K counters left at {counters.nonzero().flatten().tolist()}")


def main(seed: int) -> int:
    gen = torch.Generator().manual_seed(seed)
    failures: list[str] = []
    counters = split_k.stream_counters(torch.device("cpu"), 0)
    for dtype in (torch.float32, torch.bfloat16):
        for m in (1, 4, 16):
            for (n, k) in ((37, 200), (48, 256)):
                wide = torch.randn(m, 2 * k + 8, generator=gen).to(dtype) * 3
                gu = wide[:, 8:] if m == 1 else wide[:, :2 * k]  # an offset view; rows 2K + 8 apart
                ws = {"w": (torch.randn(n, k, generator=gen) * k**-0.5).to(dtype),
                      "w_q": torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8),
                      "scale": ((torch.rand(n, generator=gen) + 0.5) / 127 * k**-0.5).to(dtype)}
                paths = [(16, 64, 1, {}), (32, 32, 3, {})]
                if m == 1:
                    paths += [(16, 64, 1, {"M1_DOT": True}), (8, 64, 2, {"WORDS": True})]
                for bn, bk, split, flags in paths:
                    meta = {"BN": bn, "BK": bk, "SPLIT_K": split, **flags}
                    label = f"{dtype} m{m} n{n} k{k} bn{bn} bk{bk} split{split} {','.join(flags) or 'plain'}"
                    for kind in ("int8",) if "WORDS" in flags else ("int8", "dense"):  # no dense word path
                        _compare(failures, counters, f"{kind} {label}", kind, gu, ws, n, meta)
            for k, n, group in ((224, 19, 32), (256, 16, 64), (600, 21, 128)):
                gu = torch.randn(m, 2 * k, generator=gen).to(dtype) * 3
                groups = -(-k // group)
                ws = {"qweight": reference.pack_int4(torch.randint(0, 16, (n, k), generator=gen)),
                      "scales": ((torch.rand(n, groups, generator=gen) + 0.2) * k**-0.5 / 8).to(dtype),
                      "zeros": torch.randint(0, 16, (n, groups), generator=gen).to(dtype), "group": group}
                tiles = [(16, 32, 1, False), (16, 2 * group, 2, False)]
                if m == 1 and k % 8 == 0:
                    tiles.append((8, group, 2, True))
                for bn, bk, split, words in tiles:
                    meta = {"BN": bn, "BK": bk, "SPLIT_K": split, "WORDS": words}
                    _compare(failures, counters, f"int4 {dtype} m{m} k{k} g{group} bn{bn} bk{bk} split{split} "
                             f"words{int(words)}", "int4", gu, ws, n, meta)
    return report(failures, "gated-ok")


if __name__ == "__main__":
    raise SystemExit(main(seed_arg()))
