"""Helpers shared by the kernels: launch order for the tiled GEMMs, and float32 arithmetic rounded as IEEE
requires where the data is float32.

Triton's `/` and `tl.sqrt` compile to the GPU's fast approximations (`div.full.f32`, about 2 ulp;
`sqrt.approx.ftz.f32`). Under bf16 or fp16 data the rounding to the data type hides that, but float32 ops
answer to the catalogue's 1e-5 tolerance and the model's float32 parity against independent
implementations, so there the normalisations divide and take square roots correctly rounded
(`div.rn`, `sqrt.rn`), as torch's float32 ops do."""

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


@triton.jit
def divide(a, b, PRECISE: tl.constexpr):
    """a / b (float32 a; b may be an integer): correctly rounded when PRECISE (float32 data), else the fast
    division."""
    if PRECISE:
        return tl.div_rn(a, b * 1.0)
    else:
        return a / b


@triton.jit
def silu_mul_f32(g, u, DT: tl.constexpr):
    """silu(g) * u from float32 g and u, rounded as torch's eager ops round it in DT (silu to DT, then the
    product to DT; the division correctly rounded for float32), returned as float32. The `silu_mul` op and
    the gated GEMVs both form it here, so their values agree bit for bit."""
    act = divide(g, 1.0 + tl.exp(-g), DT == tl.float32).to(DT).to(tl.float32)
    return (act * u).to(DT).to(tl.float32)


@triton.jit
def inv_sqrt(x, PRECISE: tl.constexpr):
    """1 / sqrt(x): each step correctly rounded when PRECISE (float32 data), else the fast approximations."""
    if PRECISE:
        return tl.div_rn(1.0, tl.sqrt_rn(x))
    else:
        return 1.0 / tl.sqrt(x)
