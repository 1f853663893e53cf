"""Per-shape choices between two implementations of a decode-shaped product, timed once as a decode step
pays them and remembered for the rest of the process.

Which of two implementations wins (cuBLAS or the GEMV kernel; silu_mul and a GEMV, or the gated GEMV)
depends on the shape and the GPU, and a decode step runs the same few shapes over and over. `remembered`
makes a shape's choice at its first call, and `faster` times the two sides with `tuning.graph_bench`
(inside a captured CUDA graph, L2 cold), as a decode step under CUDA graphs pays them. A first call made
while the stream captures a CUDA graph cannot time anything: `remembered` then returns `UNSET` and
chooses nothing, and the caller takes its baseline (callers warm up before capturing).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

log = logging.getLogger(__name__)

#: How a decode shape chooses between a fused launch (a gated, normalised, SwiGLU-storing or rope-writing GEMV) and
#: the separate launches it replaces: "timed", the faster of the two in a CUDA-graph timing of the shape alone (made
#: once and remembered); "always", the fused one wherever it was timed and agreed (a fused CUDA GEMV that disagrees
#: is still refused). A shape timed alone pays for a launch less than a decode step's chain of dependent launches
#: does (the SwiGLU GEMV: 0.14 us faster alone, 2.3 us a layer faster in the step, H100, 2026-12-06), so a step may
#: gain from a fusion that loses alone. From `TESSERA_DECODE_FUSION`; read at each call, so a CUDA graph keeps the
#: policy in force when it was captured.
DECODE_FUSION = os.environ.get("TESSERA_DECODE_FUSION", "timed")
FUSION_POLICIES = ("timed", "always")

#: What `remembered` returns inside a CUDA-graph capture for a key with no choice yet.
UNSET = object()
# Reentrant: making one choice may time code that makes another (the gated down projection times
# silu_mul + `dense.linear`, which chooses its own shape).
_lock = threading.RLock()

T = TypeVar("T")


def remembered(table: dict, key: object, choose: Callable[[], T]) -> T | object:
    """table[key], made by `choose()` at the key's first call (under the lock); `UNSET` while the stream
    captures a CUDA graph and the key has no choice yet."""
    value = table.get(key, UNSET)
    if value is UNSET and not torch.cuda.is_current_stream_capturing():
        with _lock:
            if key not in table:
                table[key] = choose()
            value = table[key]
    return value


def fusion_policy() -> str:
    """`DECODE_FUSION`, checked: ValueError naming the variable and the value when it is not a policy."""
    if DECODE_FUSION not in FUSION_POLICIES:
        raise ValueError(f"TESSERA_DECODE_FUSION={DECODE_FUSION!r}: expected one of {', '.join(FUSION_POLICIES)}")
    return DECODE_FUSION


@dataclass(frozen=True)
class Fusion:
    """A fused launch's remembered choice at one shape: what runs it (`fused`: its function, its config, or True)
    and whether it beat the separate launches, each timed alone (`won`). A table holds None instead where the fused
    launch cannot run at all (it disagreed, or did not build)."""

    fused: object
    won: bool


def take(choice: object) -> object | None:
    """What a decode shape runs for its remembered fusion `choice` under the policy in force: `choice.fused` where
    it won, and under "always" (`fusion_policy`) where it lost too; None for the separate launches (also for a
    None choice); `UNSET` (no choice yet) as it is."""
    if choice is UNSET:
        return UNSET
    if isinstance(choice, Fusion) and (choice.won or fusion_policy() == "always"):
        return choice.fused
    return None


def faster(what: str, start: float, table: dict, key: object, baseline: tuple[str, Callable[[], object]],
           candidate: tuple[str, Callable[[], object]]) -> bool:
    """Whether `candidate` beats `baseline` (both tuned already) in CUDA-graph time; records both times in
    `table[key]` (microseconds, under their names) and logs the pick with `what` (the shape) and the
    time since `start` (a new shape costs a tuning sweep, seconds with a cold Triton cache: a serving
    engine's start-up spends most of its time here)."""
    from tessera.kernels.triton.tuning import graph_bench

    (base_name, base), (cand_name, cand) = baseline, candidate
    t_base, t_cand = graph_bench(base) * 1e3, graph_bench(cand) * 1e3
    table[key] = {f"{base_name}_us": t_base, f"{cand_name}_us": t_cand}
    log.info("%s: %s %.1f us, %s %.1f us -> %s (tuned in %.1f s)", what, base_name, t_base, cand_name, t_cand,
             cand_name if t_cand < t_base else base_name, time.perf_counter() - start)
    return t_cand < t_base
