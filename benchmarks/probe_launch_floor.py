"""The floor under a chain of dependent decode kernels: what one launch costs when it moves (almost) no bytes.

A batch-1 decode step is a chain of dependent launches, each reading what the one before wrote. This probe
captures 256 launches back to back in one CUDA graph and reports the time per launch for:

- `empty`: a kernel that only waits for the one before it (with programmatic dependent launch, PDL) and exits;
- `row`: every program reads the whole activation row the previous launch wrote (`--width` bf16 values, from
  L2, as each program of a decode GEMV reads x), sums it, and writes its share of the next row: a GEMV with no
  weights, the dependency and the x traffic of one;
- the peer, `torch copy`: the same ping-pong of one row by `Tensor.copy_` (torch's own kernel, no PDL).

Each Triton kind runs with PDL off (mode 0) and on (mode 1), at several grid sizes. A decode GEMV that takes
a few microseconds more than `row` at its grid is near this floor, and only fewer launches a step shorten it.

    source scripts/gpu-env.sh && python3 benchmarks/probe_launch_floor.py --out $OUT
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_result
from bench_kernels import graph_seconds

from tessera.kernels.triton import pdl

CHAIN = 256


@triton.jit
def _row_kernel(X, Y, N, READ: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl.enter(PDL)
    if READ:
        offs = tl.arange(0, BLOCK)
        total = tl.sum(tl.load(X + offs, mask=offs < N, other=0.0).to(tl.float32), axis=0)
        share = tl.cdiv(N, tl.num_programs(0))
        mine = tl.program_id(0) * share + offs
        # tiny, so the chain's values stay finite; every program's share depends on the whole row
        tl.store(Y + mine, (total * 1e-6).to(Y.dtype.element_ty), mask=(offs < share) & (mine < N))


def _chain(kind: str, programs: int, pdl_mode: int, width: int) -> float:
    bufs = [torch.randn(width, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    block = triton.next_power_of_2(width)
    extra = {"launch_pdl": True} if pdl_mode else {}

    def launch(i: int) -> None:
        if kind == "torch copy":
            bufs[(i + 1) % 2].copy_(bufs[i % 2])
        else:
            _row_kernel[(programs,)](bufs[i % 2], bufs[(i + 1) % 2], width, READ=kind == "row", BLOCK=block,
                                     PDL=pdl_mode, num_warps=4, **extra)

    return graph_seconds([lambda i=i: launch(i) for i in range(CHAIN)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=2048, help="elements of the activation row (bf16)")
    parser.add_argument("--programs", type=int, nargs="+", default=None,
                        help="grid sizes (default: 1, the SM count, twice it, 1024)")
    parser.add_argument("--out", type=Path, default=None, help="directory for the JSON (default benchmarks/results)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device (CUDA-graph timing)")
    if args.width < 1 or args.width > 16384:
        parser.error(f"--width={args.width}: expected 1 to 16384")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    grids = args.programs or [1, sms, 2 * sms, 1024]
    if any(p < 1 for p in grids):
        parser.error(f"--programs={grids}: every grid needs at least one program")
    pdl_modes = (0, 1) if torch.cuda.get_device_capability()[0] >= 9 else (0,)
    rows = [{"kind": "torch copy", "programs": None, "pdl": 0,
             "us_per_launch": _chain("torch copy", 1, 0, args.width) * 1e6}]
    for kind in ("empty", "row"):
        for programs in grids:
            for mode in pdl_modes:
                rows.append({"kind": kind, "programs": programs, "pdl": mode,
                             "us_per_launch": _chain(kind, programs, mode, args.width) * 1e6})
    peer = rows[0]["us_per_launch"]
    for r in rows:
        r["vs_torch_copy"] = peer / r["us_per_launch"]
    print_table(rows, f"{CHAIN} dependent launches in one CUDA graph, width {args.width}")
    path = write_result("probe-launch-floor", {"width": args.width, "chain": CHAIN, "rows": rows}, args.out)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
