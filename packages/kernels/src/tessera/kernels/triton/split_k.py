"""What the decode-shape (M <= 16) GEMVs share: the dense one (`gemv`) and the int8 / int4 weight-only
ones (`quant_gemv`). Their configs, pruned to the shape; the split of K over SPLIT_K programs, whole BK
tiles each; and the combine of the split's float32 partials inside the same launch.

Every program writes its partial tile to a workspace and bumps a per-N-tile counter (acquire/release);
the program that arrives last sums the SPLIT_K partials in split order (deterministic), casts, stores,
and resets the counter to zero for the next launch. One launch, no memset, no host sync, so it is
CUDA-graph capturable. The counters and the partials' workspace are allocated once per device and
stream (and N), never per call. Counters must start at zero, and a zero fill recorded inside a graph
runs only when that graph replays: a stream that captures takes a counter set zeroed eagerly
beforehand (`stream_counters`).
"""

from __future__ import annotations

import functools
import threading

import torch
import triton
import triton.language as tl

from tessera.kernels.triton.tuning import bucket

#: Largest M the decode GEMVs serve; larger M goes to the tiled tl.dot kernels (prefill).
MAX_M = 16
#: Split-K only below this N: a wider N already fills the GPU, and the workspace stays small.
SPLIT_MAX_N = 16384
#: Counter slots per (device, stream): one per N tile of a split launch (N <= SPLIT_MAX_N, BN >= 4).
COUNTER_SLOTS = SPLIT_MAX_N // 4


def config(bn: int, bk: int, split: int, warps: int, stages: int, m1_dot: bool = False,
           words: bool = False) -> triton.Config:
    """A GEMV config: BN x BK tiles, K split over `split` programs; M1_DOT (M == 1 padded to a tl.dot
    tile) and WORDS (weights read as int32 words) select the kernels' other paths."""
    kw = {"BN": bn, "BK": bk, "SPLIT_K": split} | ({"M1_DOT": True} if m1_dot else {})
    kw |= {"WORDS": True} if words else {}
    return triton.Config(kw, num_warps=warps, num_stages=stages)


def split_ok(c: triton.Config, n: int, k: int) -> bool:
    """Whether `c` may split this shape: N small enough for the workspace, two tiles per split at least."""
    split, bk = c.kwargs["SPLIT_K"], c.kwargs["BK"]
    return split == 1 or (n <= SPLIT_MAX_N and triton.cdiv(k, bk) >= 2 * split)


def fits_k(configs: list[triton.Config], k: int) -> list[triton.Config]:
    # A tile much longer than K reads nothing more but wastes registers; keep the shortest if all are.
    kept = [c for c in configs if c.kwargs["BK"] <= max(32, bucket(k))]
    return kept or [min(configs, key=lambda c: c.kwargs["BK"])]


def keep_splittable(configs: list[triton.Config], n: int, k: int) -> list[triton.Config]:
    """The configs that may split this shape, or the first one unsplit (its path flags kept) if none may."""
    kept = [c for c in configs if split_ok(c, n, k)]
    if kept:
        return kept
    c = configs[0]
    return [config(c.kwargs["BN"], c.kwargs["BK"], 1, c.num_warps, c.num_stages, c.kwargs.get("M1_DOT", False),
                   c.kwargs.get("WORDS", False))]


@triton.jit
def k_range(K, pid_k, BK: tl.constexpr, SPLIT_K: tl.constexpr):
    """[start, end) of this split's K range: whole BK tiles, so tile starts stay multiples of BK."""
    per = tl.cdiv(tl.cdiv(K, BK), SPLIT_K) * BK
    start = pid_k * per
    return start, tl.minimum(start + per, K)


def even(args: dict) -> bool:
    """Heuristic EVEN: N and K are whole tiles, so the kernels load without masks."""
    return args["N"] % args["BN"] == 0 and args["K"] % args["BK"] == 0


@triton.jit
def combine(acc, WS, CNT, M, N, pid_n, pid_k, BM: tl.constexpr, BN: tl.constexpr, SPLIT_K: tl.constexpr):
    """(the sum of the split's partials of this N tile, [BM, BN] float32; whether this program holds it). Without
    a split, acc itself; with SPLIT_K > 1 every program writes its partial acc, and the last to arrive sums all
    SPLIT_K of them in split order and resets the tile's counter (the others hold zeros and False)."""
    if SPLIT_K == 1:
        total = acc
        last = tl.full((), 1, tl.int1)
    else:
        offs_m = tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        ws = WS + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(ws + pid_k * M * N, acc, mask=mask)
        # Every thread's partial is written before one thread publishes it (release); the last
        # arrival's acquire makes all partials visible to its threads, read past L1 (.cg).
        tl.debug_barrier()
        arrived = tl.atomic_add(CNT + pid_n, 1, sem="acq_rel", scope="gpu")
        last = arrived == SPLIT_K - 1
        total = tl.zeros((BM, BN), dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):
            total += tl.load(ws + s * M * N, mask=mask & last, other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(CNT + pid_n, 0, mask=last, sem="relaxed", scope="gpu")
    return total, last


@triton.jit
def combine_and_store(acc, Y, WS, CNT, M, N, stride_ym, pid_n, pid_k, BM: tl.constexpr, BN: tl.constexpr,
                      SPLIT_K: tl.constexpr):
    """Store acc [BM, BN] (float32) to Y; with SPLIT_K > 1 the last program of this N tile stores the
    sum of all SPLIT_K partials, in split order (`combine`)."""
    total, last = combine(acc, WS, CNT, M, N, pid_n, pid_k, BM, BN, SPLIT_K)
    offs_m = tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    y_ptrs = Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, total.to(Y.dtype.element_ty), mask=mask & last)


#: Counter sets a device keeps zeroed for streams that capture CUDA graphs (see `stream_counters`).
CAPTURE_SETS = 8

_counter_lock = threading.Lock()
_counters: dict[tuple[torch.device, int], torch.Tensor] = {}
_capture_slabs: dict[torch.device, torch.Tensor] = {}
_capture_taken: dict[torch.device, int] = {}


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def stream_counters(device: torch.device, stream: int) -> torch.Tensor:
    """This stream's split-K arrival counters, at zero (every launch leaves them so), made once.

    On an eager stream they are zero-filled on the spot. A stream that is capturing a CUDA graph cannot
    do that: the fill would be recorded in the graph and run only when that graph replays, and the next
    graph captured on the stream, replayed first, would start from whatever the memory held. Such a
    stream takes one of `CAPTURE_SETS` sets that the device's first eager call zeroed instead."""
    counters = _counters.get((device, stream))
    if counters is not None:
        return counters
    with _counter_lock:
        if (device, stream) in _counters:
            return _counters[(device, stream)]
        if _capturing(device):
            slab = _capture_slabs.get(device)
            if slab is None:
                raise RuntimeError(
                    f"the first split-K GEMV launch on {device} is inside a CUDA-graph capture, but its arrival "
                    "counters must be zeroed outside the graph: run one eager call on this device (a warm-up "
                    "step) before capturing")
            taken = _capture_taken.get(device, 0)
            if taken == CAPTURE_SETS:
                raise RuntimeError(f"more than {CAPTURE_SETS} streams captured split-K GEMVs on {device}")
            counters, _capture_taken[device] = slab[taken], taken + 1
        else:
            if device not in _capture_slabs:
                _capture_slabs[device] = torch.zeros(CAPTURE_SETS, COUNTER_SLOTS, dtype=torch.int32, device=device)
            counters = torch.zeros(COUNTER_SLOTS, dtype=torch.int32, device=device)
        _counters[(device, stream)] = counters
        return counters


@functools.cache
def partials(device: torch.device, stream: int, n: int, split: int) -> torch.Tensor:
    # Uninitialised: every split program writes its partial before the last one reads them. Sized for
    # M = MAX_M, so one buffer per (N, split) serves every M; never freed, so a CUDA graph that captured
    # its address stays valid. Launches on one stream run in order, so they can share it.
    return torch.empty(split * MAX_M * n, dtype=torch.float32, device=device)


def stream_key(device: torch.device) -> int:
    # The raw handle, as Triton's launcher reads it: no Stream object built per call.
    return torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0


def workspace(n: int, splits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-K partials (>= splits * MAX_M * N float32) and this stream's counters; both cached per
    (device, stream), so a launch allocates nothing. With `splits` <= 1 the partials are the counters
    (a launch that does not split reads neither)."""
    stream = stream_key(device)
    counters = stream_counters(device, stream)
    if splits <= 1:
        return counters, counters
    return partials(device, stream, n, splits), counters


@functools.cache
def split_cap(kernel: triton.runtime.Autotuner) -> int:
    """The widest split among `kernel`'s configs."""
    return max(c.kwargs["SPLIT_K"] for c in kernel.configs)


def max_split(kernel: triton.runtime.Autotuner, n: int) -> int:
    """The widest split `kernel` may launch at N = n: the workspace a launch must have."""
    # A single config (the interpreter's) is never pruned, so it bounds the workspace as it is.
    if len(kernel.configs) == 1 or n <= SPLIT_MAX_N:
        return split_cap(kernel)
    return 1


def grid(n: int):
    """The launch grid: N tiles by K splits."""
    return lambda meta: (triton.cdiv(n, meta["BN"]), meta["SPLIT_K"])
