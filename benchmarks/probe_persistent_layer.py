"""Would a persistent decode kernel reach the bandwidth roofline? A feasibility probe for batch-1 decode
of a Qwen3-0.6B-shaped model (28 layers; per layer the fused q/k/v, o, fused gate/up and down
projections, RMSNorm, the SiLU gate and the residual adds, and with `--context T` attention over T cached
positions with this step's k and v written first), run by ONE Triton launch whose programs (one per
SM) step through the phases together, separated by grid-wide barriers (an atomic counter). The peer is
the same work as a launch per op (`F.linear`, SDPA, the pointwise ops) replayed from a CUDA graph. The
phases are those of the model's launch (`tessera.kernels.triton.persistent_decode`) over stacked weights:
rope runs at angle 0 and QK-norm is off (a few hundred flops a head), the cache is one block, the norm
weights are ones. What is measured is how close the weight and KV stream gets to the copy ceiling once
launches and their ramps are gone, across tile heights, prefetch and warps.

Each projection phase gives a program tiles of `BN` weight rows by the whole K. With prefetch, a program
loads its first tile of the next phase before it waits at the barrier (weights do not depend on the
activations), so the wait overlaps the load. Attention splits each kv head's positions over programs;
the last split of a head to finish merges the head's partials (a counter per head), and one more
barrier precedes the o projection. Activations go through global memory (L2) between phases.

A diagnosis that decides whether a persistent per-layer decode kernel is worth building, not a
benchmark with a target.

    source scripts/gpu-env.sh && python3 benchmarks/probe_persistent_layer.py --out $OUT   # contexts 0, 512
    TRITON_INTERPRET=1 python3 benchmarks/probe_persistent_layer.py --tiny   # CPU check (float32, one program)
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_result

# the pieces of the model's persistent launch, so the probe measures that design
from tessera.kernels.triton.persistent_decode import (
    _attention,
    _attention_first,
    _first_tiles,
    _gemv,
    _grid_barrier,
    _handoff,
    _normed_row,
)


@triton.jit
def _layers_kernel(h_ptr, wqkv, wo, wgu, wd, a_ptr, o_ptr, g_ptr, kc, vc, part, hcnt, counter, flag, ones, cos, sin,
                   slot, table, ctx, eps, L: tl.constexpr, D: tl.constexpr, NQKV: tl.constexpr, DO: tl.constexpr,
                   DO_P: tl.constexpr, NGU: tl.constexpr, DI: tl.constexpr, DI_P: tl.constexpr,
                   BN_QKV: tl.constexpr, BN_O: tl.constexpr, BN_GU: tl.constexpr, BN_D: tl.constexpr,
                   ATTN: tl.constexpr, TMAX: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, HD: tl.constexpr,
                   S: tl.constexpr, SP: tl.constexpr, SCALE: tl.constexpr, PREFETCH: tl.constexpr,
                   SPIN_LIMIT: tl.constexpr, DEPTH: tl.constexpr, POLL: tl.constexpr):
    """The persistent launch's phases over stacked [L, N, K] weights: norms with unit weights, attention
    (with ATTN) through the launch's own `_attention` with rope at angle 0 and no QK-norm over a cache of one
    TMAX-position block; without ATTN the first DO outputs of q/k/v stand in for the attention output."""
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    DT: tl.constexpr = wqkv.dtype.element_ty
    phase = 0
    w, w2 = _first_tiles(wqkv, pid, P, NQKV, D, D, BN_QKV, DEPTH)
    for layer in range(L):
        lo = wo + layer * D * DO
        lgu = wgu + layer * NGU * D
        ld = wd + layer * D * DI
        x = _normed_row(h_ptr, ones, D, eps, DT)
        _gemv(wqkv + layer * NQKV * D, w, w2, x, a_ptr, h_ptr, pid, P, NQKV, D, D, BN_QKV, False, h_ptr, h_ptr, 0,
              128, DEPTH)
        phase += 1
        if ATTN:  # then a second barrier, the o projection's first tile held meanwhile (as the model's launch)
            lkv = layer * TMAX * HKV * HD
            kf, vf, t_ctx = _attention_first(kc + lkv, vc + lkv, table, ctx, pid, HKV, HD, TMAX, S, 32)  # early
            w, w2 = _handoff(lo, pid, P, D, DO, DO_P, BN_O, counter, phase * P, flag, PREFETCH, SPIN_LIMIT, 1, POLL)
            _attention(a_ptr, o_ptr, kc + lkv, vc + lkv, ones, ones, cos, sin, slot, table, t_ctx, part, hcnt, pid, P,
                       eps, SCALE, kf, vf, HKV, G, HD, TMAX, S, SP, 32, False)
            phase += 1
            if DEPTH == 2:  # the o projection's second tile, around the barrier
                w2, _ = _handoff(lo, pid + P, P, D, DO, DO_P, BN_O, counter, phase * P, flag, PREFETCH, SPIN_LIMIT,
                                 1, POLL)
            else:
                _grid_barrier(counter, phase * P, flag, SPIN_LIMIT, POLL)
            src = o_ptr
        else:
            w, w2 = _handoff(lo, pid, P, D, DO, DO_P, BN_O, counter, phase * P, flag, PREFETCH, SPIN_LIMIT, DEPTH,
                             POLL)
            src = a_ptr
        cols = tl.arange(0, DO_P)
        x = tl.load(src + cols, mask=cols < DO, other=0.0, cache_modifier=".cg").to(tl.float32)
        _gemv(lo, w, w2, x, a_ptr, h_ptr, pid, P, D, DO, DO_P, BN_O, True, h_ptr, h_ptr, 0, 128, DEPTH)
        phase += 1
        w, w2 = _handoff(lgu, pid, P, NGU, D, D, BN_GU, counter, phase * P, flag, PREFETCH, SPIN_LIMIT, DEPTH,
                         POLL)
        x = _normed_row(h_ptr, ones, D, eps, DT)
        _gemv(lgu, w, w2, x, g_ptr, h_ptr, pid, P, NGU, D, D, BN_GU, False, h_ptr, h_ptr, 0, 128, DEPTH)
        phase += 1
        w, w2 = _handoff(ld, pid, P, D, DI, DI_P, BN_D, counter, phase * P, flag, PREFETCH, SPIN_LIMIT, DEPTH, POLL)
        cols = tl.arange(0, DI_P)
        gate = tl.load(g_ptr + cols, mask=cols < DI, other=0.0, cache_modifier=".cg").to(tl.float32)
        up = tl.load(g_ptr + DI + cols, mask=cols < DI, other=0.0, cache_modifier=".cg").to(tl.float32)
        x = ((gate * tl.sigmoid(gate)).to(DT).to(tl.float32) * up).to(DT).to(tl.float32)
        _gemv(ld, w, w2, x, g_ptr, h_ptr, pid, P, D, DI, DI_P, BN_D, True, h_ptr, h_ptr, 0, 128, DEPTH)
        phase += 1
        # the next layer's q/k/v (after the last layer, layer 0's again: read and left unused)
        nxt = wqkv + ((layer + 1) % L) * NQKV * D
        w, w2 = _handoff(nxt, pid, P, NQKV, D, D, BN_QKV, counter, phase * P, flag, PREFETCH, SPIN_LIMIT, DEPTH,
                         POLL)


@triton.jit
def _barriers_kernel(counter, flag, N: tl.constexpr, SPIN_LIMIT: tl.constexpr, POLL: tl.constexpr):
    """N grid barriers and nothing else: what a barrier costs the launch."""
    P = tl.num_programs(0)
    for i in range(N):
        _grid_barrier(counter, (i + 1) * P, flag, SPIN_LIMIT, POLL)


def barrier_rows(dev: torch.device, programs: int, count: int, polls: list[int], reps: int) -> list[dict]:
    """Microseconds a grid barrier over `programs` programs, per poll mode (a launch of `count` barriers,
    less a launch of one, over count - 1)."""
    counter = torch.zeros(1, device=dev, dtype=torch.int32)
    flag = torch.zeros(1, device=dev, dtype=torch.int32)
    rows = []
    for poll in polls:
        def launch(n: int, poll: int = poll) -> None:
            counter.zero_()
            _barriers_kernel[(programs,)](counter, flag, N=n, SPIN_LIMIT=1 << 16, POLL=poll, num_warps=8)

        many, one = _graph_ms(functools.partial(launch, count), reps), _graph_ms(functools.partial(launch, 1), reps)
        rows.append({"what": f"{count} barriers only, poll {poll}", "ms": many,
                     "us_per_barrier": (many - one) * 1e3 / (count - 1), "barrier_timeouts": int(flag.item())})
        print(rows[-1], flush=True)
    return rows


def _rms(h: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    return (h * torch.rsqrt(h.pow(2).mean() + eps)).to(dtype)


def torch_layers(h: torch.Tensor, w: dict[str, torch.Tensor], eps: float, do: int, di: int,
                 kv: dict | None = None) -> torch.Tensor:
    """The same arithmetic, one cuBLAS launch per projection (h float32 of shape (D,), updated in place);
    with `kv` (caches kc / vc [L, TMAX, HKV, HD], `t`, `g`), each layer writes its k and v at position t - 1
    and attends over t positions with SDPA."""
    dt = w["qkv"].dtype
    for layer in range(w["qkv"].shape[0]):
        a = F.linear(_rms(h, eps, dt)[None], w["qkv"][layer])[0]
        if kv is None:
            o = a[:do]
        else:
            kc, vc, t = kv["kc"][layer], kv["vc"][layer], kv["t"]
            hkv, hd = kc.shape[1], kc.shape[2]
            nq = hkv * kv["g"] * hd
            kc[t - 1] = a[nq:nq + hkv * hd].view(hkv, hd)
            vc[t - 1] = a[nq + hkv * hd:nq + 2 * hkv * hd].view(hkv, hd)
            q = a[:nq].view(1, hkv * kv["g"], 1, hd)
            o = F.scaled_dot_product_attention(q, kc[:t].transpose(0, 1)[None], vc[:t].transpose(0, 1)[None],
                                               enable_gqa=True).reshape(-1)
        h += F.linear(o[None], w["o"][layer])[0].float()
        g = F.linear(_rms(h, eps, dt)[None], w["gu"][layer])[0]
        x = (F.silu(g[:di].float()).to(dt).float() * g[di:].float()).to(dt)
        h += F.linear(x[None], w["d"][layer])[0].float()
    return h


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def persistent_layers(h: torch.Tensor, w: dict[str, torch.Tensor], eps: float, do: int, di: int,
                      programs: int, bn: dict[str, int], prefetch: bool, num_warps: int, depth: int,
                      scratch: dict[str, torch.Tensor], kv: dict | None = None, poll: int = 0) -> None:
    """One launch of `_layers_kernel` over `programs` programs (all resident: one an SM); `kv` as for
    `torch_layers`, with `ts` positions a split."""
    d = h.shape[0]
    scratch["counter"].zero_()
    if kv is None:
        kc = vc = scratch["a"]
        t = tmax = hkv = g = hd = splits = 1
    else:
        kc, vc, t, g, ts = kv["kc"], kv["vc"], kv["t"], kv["g"], kv["ts"]
        tmax, hkv, hd = kc.shape[1], kc.shape[2], kc.shape[3]
        splits = -(-t // ts)
    _layers_kernel[(programs,)](
        h, w["qkv"], w["o"], w["gu"], w["d"], scratch["a"], scratch["o"], scratch["g"], kc, vc, scratch["part"],
        scratch["hcnt"], scratch["counter"], scratch["flag"], scratch["ones"], scratch["cos"], scratch["sin"],
        scratch["slot"], scratch["table"], scratch["ctx"], eps,
        L=w["qkv"].shape[0], D=d, NQKV=w["qkv"].shape[1], DO=do, DO_P=_pow2(do), NGU=w["gu"].shape[1],
        DI=di, DI_P=_pow2(di), BN_QKV=bn["qkv"], BN_O=bn["o"], BN_GU=bn["gu"], BN_D=bn["d"],
        ATTN=kv is not None, TMAX=tmax, HKV=hkv, G=g, HD=hd, S=splits, SP=_pow2(splits), SCALE=hd ** -0.5,
        PREFETCH=prefetch, SPIN_LIMIT=1 << 16, DEPTH=depth, POLL=poll, num_warps=num_warps)


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


def _fresh(kv: dict | None) -> dict | None:
    """`kv` with caches of its own (each path writes this step's k and v into them)."""
    return None if kv is None else {**kv, "kc": kv["kc"].clone(), "vc": kv["vc"].clone()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--context", type=int, nargs="+", default=[0, 512],
                        help="cached positions attended at the step, this step's included; 0 leaves attention "
                             "out (the GEMVs alone)")
    parser.add_argument("--reps", type=int, default=50, help="timed graph replays (median)")
    parser.add_argument("--warps", type=int, nargs="+", default=[8], help="num_warps values to try (default 8)")
    parser.add_argument("--depth", type=int, nargs="+", default=[1, 2], choices=(1, 2),
                        help="weight tiles a program keeps in flight in a projection (default: both)")
    parser.add_argument("--poll", type=int, nargs="+", default=[0, 1, 2], choices=(0, 1, 2),
                        help="how the barriers poll: 0 an atomic add of zero, 1 an acquire load, 2 as 0 with a "
                             "short sleep between polls (default: all three)")
    parser.add_argument("--barriers", type=int, default=140,
                        help="barriers in the barrier-only launch that times a barrier (default 140: 5 a layer)")
    parser.add_argument("--barriers-only", action="store_true", help="time the barriers alone and stop")
    parser.add_argument("--tiny", action="store_true", help="small shapes, one program: the CPU check")
    parser.add_argument("--out", type=Path, default=None, help="directory for the JSON (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.layers < 1 or args.reps < 1 or args.barriers < 2 or any(c < 0 for c in args.context):
        parser.error(f"--layers, --reps must be positive, --barriers at least 2 and --context >= 0, got "
                     f"{args.layers}, {args.reps}, {args.barriers}, {args.context}")
    cuda = torch.cuda.is_available() and not args.tiny
    dev = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    if args.tiny:  # 4 query heads, 2 kv heads of 16
        d, hkv, g, hd, ngu, di, layers = 64, 2, 2, 16, 192, 96, 2
        contexts = [0, 20]
        bns = [{"qkv": 16, "o": 16, "gu": 16, "d": 16}]
        programs = 1
    else:  # Qwen3-0.6B: 16 query heads, 8 kv heads of 128
        d, hkv, g, hd, ngu, di, layers = 1024, 8, 2, 128, 6144, 3072, args.layers
        contexts = args.context
        bns = [{"qkv": 32, "o": 8, "gu": 32, "d": 8}, {"qkv": 16, "o": 8, "gu": 16, "d": 8},
               {"qkv": 32, "o": 16, "gu": 32, "d": 16}]
        programs = torch.cuda.get_device_properties(dev).multi_processor_count
    do, nqkv = hkv * g * hd, (hkv * g + 2 * hkv) * hd
    eps = 1e-6
    # bf16 as served; the CPU check in float32, whose roundings the interpreter and torch share (the
    # interpreter's float32 -> bf16 conversion does not round as torch's does)
    dtype, limit = (torch.float32, 1e-4) if args.tiny else (torch.bfloat16, 2e-2)

    def weight(n: int, k: int) -> torch.Tensor:
        return (torch.randn(layers, n, k, device=dev) * k ** -0.5).to(dtype)

    w = {"qkv": weight(nqkv, d), "o": weight(d, do), "gu": weight(ngu, d), "d": weight(d, di)}
    h0 = torch.randn(d, device=dev)
    weight_bytes = sum(t.numel() * t.element_size() for t in w.values())
    result: dict = {"layers": layers, "weight_bytes": weight_bytes, "programs": programs, "by_context": {}}
    ceil = None
    if cuda:
        from _common import measure_ceilings

        ceil = measure_ceilings(dev, True, False)["copy_bytes_per_s"]
        result["copy_bytes_per_s"] = ceil
        result["barriers"] = barrier_rows(dev, programs, args.barriers, args.poll, args.reps)
        print_table(result["barriers"], f"grid barriers over {programs} programs")
        if args.barriers_only:
            write_result("probe-persistent-layer", result, args.out)
            return 1 if any(r["barrier_timeouts"] for r in result["barriers"]) else 0
    failed = 0
    for t in contexts:
        kv0 = None
        if t:
            tmax = _pow2(t)
            kv0 = {"kc": torch.randn(layers, tmax, hkv, hd, device=dev).to(dtype),
                   "vc": torch.randn(layers, tmax, hkv, hd, device=dev).to(dtype), "t": t, "g": g,
                   "ts": 8 if args.tiny else _pow2(-(-t // max(1, programs // hkv)))}

        scratch = {"a": torch.empty(nqkv, device=dev, dtype=dtype), "o": torch.empty(do, device=dev, dtype=dtype),
                   "g": torch.empty(ngu, device=dev, dtype=dtype),
                   "part": torch.empty(hkv * 64 * g * (hd + 2), device=dev),  # up to 64 splits a head
                   "hcnt": torch.zeros(hkv, device=dev, dtype=torch.int32),
                   "counter": torch.zeros(1, device=dev, dtype=torch.int32),
                   "flag": torch.zeros(1, device=dev, dtype=torch.int32),
                   # attention's other inputs: unit norm weights, rope at angle 0, the step at position t - 1 of
                   # one block (built here, outside the timed graph)
                   "ones": torch.ones(d, device=dev, dtype=dtype), "cos": torch.ones(hd, device=dev, dtype=dtype),
                   "sin": torch.zeros(hd, device=dev, dtype=dtype), "slot": torch.full((1,), max(t, 1) - 1, device=dev),
                   "table": torch.zeros(1, device=dev, dtype=torch.int32),
                   "ctx": torch.full((1,), t, device=dev, dtype=torch.int32)}
        if kv0 is not None and -(-t // kv0["ts"]) > 64:
            parser.error(f"--context {t}: more than 64 splits a head")
        want = torch_layers(h0.clone(), w, eps, do, di, _fresh(kv0))
        kv_bytes = 0 if kv0 is None else 2 * layers * t * hkv * hd * kv0["kc"].element_size()
        rows = []
        if cuda:
            ms = _graph_ms(functools.partial(torch_layers, h0.clone(), w, eps, do, di, _fresh(kv0)), args.reps)
            rows.append({"what": "cuBLAS + SDPA, a launch per op (graph)" if t else "cuBLAS, a launch per projection "
                         "(graph)", "ms": ms, "us_per_layer": ms * 1e3 / layers,
                         "fraction_of_copy": (weight_bytes + kv_bytes) / (ms * 1e-3) / ceil, "max_err": None})
        variants = itertools.product(bns, (False, True), args.warps if cuda else [4], args.depth,
                                     args.poll if cuda else [0])  # the interpreter runs no inline PTX
        for bn, prefetch, warps, depth, poll in variants:
            h, kv = h0.clone(), _fresh(kv0)
            scratch["flag"].zero_()
            persistent_layers(h, w, eps, do, di, programs, bn, prefetch, warps, depth, scratch, kv, poll)
            err = float((h - want).abs().max() / want.abs().max())
            row = {"what": f"persistent, BN {bn}, prefetch {prefetch}, warps {warps}, depth {depth}, poll {poll}",
                   "max_err": err, "barrier_timeouts": int(scratch["flag"].item()),
                   "unmerged_heads": int((scratch["hcnt"] != 0).sum().item())}
            if cuda:
                call = functools.partial(persistent_layers, h, w, eps, do, di, programs, bn, prefetch,
                                         warps, depth, scratch, kv, poll)
                ms = _graph_ms(call, args.reps)
                row.update(ms=ms, us_per_layer=ms * 1e3 / layers,
                           fraction_of_copy=(weight_bytes + kv_bytes) / (ms * 1e-3) / ceil)
                row["barrier_timeouts"] = int(scratch["flag"].item())
            rows.append(row)
            print(t, row, flush=True)
        what = f"attention over {t} positions" if t else "no attention"
        print_table(rows, f"batch 1, {layers} layers, {what} (max_err: the final residual's error relative to "
                          "the per-launch path)")
        result["by_context"][str(t)] = {"kv_bytes": kv_bytes, "rows": rows}
        failed += sum(1 for r in rows
                      if r.get("max_err") is not None
                      and (r["max_err"] > limit or r["barrier_timeouts"] or r["unmerged_heads"]))
    if cuda or args.out:
        write_result("probe-persistent-layer", result, args.out)
    if failed:
        print(f"{failed} configuration(s) disagree with the per-launch path, timed out at a barrier or left a "
              "head's merge counter set")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
