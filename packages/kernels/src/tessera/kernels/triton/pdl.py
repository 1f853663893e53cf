"""Programmatic dependent launch (PDL) for the decode kernels: the next kernel starts while this one ends.

A decode step is a chain of short kernels, and each pays a ramp: its launch, then a memory latency
before its first tile arrives, while the SMs idle behind the previous kernel's tail. On Hopper a kernel
launched with the programmatic-stream-serialization attribute may start as soon as every program of
the kernel before it has executed `griddepcontrol.launch_dependents`; it must then execute
`griddepcontrol.wait` (which returns once that kernel has completed and its writes are visible)
before it reads anything an earlier kernel wrote, and before it writes anything at all. CUDA graphs
keep these edges when a stream is captured.

Every kernel here that takes `PDL` follows one shape, `enter` (or `enter_prefetching`) first:

- in mode 2, a GEMV asks the L2 to start fetching (`cp.async.bulk.prefetch.L2`) the first bytes of its
  weight rows, which no kernel writes, so they stream in while the previous kernel runs; the total is
  capped (`PREFETCH_BUDGET`), so a large matrix does not evict what the previous kernel still uses;
- it waits, unconditionally, in every program. A PDL kernel that skipped the wait could finish before
  its predecessor and let the next one read stale memory, so the wait is not optional;
- only then does it signal its dependents. Signalling at the very start instead lets a chain of
  kernels launch all at once (each starts as soon as the one before it is resident), and their
  prefetches then evict one another: on an H200, back-to-back int8 GEMVs at M = 16 ran 1.6x slower
  that way. Signalled after the wait, at most one kernel runs ahead, and only once its predecessor
  has completed; it can only launch when all of this kernel's programs are running, so it never takes
  SM slots from programs of this one that are still to be scheduled.

Mode 3 (early weights, the default) moves a GEMV's first weight tile, rather than an L2 prefetch, ahead
of the wait: each program of the M == 1 paths with whole tiles (`EVEN`) loads its first tile into
registers, then waits, then reads x. Nothing else moves: x, the split-K workspace, the counters and the
output are still touched only after the wait. That is safe only while the weights are not written by the
kernel launched just before the GEMV. A model's forward pass guarantees it (its weights are parameters
and buffers); a GEMV whose "weight" the previous kernel of a chain produced would not. So the GEMVs load
early only where the caller has declared it, inside `tessera.kernels.static_weights()` (the serving
engine's forward passes and graph captures); elsewhere mode 3 launches as mode 1. Measured on an H200
(2026-12-04, mode 1 -> 3): Qwen3-0.6B batch-1 graph decode 1042 -> 1158 tokens/s (two processes on one
machine; 1023 -> 1156 with the order reversed); a Llama-3.2-1B decode step 0.910 -> 0.877 ms in bf16,
0.678 -> 0.660 ms int8, 0.706 -> 0.692 ms AWQ-int4 (one process).

Mode 4 (whole share, opt-in) goes further under the same declaration: each program of those paths
loads up to its first four weight tiles before the wait, which for most decode shapes is all the
weights it multiplies, so a GEMV's weight reads overlap the kernel before it rather than only their
first latency. The tiles are then multiplied in the loop's order, so every mode gives the same bits.
It costs registers (four tiles held a program), and on an H200 (2026-12-05) that cost more than the longer
overlap gained: the Qwen3-0.6B graph decode and the Llama-3.2-1B decode steps were slower than in mode 3
(docs/kernels.md, "Whole share").

PDL is used on CUDA devices of compute capability 9.0 and up. `TESSERA_PDL` (read at import) or
`set_mode` picks the mode: 0 off, 1 launch overlap, 2 launch overlap and the GEMVs' L2 prefetch, 3 (the
default) launch overlap and, under `static_weights()`, the GEMVs' first weight tile loaded before the
wait, 4 the same with up to four tiles. Measured on an H200 (CUDA graphs, 2026-12-03), mode 1 against
mode 0: a Llama-3.2-1B decode step 1.022 -> 0.929 ms in bf16, 0.786 -> 0.681 ms int8, 0.840 -> 0.732 ms
AWQ-int4; Qwen3-0.6B batch-1 graph decode 875-892 -> 990 tokens/s (other machine sessions). Mode 2 lost
to mode 1 on the bf16 and int8 steps (1.015 and 0.827 ms) and won only on AWQ's (0.747 ms), so it stays
opt-in. Under the interpreter PDL is always off and the kernels compile without it; `enter` compiles to
nothing there, so a test may still launch a kernel with PDL 3 or 4 to run its early-weights paths on the
CPU.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from tessera.kernels.support import triton_interpreting, weights_static

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # a Triton before 3.4: no PDL
    gdc_launch_dependents = gdc_wait = None

#: Weight bytes one launch asks the L2 to prefetch before its wait (a fifth of an H100/H200 L2).
PREFETCH_BUDGET = tl.constexpr(10 << 20)

#: The modes: no PDL, launch overlap only, launch overlap and the GEMVs' weight prefetch, launch overlap
#: and the GEMVs' first weight tile loaded before the wait, the same with up to four tiles.
OFF, OVERLAP, PREFETCH, EARLY, EARLY_ALL = 0, 1, 2, 3, 4

_INTERPRETING = tl.constexpr(triton_interpreting())


def _checked(mode: object, source: str) -> int:
    if str(mode) not in ("0", "1", "2", "3", "4"):
        raise ValueError(f"{source}={mode!r}: expected 0 (off), 1 (launch overlap), 2 (overlap and prefetch), "
                         "3 (overlap and early weights) or 4 (overlap and early weights, whole share)")
    return int(mode) if gdc_wait is not None else OFF


_mode = _checked(os.environ.get("TESSERA_PDL", str(EARLY)), "TESSERA_PDL")


def set_mode(mode: int) -> int:
    """Set the PDL mode for later launches (a graph already captured keeps what it was captured with);
    returns the previous mode, so a test or a benchmark can compare the modes in one process."""
    global _mode
    previous, _mode = _mode, _checked(mode, "mode")
    return previous


def mode() -> int:
    return _mode


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def launch_options(device: torch.device, gemv: bool = False) -> dict[str, int | bool]:
    """The kwargs a PDL-aware kernel launch adds: `PDL` (the mode, a constexpr that compiles the prologue
    in) and Triton's `launch_pdl` (the launch attribute) on a capable CUDA device; else PDL=0. Modes 3
    and 4 stay so only for a GEMV (`gemv`) launched inside `static_weights()`; otherwise they launch as 1."""
    if _mode and device.type == "cuda" and not triton_interpreting() and _capable(
            torch.cuda.current_device() if device.index is None else device.index):
        mode = _mode
        if mode >= EARLY and not (gemv and weights_static()):
            mode = OVERLAP
        return {"PDL": mode, "launch_pdl": True}
    return {"PDL": OFF}


@triton.jit
def enter(PDL: tl.constexpr):
    """Wait for the previous kernel, then let the next one launch (nothing when PDL is 0, or under the
    interpreter)."""
    if PDL != 0 and not _INTERPRETING:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def prefetch_l2(addr, nbytes, ONE_THREAD: tl.constexpr = False):
    """One bulk L2 prefetch per element: nbytes (a multiple of 16; nothing when 0) from addr (16-byte aligned).
    ONE_THREAD: asked by thread 0 alone, for scalars, which every thread holds (one request, not one a
    thread: the persistent decode kernel asks a tile at a time)."""
    everyone = nbytes * 0 + (0 if ONE_THREAD else 1)  # operand $3: whether each thread asks
    tl.inline_asm_elementwise(
        "{ .reg .pred p, q; .reg .b32 t; mov.u32 t, %tid.x; setp.eq.u32 p, t, 0; setp.ne.s32 q, $3, 0; "
        "or.pred p, p, q; setp.gt.s32 q, $2, 0; and.pred p, p, q; "
        "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.b32 $0, 0; }",
        "=r,l,r,r", [addr, nbytes, everyone], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def enter_prefetching(PDL: tl.constexpr, W, rows, rows_ok, stride_row, col_start, col_end):
    """`enter`, asking the L2 first for the bytes of W[rows, col_start:col_end] (elements of W's type,
    `stride_row` elements apart; PDL == 2 only): each program takes its share of `PREFETCH_BUDGET`, from
    col_start."""
    if PDL == 2:
        ELEM: tl.constexpr = W.dtype.element_ty.primitive_bitwidth // 8
        programs = tl.num_programs(0) * tl.num_programs(1)
        per_row = PREFETCH_BUDGET // (programs * rows.shape[0])
        start = W.to(tl.int64) + (rows.to(tl.int64) * stride_row + col_start) * ELEM
        end = start + (col_end - col_start).to(tl.int64) * ELEM
        first = (start + 15) & -16
        size = tl.minimum((end - first) & -16, per_row & -16)
        prefetch_l2(first, tl.where(rows_ok & (end > first), size, 0).to(tl.int32))
    enter(PDL)
