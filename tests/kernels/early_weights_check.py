"""Run as a script under TRITON_INTERPRET=1: the decode GEMVs' early-weights prologues (PDL modes 3 and 4:
the first tile, or the first four tiles, loaded ahead of the wait and multiplied after it) give the same bits
as the plain loop (mode 0). The interpreter runs no grid-dependency instructions, so only the prologues'
arithmetic is under test here: dense, int8 and int4 one-row paths with whole tiles, programs with one to
six tiles and empty splits. Prints one JSON list of failures, then "early-ok"."""

from __future__ import annotations

import torch
from check_report import report, seed_arg

from tessera.kernels import registry  # noqa: F401  (registering installs the interpreter fixes)
from tessera.kernels.triton import gemv, pdl, quant_gemv, split_k


def _launch(name: str, y: torch.Tensor, x: torch.Tensor, ws: dict[str, torch.Tensor], bn: int, bk: int,
            split: int) -> None:
    meta = {"BN": bn, "BK": bk, "SPLIT_K": split}
    if name == "dense":
        gemv.launch(x, ws["w"], y, kernel=gemv.dense_gemv_kernel, **meta)
    elif name.startswith("int8"):
        quant_gemv.launch_int8(x, ws["w_q"], ws["scale"], y, kernel=quant_gemv.int8_gemv_kernel,
                               WORDS=name == "int8 words", **meta)
    else:
        quant_gemv.launch_int4(x, ws["qweight"], ws["scales"], ws["zeros"], GROUP, y,
                               kernel=quant_gemv.int4_gemv_kernel, WORDS=True, **meta)


GROUP = 32
PATHS = ("dense", "int8 bytes", "int8 words", "int4 words")


def main(seed: int) -> int:
    gen = torch.Generator().manual_seed(seed)
    failures: list[str] = []
    counters = split_k.stream_counters(torch.device("cpu"), 0)
    modes = (pdl.OFF, pdl.EARLY, pdl.EARLY_ALL)
    # (N, K, BN, BK, SPLIT_K): six tiles in one program; three and three; two, two, two; one each of six
    # splits of a 6-tile K (k_range gives whole tiles); 2 tiles over 3 splits (one split empty).
    shapes = [(16, 192, 8, 32, 1), (16, 192, 8, 32, 2), (8, 192, 4, 32, 3), (8, 192, 8, 32, 6), (8, 64, 4, 32, 3)]
    original = pdl.launch_options
    try:
        for n, k, bn, bk, split in shapes:
            x = torch.randn(1, k, generator=gen).to(torch.bfloat16)
            ws = {"w": torch.randn(n, k, generator=gen).to(torch.bfloat16),
                  "w_q": torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8),
                  "scale": (torch.rand(n, generator=gen) / 127).to(torch.bfloat16),
                  "qweight": torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8),
                  "scales": (torch.rand(n, k // GROUP, generator=gen) / 8).to(torch.bfloat16),
                  "zeros": torch.randint(0, 16, (n, k // GROUP), generator=gen).to(torch.bfloat16)}
            for name in PATHS:
                outs = {}
                for mode in modes:
                    pdl.launch_options = lambda device, gemv=False, mode=mode: {"PDL": mode}
                    y = torch.full((1, n), float("nan"), dtype=torch.bfloat16)
                    _launch(name, y, x, ws, bn, bk, split)
                    outs[mode] = y
                    if counters.any():
                        failures.append(f"{name} mode {mode} n{n} k{k} split{split}: counters left set")
                if outs[pdl.OFF].isnan().any():
                    failures.append(f"{name} n{n} k{k} split{split}: mode 0 left outputs unwritten")
                for mode in modes[1:]:
                    if not torch.equal(outs[mode], outs[pdl.OFF]):
                        diff = (outs[mode].float() - outs[pdl.OFF].float()).abs().max().item()
                        failures.append(f"{name} mode {mode} n{n} k{k} bn{bn} bk{bk} split{split}: differs from "
                                        f"mode 0 by up to {diff:.3g}")
    finally:
        pdl.launch_options = original
    return report(failures, "early-ok")


if __name__ == "__main__":
    raise SystemExit(main(seed_arg()))
