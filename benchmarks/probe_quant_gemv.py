"""The M == 1 decode GEMVs of int8 weight-only and AWQ int4, per config family, at the shapes a decode step
runs: every tile of the byte/nibble-unpacking CUDA-core path and of the word path (weights read as int32
words, unpacked by PRMT, the next tile loaded while one is multiplied), each timed as `bench_kernels.py`
times its weight-only rows (one CUDA graph of back-to-back calls over weight copies that exceed twice L2),
against bf16 torch.mm and the dense bf16 GEMV (`tessera.kernels.dense.linear`) in the same run. Every
word-path config is also checked against the reference op on the GPU (its PTX conversion does not run
under the interpreter). On an sm_90 GPU the CUDA C++ tensor-core GEMVs' launch configs (int8 and int4)
are a family of their own ("cuda"). The sum over a Llama-3.2-1B decode step (q/k/v and gate/up fused, as
served) gives what each family would make of one step.

    source scripts/gpu-env.sh && python3 benchmarks/probe_quant_gemv.py --out $OUT
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_result
from bench_kernels import copies_for_l2, graph_seconds

#: (K, N) -> calls per Llama-3.2-1B decode step, projections fused as the serving engine runs them.
LLAMA_1B_FUSED = {(2048, 3072): 16, (2048, 2048): 16, (2048, 16384): 16, (8192, 2048): 16, (2048, 128256): 1}
SQUARES = {(4096, 4096): 0, (8192, 8192): 0}
GROUP = 128
#: Config families: the byte-unpacking CUDA-core path, the padded tl.dot path, the word path (Triton), and the
#: CUDA C++ tensor-core GEMVs (`tessera.kernels.cuda.int8_gemv` / `int4_gemv`, sm_90 only).
FAMILIES = ("bytes", "dot", "words", "cuda")


def _meta(c) -> dict:
    return {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}


def _family(c) -> str:
    return "words" if c.kwargs.get("WORDS") else ("dot" if c.kwargs.get("M1_DOT") else "bytes")


def sweep(op: str, k: int, n: int) -> tuple[dict, list[dict]]:
    from tessera.kernels import cuda, dense, reference
    from tessera.kernels.triton import quant_gemv as qg
    from tessera.kernels.triton import quant_matmul as qm
    from tessera.kernels.triton.tuning import bucket

    dev = torch.device("cuda")
    x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
    w = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * k**-0.5 for _ in range(copies_for_l2(dev, 2 * n * k))]
    reps = max(1, 20 // len(w))
    peers = {"bf16_mm_us": 1e6 * graph_seconds([lambda wi=wi: torch.mm(x, wi.T) for wi in w * reps]),
             "dense_gemv_us": 1e6 * graph_seconds([lambda wi=wi: dense.linear(x, wi) for wi in w * reps])}
    del w
    torch.cuda.empty_cache()
    named = {"M_BUCKET": bucket(1), "N": n, "K": k}
    if op == "int8":
        nbytes = n * k
        weights = [(torch.randint(-128, 128, (n, k), device=dev, dtype=torch.int8),
                    torch.rand(n, device=dev) / 127) for _ in range(copies_for_l2(dev, nbytes))]
        pool = qg._prune_int8(qg._int8_tuned.configs, named)
        want = reference.matmul_int8_weight_only(x, *weights[0]).float()

        def run(wi: tuple, y: torch.Tensor, c) -> None:
            qg.launch_int8(x, *wi, y, kernel=qg.int8_gemv_kernel, **_meta(c))

        cuda_ok = not cuda.int8_gemv_reasons(x, *weights[0])
        cuda_configs = cuda.int8_gemv_configs(1, k)

        def run_cuda(wi: tuple, y: torch.Tensor, c: tuple) -> None:
            cuda.int8_gemv(x, *wi, y, *c, pdl=mode)
    else:
        nbytes = n * k // 2 + 8 * n * (k // GROUP)
        weights = [(torch.randint(0, 256, (n, k // 2), device=dev, dtype=torch.uint8),
                    torch.rand(n, k // GROUP, device=dev) / 8 * k**-0.5,
                    torch.randint(0, 16, (n, k // GROUP), device=dev).float())
                   for _ in range(copies_for_l2(dev, nbytes))]
        pool = qg._prune_int4(qg._int4_tuned.configs, named, GROUP=GROUP)
        want = reference.matmul_int4_awq(x, *weights[0], GROUP).float()

        def run(wi: tuple, y: torch.Tensor, c) -> None:
            qg.launch_int4(x, *wi, GROUP, y, kernel=qg.int4_gemv_kernel, **_meta(c))

        cuda_ok = not cuda.int4_gemv_reasons(x, *weights[0], GROUP)
        cuda_configs = cuda.int4_gemv_configs(1, k)

        def run_cuda(wi: tuple, y: torch.Tensor, c: tuple) -> None:
            cuda.int4_gemv(x, *wi, y, *c, pdl=mode)
    y = torch.empty(1, n, device=dev, dtype=torch.bfloat16)
    pool = [(run, c, _family(c), _meta(c)) for c in pool]  # each config with the launcher that runs it
    mode = qm._cuda_pdl(dev)
    if cuda_ok:
        pool += [(run_cuda, c, "cuda", {"rows_per_block": c[0], "warps": c[1], "loop": c[2], "pdl": mode})
                 for c in cuda_configs]
    rows = []
    for launch, c, family, meta in pool:
        row = {"op": op, "K": k, "N": n, "family": family, **meta}
        try:
            launch(weights[0], y, c)
            torch.cuda.synchronize()
            err = ((y.float() - want).abs().max() / want.abs().max()).item()
            sec = graph_seconds([lambda wi=wi, c=c, launch=launch: launch(wi, y, c)
                                 for wi in weights * max(1, 20 // len(weights))])
            row.update(us=sec * 1e6, rel_err=err, TBps=nbytes / sec / 1e12,
                       vs_bf16_mm=peers["bf16_mm_us"] / (sec * 1e6), vs_dense_gemv=peers["dense_gemv_us"] / (sec * 1e6))
        except Exception as e:  # out of resources and the like: reported, the sweep goes on
            row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
        rows.append(row)
    del weights
    torch.cuda.empty_cache()
    return peers, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="+", choices=("int8", "int4"), default=["int8", "int4"])
    parser.add_argument("--top", type=int, default=6, help="rows printed per shape and family")
    parser.add_argument("--early-weights", action="store_true",
                        help="time inside tessera.kernels.static_weights(), as a decode step runs: in PDL modes 3 "
                             "and 4 each GEMV loads its first weights before waiting for the launch ahead, here the "
                             "same GEMV on another weight copy")
    parser.add_argument("--out", type=Path, default=None, help="directory for the JSON (default benchmarks/results)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device (CUDA-graph timing)")
    from tessera.kernels import static_weights

    torch.manual_seed(0)
    shapes, step, bad = [], {}, []
    for op in args.ops:
        for (k, n), calls in {**LLAMA_1B_FUSED, **SQUARES}.items():
            with static_weights() if args.early_weights else contextlib.nullcontext():
                peers, rows = sweep(op, k, n)
            ok = [r for r in rows if "us" in r]
            bad += [r for r in ok if r["rel_err"] > 2e-2] + [r for r in rows if "error" in r]
            best = {f: min((r for r in ok if r["family"] == f), key=lambda r: r["us"], default=None)
                    for f in FAMILIES}
            print(f"\n{op} K={k} N={n}: bf16 mm {peers['bf16_mm_us']:.2f} us, "
                  f"dense GEMV {peers['dense_gemv_us']:.2f} us")
            for f in FAMILIES:
                top = sorted((r for r in ok if r["family"] == f), key=lambda r: r["us"])[:args.top]
                if top:
                    print_table(top, f"{op} {f} configs, fastest first")
            shapes.append({"op": op, "K": k, "N": n, **peers, "best": best, "configs": rows})
            before = min((r["us"] for r in (best["bytes"], best["dot"]) if r), default=None)
            words = best["words"]["us"] if best["words"] else None
            tc = best["cuda"]["us"] if best["cuda"] else None
            after = min((v for v in (before, words, tc) if v is not None), default=None)
            if calls:
                sums = step.setdefault(op, {})
                for key, us in (("bf16_mm", peers["bf16_mm_us"]), ("dense_gemv", peers["dense_gemv_us"]),
                                ("before", before), ("words", words), ("cuda", tc), ("best", after)):
                    if us is not None:
                        sums[key] = sums.get(key, 0.0) + calls * us
            if before and words:
                print(f"  best words {words:.2f} us vs best before {before:.2f} us: {before / words:.2f}x")
            if words and tc:
                print(f"  best CUDA tensor-core GEMV {tc:.2f} us vs best words {words:.2f} us: {words / tc:.2f}x")
    for op, sums in step.items():
        print(f"\nllama-3.2-1b decode step, {op} projections summed (us): "
              + ", ".join(f"{k} {v:.1f}" for k, v in sums.items()))
    if bad:
        print(f"\n{len(bad)} configs failed or were wrong:")
        for r in bad:
            print("  ", r)
    path = write_result("probe-quant-gemv", {"early_weights": args.early_weights, "shapes": shapes,
                                             "llama_1b_step_us": step, "failures": bad}, args.out)
    print(f"results: {path}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
