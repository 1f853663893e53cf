"""Kernel benchmarks: every tessera backend against a peer measured in the same run, as a fraction of
the ceilings this script measures (device copy bandwidth, bf16 torch.mm FLOP/s).

    python benchmarks/bench_kernels.py                 # H200: all rows, JSON to benchmarks/results/
    python benchmarks/bench_kernels.py --tiny          # CPU smoke run at tiny sizes, in seconds
    python benchmarks/bench_kernels.py --out DIR --plot DIR/attention_tflops.png

Rows: attention.prefill (causal, GQA 32/8, D 64/128, T 1k/4k/16k, bf16) in TFLOP/s against torch
SDPA's FlashAttention-2 and cuDNN backends; attention.decode_paged (block 16) in KV bytes/s against
SDPA over a contiguous cache; rms_norm 16k x 4096 against torch eager; int8/int4 weight-only at
M 1/16 against bf16 torch.mm (square K = N and every Llama-3.2-1B projection, plus their sum over
one decode step; `--only weight_only` runs just these; on a GPU each is timed in a plain loop and as
device time inside a CUDA graph of back-to-back calls); fp8 at 8192^3 (the registry's scaled_mm and
triton backends, x quantization included) against bf16 torch.mm and torch._scaled_mm on pre-quantized
x; fused swiglu against unfused torch. A measurement that fails is reported as a row with an `error`
and the run goes on. Targets: prefill >= 1.0x FA2 at D=128,
T>=4k; decode >= 70% of copy at B=64, T=2048; rms_norm >= 80% of copy; int8 >= 1.5x bf16 mm at
M 1/16, K = N 4096/8192; fp8 >= 1.3x bf16 mm.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import measure_ceilings, print_table, write_result

from tessera.kernels import reference, registry
from tessera.specs import KernelUnavailableError

ROOT = Path(__file__).resolve().parents[1]
HQ, HKV = 32, 8


def timeit(device: torch.device, fn: Callable[..., Any], *args: Any, reps: int = 50, **kwargs: Any) -> float:
    """Median seconds of `fn(*args, **kwargs)` after warm-up: CUDA events (L2 flushed between runs by
    do_bench) on GPU, the host clock on CPU."""
    if args or kwargs:
        fn = functools.partial(fn, *args, **kwargs)
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=max(50, reps), return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(max(3, reps // 10)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


#: Rows whose plain-loop time is below this are launch-bound there: they are also timed in a CUDA graph.
GRAPH_BELOW_S = 100e-6


def graph_seconds(calls: list[Callable[[], Any]], replays: int = 30) -> float:
    """Median device seconds per call of `calls` captured back to back in one CUDA graph (host launch
    overhead gone, as under a serving engine's decode graphs). Each call should read its own copy of the
    data, enough of them to overflow L2, so the figure is not an L2-resident one. Warm-up (tuning,
    compilation) runs on a side stream before capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in calls[:2] * 2:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del graph
    return statistics.median(times) / len(calls)


def copies_for_l2(device: torch.device, nbytes: int, most: int = 512) -> int:
    """How many copies of `nbytes` of data a graph cycles through so that together they exceed twice L2."""
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0
    return max(4, min(most, -(-2 * l2 // max(1, nbytes))))


def error_row(what: dict[str, Any], e: BaseException) -> dict[str, Any]:
    """A row that reports a failed measurement instead of ending the run."""
    error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    print(f"  error in {what}: {error}")
    return {**what, "error": error}


def ceilings(device: torch.device, tiny: bool) -> dict[str, float]:
    """Copy bandwidth (bytes read + written per second) and bf16 matmul FLOP/s, measured here (the
    shared `measure_ceilings`, under this file's historical key `mm_flops`)."""
    measured = measure_ceilings(device, device.type == "cuda", tiny)
    return {"copy_bytes_per_s": measured["copy_bytes_per_s"], "mm_flops": measured["bf16_mm_flops"]}


def _impl(op: str, backend: str, *args: Any, **kwargs: Any) -> Callable[..., Any] | None:
    try:
        return registry.get(op, *args, backend=backend, **kwargs)
    except KernelUnavailableError:
        return None


def bench_prefill(device: torch.device, dtype: torch.dtype, tiny: bool, ceil: dict[str, float]) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    lengths = (64, 128) if tiny else (1024, 4096, 16384)
    tokens = 256 if tiny else 16384
    peers = {"sdpa-flash2": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}
    for d in (64, 128):
        for t in lengths:
            b = max(1, tokens // t)
            n = b * t
            q = torch.randn(n, HQ, d, device=device, dtype=dtype)
            k = torch.randn(n, HKV, d, device=device, dtype=dtype)
            v = torch.randn(n, HKV, d, device=device, dtype=dtype)
            cu = torch.arange(0, n + 1, t, device=device, dtype=torch.int32)
            flops = 4 * b * t * t * HQ * d / 2
            results: dict[str, float] = {}
            for backend in ("triton", "cuda"):
                if backend == "cuda" and t > 4096:
                    continue  # the plain CUDA kernel takes seconds here; its trend is clear by 4k
                impl = _impl("attention.prefill", backend, q, k, v, cu, t)
                if impl is not None:
                    results[backend] = flops / timeit(device, impl, q, k, v, cu, t) / 1e12
            # Peers get K/V repeated to Hq heads outside the timed region (their GQA paths differ by backend).
            qb = q.view(b, t, HQ, d).transpose(1, 2)
            kb = k.view(b, t, HKV, d).transpose(1, 2).repeat_interleave(HQ // HKV, 1)
            vb = v.view(b, t, HKV, d).transpose(1, 2).repeat_interleave(HQ // HKV, 1)
            for name, backend in peers.items():
                if device.type != "cuda":
                    continue
                try:
                    with sdpa_kernel(backend):
                        sec = timeit(device, F.scaled_dot_product_attention, qb, kb, vb, is_causal=True)
                    results[name] = flops / sec / 1e12
                except RuntimeError as e:
                    print(f"  {name} unavailable at D={d} T={t}: {str(e).splitlines()[0][:100]}")
            if device.type != "cuda":
                sec = timeit(device, F.scaled_dot_product_attention, qb, kb, vb, is_causal=True)
                results["sdpa"] = flops / sec / 1e12
            for backend, tflops in results.items():
                rows.append({"op": "attention.prefill", "backend": backend, "D": d, "T": t, "B": b,
                             "tflops": tflops, "of_mm_ceiling": tflops * 1e12 / ceil["mm_flops"],
                             "vs_flash2": tflops / results["sdpa-flash2"] if "sdpa-flash2" in results else None,
                             "vs_cudnn": tflops / results["sdpa-cudnn"] if "sdpa-cudnn" in results else None})
    return rows


def _paged(b: int, t: int, page: int, d: int, device: torch.device, dtype: torch.dtype) -> tuple:
    per = -(-t // page)
    blocks = b * per
    k_cache = torch.randn(blocks, page, HKV, d, device=device, dtype=dtype)
    v_cache = torch.randn(blocks, page, HKV, d, device=device, dtype=dtype)
    table = torch.randperm(blocks, device=device).to(torch.int32).view(b, per)
    return k_cache, v_cache, table


def bench_decode(device: torch.device, dtype: torch.dtype, tiny: bool, ceil: dict[str, float]) -> list[dict]:
    rows = []
    shapes = [(4, 64), (1, 256)] if tiny else [(64, 2048), (1, 8192), (256, 512)]
    d, page = 128, 16
    for b, t in shapes:
        k_cache, v_cache, table = _paged(b, t, page, d, device, dtype)
        q = torch.randn(b, HQ, d, device=device, dtype=dtype)
        lens = torch.full((b,), t, device=device, dtype=torch.int32)
        kv_bytes = 2 * b * t * HKV * d * k_cache.element_size()
        results = {}
        impl = _impl("attention.decode_paged", "triton", q, k_cache, v_cache, table, lens)
        if impl is not None:
            results["triton"] = timeit(device, impl, q, k_cache, v_cache, table, lens)
        else:
            results["reference"] = timeit(device, reference.attention_decode_paged, q, k_cache, v_cache, table, lens)
        # Peer: SDPA over a contiguous copy of the same cache; the Hq/Hkv query heads of a group are
        # its query rows, so K/V are read once per kv head, as the paged kernel reads them.
        kc = k_cache[table.long()].reshape(b, -1, HKV, d)[:, :t].transpose(1, 2).contiguous()
        vc = v_cache[table.long()].reshape(b, -1, HKV, d)[:, :t].transpose(1, 2).contiguous()
        qg = q.view(b, HKV, HQ // HKV, d)
        results["sdpa-contiguous"] = timeit(device, F.scaled_dot_product_attention, qg, kc, vc)
        for backend, sec in results.items():
            rows.append({"op": "attention.decode_paged", "backend": backend, "B": b, "T": t, "us": sec * 1e6,
                         "kv_GBps": kv_bytes / sec / 1e9, "of_copy_ceiling": kv_bytes / sec / ceil["copy_bytes_per_s"],
                         "vs_sdpa": results["sdpa-contiguous"] / sec})
    return rows


def bench_rms_norm(device: torch.device, dtype: torch.dtype, tiny: bool, ceil: dict[str, float]) -> list[dict]:
    rows_, d = (256, 512) if tiny else (16384, 4096)
    x = torch.randn(rows_, d, device=device, dtype=dtype)
    w = torch.randn(d, device=device, dtype=dtype)
    moved = 2 * x.numel() * x.element_size() + w.numel() * w.element_size()
    results = {"torch-eager": timeit(device, reference.rms_norm, x, w, 1e-6)}
    for backend in ("triton", "cuda"):
        impl = _impl("rms_norm", backend, x, w, 1e-6)
        if impl is not None:
            results[backend] = timeit(device, impl, x, w, 1e-6)
    return [{"op": "rms_norm", "backend": b, "shape": f"{rows_}x{d}", "us": s * 1e6, "GBps": moved / s / 1e9,
             "of_copy_ceiling": moved / s / ceil["copy_bytes_per_s"], "vs_torch_eager": results["torch-eager"] / s}
            for b, s in results.items()]


#: Llama-3.2-1B decode: (K, N) of each projection -> calls per step (16 layers of q/o, k/v, gate/up, down; lm_head).
LLAMA_1B_DECODE = {(2048, 2048): 32, (2048, 512): 32, (2048, 8192): 32, (8192, 2048): 16, (2048, 128256): 1}
_TINY_DECODE = {(64, 64): 32, (64, 16): 32, (64, 256): 32, (256, 64): 16, (64, 1000): 1}


def _weight_only_cases(m: int, k: int, n: int, device: torch.device, dtype: torch.dtype) -> list[tuple]:
    """(op, backend, weight bytes, make(i) -> one call on the i-th copy of the weights) for each contender."""
    g = min(128, k)

    def bf16(_: int) -> tuple:
        return (torch.randn(n, k, device=device, dtype=dtype) * k**-0.5,)

    def int8(_: int) -> tuple:
        return (torch.randint(-127, 128, (n, k), device=device, dtype=torch.int8), torch.rand(n, device=device) / 127)

    def int4(_: int) -> tuple:
        return (reference.pack_int4(torch.randint(0, 16, (n, k), device=device)),
                torch.rand(n, k // g, device=device) / 16, torch.randint(0, 16, (n, k // g), device=device).float(), g)

    x = torch.randn(m, k, device=device, dtype=dtype)
    cases = [("matmul (bf16 torch.mm)", "torch", n * k * x.element_size(), bf16,
              lambda w: functools.partial(torch.mm, x, w[0].T))]
    for op, make, wbytes in [("matmul.int8_weight_only", int8, n * k + 4 * n),
                             ("matmul.int4_awq", int4, n * k // 2 + 8 * n * (k // g))]:
        impl = _impl(op, "triton", x, *make(0))
        fn = impl or registry.get(op, backend="reference")
        cases.append((op, "triton" if impl is not None else "reference", wbytes, make,
                      lambda w, fn=fn: functools.partial(fn, x, *w)))
    return cases


def bench_weight_only(device: torch.device, dtype: torch.dtype, tiny: bool, ceil: dict[str, float]) -> list[dict]:
    """int8 / AWQ int4 (group 128, float32 scales and zeros as tessera.quant stores them) against bf16
    torch.mm at decode M: square K = N, then every Llama-3.2-1B projection shape, and the matmul part of
    one Llama-3.2-1B decode step summed over its projections. On a GPU each row has two times: `graph_us`,
    device time per call from replaying a CUDA graph of many back-to-back calls on rotating weight copies
    (no host overhead, no L2 reuse: what a decode step under CUDA graphs pays), and `loop_us`, a plain
    Python loop (do_bench; host dispatch included). Ratios and bandwidth use graph_us where measured."""
    rows = []
    decode = _TINY_DECODE if tiny else LLAMA_1B_DECODE
    square = [(96, 96), (128, 128)] if tiny else [(4096, 4096), (8192, 8192)]
    step: dict[tuple[int, str], float] = {}
    failed: set[tuple[int, str]] = set()
    for k, n in [*square, *decode]:
        for m in (1, 16):
            measured = []
            for op, backend, wbytes, make, call in _weight_only_cases(m, k, n, device, dtype):
                what = {"op": op, "backend": backend, "M": m, "K": k, "N": n}
                try:
                    loop = timeit(device, call(make(0)))
                    graph = None
                    if device.type == "cuda":
                        weights = [make(i) for i in range(copies_for_l2(device, wbytes))]
                        # At least 20 calls a graph, so the replay's own launch is amortised.
                        graph = graph_seconds([call(weights[i % len(weights)]) for i in range(max(20, len(weights)))])
                        del weights
                    measured.append((what, wbytes, loop, graph))
                except Exception as e:  # a failing contender is reported, the run goes on
                    rows.append(error_row(what, e))
                    failed.add((m, op))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            peer = next(((lp, gr) for w, _, lp, gr in measured if w["backend"] == "torch"), (None, None))
            for what, wbytes, loop, graph in measured:
                sec = graph if graph is not None else loop
                peer_sec = peer[1] if graph is not None else peer[0]
                gbps = wbytes / sec
                rows.append({**what, "graph_us": graph * 1e6 if graph is not None else None, "loop_us": loop * 1e6,
                             "weight_GBps": gbps / 1e9, "of_copy_ceiling": gbps / ceil["copy_bytes_per_s"],
                             "vs_bf16_mm": peer_sec / sec if peer_sec else None,
                             "loop_vs_bf16_mm": peer[0] / loop if peer[0] else None})
                if (k, n) in decode:
                    step[(m, what["op"])] = step.get((m, what["op"]), 0.0) + decode[(k, n)] * sec
    model = "tiny decode step" if tiny else "llama-3.2-1b decode step"
    for (m, op), sec in step.items():
        if (m, op) in failed:  # a sum over some projections only would mislead
            continue
        peer = step.get((m, "matmul (bf16 torch.mm)")) if (m, "matmul (bf16 torch.mm)") not in failed else None
        rows.append({"op": f"{op} [{model}, all projections]", "backend": "sum", "M": m, "K": None, "N": None,
                     "graph_us" if device.type == "cuda" else "loop_us": sec * 1e6,
                     "vs_bf16_mm": peer / sec if peer else None})
    return rows


def bench_fp8(device: torch.device, dtype: torch.dtype, tiny: bool, ceil: dict[str, float]) -> list[dict]:
    n = 256 if tiny else 8192
    flops = 2 * n**3
    x = torch.randn(n, n, device=device, dtype=dtype)
    w = torch.randn(n, n, device=device, dtype=dtype)
    w_scale = (w.float().abs().amax(1) / 448).clamp_min(1e-12)
    w_q = (w.float() / w_scale[:, None]).to(torch.float8_e4m3fn)
    results = {"torch.mm bf16": timeit(device, torch.mm, x, w.T)}
    rows = []

    def measure(label: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        try:
            results[label] = timeit(device, fn, *args, **kwargs)
        except Exception as e:  # reported as a row; the other contenders are still measured
            rows.append(error_row({"op": "matmul.fp8", "backend": label, "MNK": n}, e))

    for backend in ("scaled_mm", "triton"):
        impl = _impl("matmul.fp8", backend, x, w_q, w_scale)
        if impl is not None:
            measure(f"{backend} (with x quantization)", impl, x, w_q, w_scale)
    if _impl("matmul.fp8", "triton", x, w_q, w_scale) is not None:
        from tessera.kernels.triton.fp8_matmul import quantize_rows

        measure("triton quantize x only", quantize_rows, x)
    if device.type == "cuda":
        xq, xs = reference.quantize_fp8_rows(x)
        measure("torch._scaled_mm (x pre-quantized)", torch._scaled_mm, xq, w_q.T, scale_a=xs[:, None].contiguous(),
                scale_b=w_scale[None, :].contiguous(), out_dtype=dtype)
    for backend, sec in results.items():
        rows.append({"op": "matmul.fp8", "backend": backend, "MNK": n, "us": sec * 1e6,
                     "tflops": flops / sec / 1e12 if "only" not in backend else None,
                     "of_mm_ceiling": flops / sec / ceil["mm_flops"] if "only" not in backend else None,
                     "vs_bf16_mm": results["torch.mm bf16"] / sec,
                     "vs_scaled_mm": (results["torch._scaled_mm (x pre-quantized)"] / sec
                                      if "torch._scaled_mm (x pre-quantized)" in results else None)})
    return rows


def bench_swiglu(device: torch.device, dtype: torch.dtype, tiny: bool, ceil: dict[str, float]) -> list[dict]:
    m, d, f = (128, 256, 512) if tiny else (8192, 4096, 14336)
    x = torch.randn(m, d, device=device, dtype=dtype)
    wg = torch.randn(f, d, device=device, dtype=dtype) * d**-0.5
    wu = torch.randn(f, d, device=device, dtype=dtype) * d**-0.5
    flops = 4 * m * d * f
    results = {"torch unfused": timeit(device, reference.swiglu, x, wg, wu)}
    impl = _impl("swiglu", "triton", x, wg, wu)
    if impl is not None:
        results["triton fused"] = timeit(device, impl, x, wg, wu)
    return [{"op": "swiglu", "backend": b, "M,D,F": f"{m},{d},{f}", "us": s * 1e6, "tflops": flops / s / 1e12,
             "of_mm_ceiling": flops / s / ceil["mm_flops"], "vs_unfused": results["torch unfused"] / s}
            for b, s in results.items()]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, d in zip(axes, (64, 128)):
        for backend in sorted({r["backend"] for r in rows if r["op"] == "attention.prefill"}):
            pts = sorted((r["T"], r["tflops"]) for r in rows if r["op"] == "attention.prefill" and r["D"] == d
                         and r["backend"] == backend)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=backend)
        ax.set_xscale("log", base=2)
        ax.set_title(f"causal prefill, GQA {HQ}/{HKV}, D={d}, bf16")
        ax.set_xlabel("sequence length T")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("TFLOP/s")
    axes[1].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


SECTIONS = {"prefill": bench_prefill, "decode": bench_decode, "rms_norm": bench_rms_norm,
            "weight_only": bench_weight_only, "fp8": bench_fp8, "swiglu": bench_swiglu}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (runs on CPU in seconds)")
    parser.add_argument("--out", type=Path, default=None, help="directory for the JSON (default benchmarks/results)")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "attention_tflops.png",
                        help="PNG of attention TFLOP/s vs T per backend")
    parser.add_argument("--only", nargs="*", choices=sorted(SECTIONS), help="run only these sections")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    ceil = ceilings(device, args.tiny)
    print(f"device {device}: copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s (read+write), "
          f"{'bf16' if device.type == 'cuda' else 'fp32'} mm {ceil['mm_flops'] / 1e12:.1f} TFLOP/s")
    sections: dict[str, list[dict]] = {}
    for name in args.only or SECTIONS:
        start = time.perf_counter()
        try:
            sections[name] = SECTIONS[name](device, dtype, args.tiny, ceil)
        except Exception as e:  # one broken section must not cost the others' figures
            sections[name] = [error_row({"op": name, "backend": "section"}, e)]
        # Rows differ in keys (error rows, sums); the table shows the union of them.
        cols = list(dict.fromkeys(key for row in sections[name] for key in row))
        print_table([{c: row.get(c) for c in cols} for row in sections[name]],
                    title=f"{name} ({time.perf_counter() - start:.0f}s)")
    if "prefill" in sections and not (args.tiny and args.plot == parser.get_default("plot")):
        plot(sections["prefill"], args.plot)
    payload = {"ceilings": ceil, "dtype": str(dtype), "sections": sections}
    if "weight_only" in sections:  # which config each decode GEMV shape was tuned to, in this process
        try:
            from tessera.kernels.triton import quant_gemv

            payload["tuned_configs"] = quant_gemv.tuned_configs()
        except ImportError:
            pass
    path = write_result("kernels" + ("-tiny" if args.tiny else ""), payload, args.out)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
