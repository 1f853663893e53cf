"""The dense decode GEMV (`matmul.dense`'s Triton backend) against cuBLAS (`F.linear`) at decode shapes:
graph time per call (`tessera.kernels.triton.tuning.graph_bench`: inside a captured graph, L2 cold), the
tuned config, and the largest difference from `F.linear`. A diagnosis tool behind `dense.linear`'s
per-shape choice, not a benchmark with a target.

    source scripts/gpu-env.sh && python3 benchmarks/probe_dense_gemv.py --out $OUT
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_result

#: (K, N): Qwen3-0.6B's fused q/k/v, o, fused gate/up, down and LM head; Llama-3.2-1B's fused q/k/v, o,
#: fused gate/up, down and LM head; a square 4096.
SHAPES = [(1024, 4096), (2048, 1024), (1024, 6144), (3072, 1024), (1024, 151936), (2048, 3072), (2048, 2048),
          (2048, 16384), (8192, 2048), (2048, 128256), (4096, 4096)]
_CONFIG_KEYS = ("BN", "BK", "SPLIT_K", "M1_DOT", "num_warps", "num_stages")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16], help="rows of x (decode batch sizes)")
    parser.add_argument("--out", type=Path, default=None, help="directory for the JSON (default benchmarks/results)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device (CUDA-graph timing)")
    bad = [m for m in args.rows if not 1 <= m <= 16]
    if bad:
        parser.error(f"--rows must lie in 1..16 (the GEMV's range), got {bad}")
    from tessera.kernels.triton import gemv
    from tessera.kernels.triton.tuning import bucket, graph_bench

    torch.manual_seed(0)
    rows = []
    for m in args.rows:
        for k, n in SHAPES:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
            t0 = time.perf_counter()
            y = gemv.matmul_dense(x, w)  # the first call tunes
            tune_s = time.perf_counter() - t0
            err = (y.float() - F.linear(x, w).float()).abs().max().item()
            t_blas = graph_bench(lambda x=x, w=w: F.linear(x, w)) * 1e3
            t_gemv = graph_bench(lambda x=x, w=w: gemv.matmul_dense(x, w)) * 1e3
            cfg = gemv._launch.remembered((bucket(m), n, k, x.dtype, False)) or {}
            rows.append({"M": m, "K": k, "N": n, "linear_us": t_blas, "gemv_us": t_gemv, "speedup": t_blas / t_gemv,
                         "gemv_TBps": 2 * n * k / t_gemv / 1e6, "max_abs_diff": err, "tune_s": tune_s,
                         "config": {key: v for key, v in cfg.items() if key in _CONFIG_KEYS}})
    print_table([{k: v for k, v in r.items() if k != "config"} for r in rows],
                "bf16 decode-shape projections: cuBLAS vs the dense GEMV, graph time per call")
    path = write_result("probe-dense-gemv", {"rows": rows}, args.out)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
