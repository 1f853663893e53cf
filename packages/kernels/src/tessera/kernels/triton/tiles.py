"""Launch-order helpers shared by the tiled GEMM kernels."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grouped_tile(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of output tile number `tile` in grouped order: GROUP_M consecutive row tiles walk
    the column tiles together, so they share weight tiles while those sit in L2."""
    first_m = tile // (GROUP_M * num_n) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile % (GROUP_M * num_n)) % group_m
    pid_n = (tile % (GROUP_M * num_n)) // group_m
    return pid_m, pid_n
