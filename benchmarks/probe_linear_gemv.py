"""How fast cuBLAS runs the decode-shape bf16 projections of a model: one or a few rows of x against
each weight, timed as a decode step under CUDA graphs pays it (`tessera.kernels.triton.tuning.
graph_bench`: per call inside a captured graph, L2 cold). Three forms of the same product:
`F.linear(x, W)`, `mm(W, x.T).T`, and W split into two halves of N. A diagnosis tool for the serving
decode step, not a benchmark with a target: it shows which shapes cuBLAS serves far below the copy
ceiling.

    source scripts/gpu-env.sh && python3 benchmarks/probe_linear_gemv.py --out $OUT
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_result

#: (K, N) of Qwen3-0.6B's projections (o: 2048 -> 1024, down: 3072 -> 1024, fused q/k/v and gate/up)
#: and Llama-3.2-1B's fused gate/up.
SHAPES = [(1024, 6144), (1024, 4096), (2048, 1024), (3072, 1024), (1024, 3072), (2048, 16384)]


def forms(x: torch.Tensor, w: torch.Tensor) -> dict[str, object]:
    """The three ways of taking x @ w.T, by result key."""
    half = w.shape[0] // 2
    return {"linear_us": lambda: F.linear(x, w), "mm_w_xt_us": lambda: torch.mm(w, x.T).T,
            "two_halves_us": lambda: (F.linear(x, w[:half]), F.linear(x, w[half:]))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4], help="rows of x (decode batch sizes)")
    parser.add_argument("--out", type=Path, default=None, help="directory for the JSON (default benchmarks/results)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device (CUDA-graph timing)")
    from tessera.kernels.triton.tuning import graph_bench

    torch.manual_seed(0)
    rows = []
    for k, n in SHAPES:
        for m in args.rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            us = {name: graph_bench(fn) * 1e3 for name, fn in forms(x, w).items()}
            rows.append({"M": m, "K": k, "N": n, **us, "linear_TBps": n * k * 2 / us["linear_us"] / 1e6})
    print_table(rows, "bf16 decode-shape projections, graph time per call")
    path = write_result("probe-linear-gemv", {"rows": rows}, args.out)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
