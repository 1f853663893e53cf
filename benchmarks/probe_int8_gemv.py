"""Sweep the int8 weight-only decode kernel's tiles at one or more (M, K, N), each config timed as
`bench_kernels.py` times its weight-only rows (one CUDA graph of back-to-back calls over weight copies
that together exceed twice L2, median replay time per call) against bf16 `torch.mm` in the same run.
A tuning aid: it shows whether any tile of the split-K GEMV (`tessera.kernels.triton.quant_gemv`)
clears a ratio, and which, before the tuned config lists change.

    source scripts/gpu-env.sh && python3 benchmarks/probe_int8_gemv.py --out $OUT
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_result
from bench_kernels import copies_for_l2, graph_seconds


def configs(m: int, quick: bool, grid: argparse.Namespace) -> list[dict]:
    """Candidate launches: the product of the grid's tile widths, K tiles, split-K, warps and stages, or
    by default a spread of them."""
    if grid.bn:
        space = itertools.product(grid.bn, grid.bk, grid.split, grid.warps, grid.stages)
        return [{"BN": bn, "BK": bk, "SPLIT_K": sp, "num_warps": w, "num_stages": st} for bn, bk, sp, w, st in space]
    bns = (16, 32, 64, 128) if m > 1 else (4, 8, 16, 32)
    out = [{"BN": bn, "BK": bk, "SPLIT_K": split, "num_warps": 4, "num_stages": stages}
           for bn, bk, split, stages in itertools.product(bns, (128, 256, 512), (1, 2, 4), (3, 4))]
    return out[::4] if quick else out


def sweep(m: int, k: int, n: int, quick: bool, grid: argparse.Namespace) -> tuple[float, list[dict]]:
    """bf16 torch.mm seconds per call, and one row per config (time and ratio, or the error it raised)."""
    from tessera.kernels import reference
    from tessera.kernels.triton import quant_gemv

    dev = torch.device("cuda")
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for _ in range(copies_for_l2(dev, 2 * n * k))]
    bf16 = graph_seconds([lambda wi=wi: torch.mm(x, wi.T) for wi in w * max(1, 20 // len(w))])
    del w
    copies = copies_for_l2(dev, n * k)
    w_q = [torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8) for _ in range(copies)]
    scale = torch.rand(n, device=dev, dtype=torch.bfloat16) / 127
    want = reference.matmul_int8_weight_only(x, w_q[0], scale).float()
    y = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
    rows = []
    for c in configs(m, quick, grid):
        def call(wi: torch.Tensor, meta: dict = c) -> None:
            quant_gemv.launch_int8(x, wi, scale, y, kernel=quant_gemv.int8_gemv_kernel, **meta)

        row = {"M": m, "K": k, "N": n, **c}
        try:
            call(w_q[0])
            err = (y.float() - want).abs().max().item()
            sec = graph_seconds([lambda wi=wi: call(wi) for wi in w_q * max(1, 20 // copies)])
            row.update(us=sec * 1e6, vs_bf16_mm=bf16 / sec, weight_TBps=n * k / sec / 1e12, max_abs_err=err)
        except Exception as e:  # out of shared memory and the like: reported, the sweep goes on
            row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
        rows.append(row)
        torch.cuda.synchronize()
    del w_q
    torch.cuda.empty_cache()
    return bf16, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["16x4096x4096"], metavar="MxKxN",
                        help="problem shapes (default 16x4096x4096)")
    parser.add_argument("--quick", action="store_true", help="every fourth config of the default spread only")
    grid = parser.add_argument_group("an explicit grid (all of --bn, --bk, --split, --warps, --stages)")
    grid.add_argument("--bn", type=int, nargs="+", help="weight rows per program")
    grid.add_argument("--bk", type=int, nargs="+", help="K tile")
    grid.add_argument("--split", type=int, nargs="+", help="split-K factors")
    grid.add_argument("--warps", type=int, nargs="+", default=[4])
    grid.add_argument("--stages", type=int, nargs="+", default=[3, 4])
    parser.add_argument("--top", type=int, default=12, help="rows printed per shape")
    parser.add_argument("--out", type=Path, default=None, help="directory for the JSON (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.bn and not (args.bk and args.split):
        parser.error("--bn needs --bk and --split")
    shapes = []
    for shape in args.shapes:
        try:
            m, k, n = (int(v) for v in shape.lower().split("x"))
        except ValueError:
            parser.error(f"--shapes: {shape!r} is not MxKxN")
        if not 1 <= m <= 16 or k < 1 or n < 1:
            parser.error(f"--shapes: {shape!r} needs 1 <= M <= 16 and positive K, N")
        shapes.append((shape, m, k, n))
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device (CUDA-graph timing)")
    torch.manual_seed(0)
    results = []
    for shape, m, k, n in shapes:
        bf16, rows = sweep(m, k, n, args.quick, args)
        ok = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
        print(f"\n{shape}: bf16 torch.mm {bf16 * 1e6:.2f} us")
        print_table(ok[:args.top], f"int8 decode GEMV configs at {shape}, fastest first")
        results.append({"shape": shape, "bf16_mm_us": bf16 * 1e6, "configs": rows, "best": ok[0] if ok else None})
    path = write_result("probe-int8-gemv", {"shapes": results}, args.out)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
