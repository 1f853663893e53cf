"""Would a persistent decode kernel reach the bandwidth roofline? A feasibility probe for batch-1 decode:
the four weight GEMVs of each layer of a Qwen3-0.6B-shaped model (fused q/k/v, o, fused gate/up, down),
28 layers, run by ONE Triton launch whose programs (one per SM) step through the phases together,
separated by grid-wide barriers (an atomic counter), against the same work as one cuBLAS launch per
projection (`F.linear`, with the RMSNorm, residual and SiLU-gate ops between them) replayed from a CUDA
graph. Attention is left out (at short contexts it reads little), as are rope and the KV write; what is
measured is how close the weight stream gets to the copy ceiling once launches and their ramps are gone.

Each phase's program takes tiles of `BN` weight rows by the whole K. With `--prefetch`, a program loads
its first tile of the next phase before it waits at the barrier (weights do not depend on the
activations), so the wait overlaps the load. The activations go through global memory (L2) between phases.

A diagnosis that decides whether a persistent per-layer decode kernel is worth building, not a
benchmark with a target.

    source scripts/gpu-env.sh && python3 benchmarks/probe_persistent_layer.py --out $OUT
    TRITON_INTERPRET=1 python3 benchmarks/probe_persistent_layer.py --tiny   # CPU check (float32, one program)
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_result


@triton.jit
def _grid_barrier(counter, target, flag, SPIN_LIMIT: tl.constexpr):
    """Arrive at `counter` and wait until `target` programs have arrived; gives up after SPIN_LIMIT polls
    and raises `flag` so that a barrier that can never complete (programs not co-resident) shows up as an
    error instead of a hang."""
    tl.debug_barrier()  # every thread's stores of this phase before the program's release
    tl.atomic_add(counter, 1, sem="release", scope="gpu")
    seen = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
    spins = 0
    while (seen < target) & (spins < SPIN_LIMIT):
        seen = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
        spins += 1
    if seen < target:
        tl.atomic_add(flag, 1)
    tl.debug_barrier()


@triton.jit
def _tile(w_ptr, tile, N: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, BN: tl.constexpr):
    """Rows [tile * BN, tile * BN + BN) of an [N, K] weight; a program past the last tile reads nothing."""
    rows = tile * BN + tl.arange(0, BN)
    cols = tl.arange(0, KP)
    return tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=(rows[:, None] < N) & (cols[None, :] < K),
                   other=0.0)


@triton.jit
def _handoff(w_ptr, pid, N: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, BN: tl.constexpr, counter, target,
             flag, PREFETCH: tl.constexpr, SPIN_LIMIT: tl.constexpr):
    """The grid barrier between two phases, and this program's first weight tile of the next one: loaded
    before the wait with PREFETCH (weights do not depend on the activations), after it otherwise."""
    if PREFETCH:
        w = _tile(w_ptr, pid, N, K, KP, BN)
        _grid_barrier(counter, target, flag, SPIN_LIMIT)
    else:
        _grid_barrier(counter, target, flag, SPIN_LIMIT)
        w = _tile(w_ptr, pid, N, K, KP, BN)
    return w


@triton.jit
def _normed(h_ptr, D: tl.constexpr, eps, DT: tl.constexpr):
    cols = tl.arange(0, D)
    h = tl.load(h_ptr + cols, cache_modifier=".cg")
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / D + eps)
    return (h * rstd).to(DT).to(tl.float32)


@triton.jit
def _phase(w_ptr, first, x, out_ptr, res_ptr, pid, P, N: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
           BN: tl.constexpr, RESIDUAL: tl.constexpr):
    """y = W @ x over this program's tiles (the first one already loaded: `first`); writes y rounded to
    the weights' dtype, or with RESIDUAL adds y so rounded to the float32 residual rows instead."""
    DT: tl.constexpr = w_ptr.dtype.element_ty
    ntiles: tl.constexpr = N // BN
    w = first
    tile = pid
    while tile < ntiles:
        y = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        rows = tile * BN + tl.arange(0, BN)
        if RESIDUAL:
            r = tl.load(res_ptr + rows, cache_modifier=".cg")
            tl.store(res_ptr + rows, r + y.to(DT).to(tl.float32))
        else:
            tl.store(out_ptr + rows, y.to(DT))
        tile += P
        if tile < ntiles:
            w = _tile(w_ptr, tile, N, K, KP, BN)


@triton.jit
def _layers_kernel(h_ptr, wqkv, wo, wgu, wd, a_ptr, g_ptr, counter, flag, eps, L: tl.constexpr,
                   D: tl.constexpr, NQKV: tl.constexpr, DO: tl.constexpr, DO_P: tl.constexpr,
                   NGU: tl.constexpr, DI: tl.constexpr, DI_P: tl.constexpr,
                   BN_QKV: tl.constexpr, BN_O: tl.constexpr, BN_GU: tl.constexpr, BN_D: tl.constexpr,
                   PREFETCH: tl.constexpr, SPIN_LIMIT: tl.constexpr):
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    DT: tl.constexpr = wqkv.dtype.element_ty
    phase = 0
    w = _tile(wqkv, pid, NQKV, D, D, BN_QKV)
    for layer in range(L):
        lo = wo + layer * D * DO
        lgu = wgu + layer * NGU * D
        ld = wd + layer * D * DI
        # q/k/v from the normalised residual; its first DO outputs stand in for the attention output
        x = _normed(h_ptr, D, eps, DT)
        _phase(wqkv + layer * NQKV * D, w, x, a_ptr, h_ptr, pid, P, NQKV, D, D, BN_QKV, False)
        phase += 1
        w = _handoff(lo, pid, D, DO, DO_P, BN_O, counter, phase * P, flag, PREFETCH, SPIN_LIMIT)
        cols = tl.arange(0, DO_P)
        x = tl.load(a_ptr + cols, mask=cols < DO, other=0.0, cache_modifier=".cg").to(tl.float32)
        _phase(lo, w, x, a_ptr, h_ptr, pid, P, D, DO, DO_P, BN_O, True)
        phase += 1
        w = _handoff(lgu, pid, NGU, D, D, BN_GU, counter, phase * P, flag, PREFETCH, SPIN_LIMIT)
        x = _normed(h_ptr, D, eps, DT)
        _phase(lgu, w, x, g_ptr, h_ptr, pid, P, NGU, D, D, BN_GU, False)
        phase += 1
        w = _handoff(ld, pid, D, DI, DI_P, BN_D, counter, phase * P, flag, PREFETCH, SPIN_LIMIT)
        cols = tl.arange(0, DI_P)
        gate = tl.load(g_ptr + cols, mask=cols < DI, other=0.0, cache_modifier=".cg").to(tl.float32)
        up = tl.load(g_ptr + DI + cols, mask=cols < DI, other=0.0, cache_modifier=".cg").to(tl.float32)
        x = (gate * tl.sigmoid(gate)).to(DT).to(tl.float32) * up
        x = x.to(DT).to(tl.float32)
        _phase(ld, w, x, g_ptr, h_ptr, pid, P, D, DI, DI_P, BN_D, True)
        phase += 1
        # the next layer's q/k/v (after the last layer, layer 0's again: read and left unused)
        nxt = wqkv + ((layer + 1) % L) * NQKV * D
        w = _handoff(nxt, pid, NQKV, D, D, BN_QKV, counter, phase * P, flag, PREFETCH, SPIN_LIMIT)


def _rms(h: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    return (h * torch.rsqrt(h.pow(2).mean() + eps)).to(dtype)


def torch_layers(h: torch.Tensor, w: dict[str, torch.Tensor], eps: float, do: int, di: int) -> torch.Tensor:
    """The same arithmetic, one cuBLAS launch per projection (h float32 of shape (D,), updated in place)."""
    dt = w["qkv"].dtype
    for layer in range(w["qkv"].shape[0]):
        a = F.linear(_rms(h, eps, dt)[None], w["qkv"][layer])[0]
        h += F.linear(a[None, :do], w["o"][layer])[0].float()
        g = F.linear(_rms(h, eps, dt)[None], w["gu"][layer])[0]
        x = (F.silu(g[:di].float()).to(dt).float() * g[di:].float()).to(dt)
        h += F.linear(x[None], w["d"][layer])[0].float()
    return h


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def persistent_layers(h: torch.Tensor, w: dict[str, torch.Tensor], eps: float, do: int, di: int,
                      programs: int, bn: dict[str, int], prefetch: bool, num_warps: int,
                      scratch: dict[str, torch.Tensor]) -> None:
    d = h.shape[0]
    scratch["counter"].zero_()
    _layers_kernel[(programs,)](
        h, w["qkv"], w["o"], w["gu"], w["d"], scratch["a"], scratch["g"], scratch["counter"], scratch["flag"],
        eps, L=w["qkv"].shape[0], D=d, NQKV=w["qkv"].shape[1], DO=do, DO_P=_pow2(do), NGU=w["gu"].shape[1],
        DI=di, DI_P=_pow2(di), BN_QKV=bn["qkv"], BN_O=bn["o"], BN_GU=bn["gu"], BN_D=bn["d"],
        PREFETCH=prefetch, SPIN_LIMIT=1 << 16, num_warps=num_warps)


def _graph_ms(fn, reps: int) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--reps", type=int, default=50, help="timed graph replays (median)")
    parser.add_argument("--warps", type=int, nargs="+", default=[8, 16], help="num_warps values to try")
    parser.add_argument("--tiny", action="store_true", help="small shapes, one program: the CPU check")
    parser.add_argument("--out", type=Path, default=None, help="directory for the JSON (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.layers < 1 or args.reps < 1:
        parser.error(f"--layers and --reps must be positive, got {args.layers} and {args.reps}")
    cuda = torch.cuda.is_available() and not args.tiny
    dev = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    if args.tiny:
        d, nqkv, do, ngu, di, layers = 64, 128, 96, 192, 96, 2
        bns = [{"qkv": 16, "o": 16, "gu": 16, "d": 16}]
        programs = 1
    else:
        d, nqkv, do, ngu, di, layers = 1024, 4096, 2048, 6144, 3072, args.layers
        bns = [{"qkv": 32, "o": 8, "gu": 32, "d": 8}, {"qkv": 16, "o": 8, "gu": 16, "d": 8},
               {"qkv": 32, "o": 16, "gu": 32, "d": 16}]
        programs = torch.cuda.get_device_properties(dev).multi_processor_count
    eps = 1e-6
    # bf16 as served; the CPU check in float32, whose roundings the interpreter and torch share (the
    # interpreter's float32 -> bf16 conversion does not round as torch's does)
    dtype, limit = (torch.float32, 1e-4) if args.tiny else (torch.bfloat16, 2e-2)

    def weight(n: int, k: int) -> torch.Tensor:
        return (torch.randn(layers, n, k, device=dev) * k ** -0.5).to(dtype)

    w = {"qkv": weight(nqkv, d), "o": weight(d, do), "gu": weight(ngu, d), "d": weight(d, di)}
    h0 = torch.randn(d, device=dev)
    scratch = {"a": torch.empty(nqkv, device=dev, dtype=dtype),
               "g": torch.empty(ngu, device=dev, dtype=dtype),
               "counter": torch.zeros(1, device=dev, dtype=torch.int32),
               "flag": torch.zeros(1, device=dev, dtype=torch.int32)}
    want = torch_layers(h0.clone(), w, eps, do, di)
    weight_bytes = sum(t.numel() * t.element_size() for t in w.values())
    rows = []
    result: dict = {"layers": layers, "weight_bytes": weight_bytes, "programs": programs}
    if cuda:
        from _common import measure_ceilings

        ceil = measure_ceilings(dev, True, False)["copy_bytes_per_s"]
        result["copy_bytes_per_s"] = ceil
        h = h0.clone()
        ms = _graph_ms(lambda: torch_layers(h, w, eps, do, di), args.reps)
        rows.append({"what": "cuBLAS, one launch per projection (graph)", "ms": ms, "us_per_layer": ms * 1e3 / layers,
                     "fraction_of_copy": weight_bytes / (ms * 1e-3) / ceil, "max_err": None})
    for bn in bns:
        for prefetch in (False, True):
            for warps in (args.warps if cuda else [4]):
                h = h0.clone()
                scratch["flag"].zero_()
                persistent_layers(h, w, eps, do, di, programs, bn, prefetch, warps, scratch)
                err = float((h - want).abs().max() / want.abs().max())
                row = {"what": f"persistent, BN {bn}, prefetch {prefetch}, warps {warps}", "max_err": err,
                       "barrier_timeouts": int(scratch["flag"].item())}
                if cuda:
                    call = functools.partial(persistent_layers, h, w, eps, do, di, programs, bn, prefetch, warps,
                                             scratch)
                    ms = _graph_ms(call, args.reps)
                    row.update(ms=ms, us_per_layer=ms * 1e3 / layers,
                               fraction_of_copy=weight_bytes / (ms * 1e-3) / ceil)
                    row["barrier_timeouts"] = int(scratch["flag"].item())
                rows.append(row)
                print(row, flush=True)
    print_table(rows, "four projections per layer, batch 1 (relative error of the final residual vs the cuBLAS path)")
    result["rows"] = rows
    bad = [r for r in rows if r.get("max_err") is not None and (r["max_err"] > limit or r["barrier_timeouts"])]
    if cuda or args.out:
        write_result("probe-persistent-layer", result, args.out)
    if bad:
        print(f"{len(bad)} configuration(s) disagree with the per-launch path or timed out at a barrier")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
