"""Run as a script under TRITON_INTERPRET=1: the fixes `interpreter_compat` makes to Triton's CPU interpreter
hold, so the CPU tests see what the GPU computes.

- float32 -> bfloat16 rounds to nearest even (torch's conversion, and the GPU's `cvt.rn`): by `.to`, with
  rtne asked for, and by a store into a bfloat16 tensor; infinities, NaN, overflow, subnormals, signed zero
  and ties included; round-toward-zero, asked for, still truncates;
- the Triton `silu_mul` in bfloat16 therefore rounds as torch's silu-then-product does (it had disagreed in
  three of four elements, every one toward zero).
Prints one JSON list of failures, then "interp-ok"."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from check_report import report, seed_arg

from tessera.kernels import reference, registry  # noqa: F401  (registering installs the interpreter fixes)
from tessera.kernels.triton import swiglu


@triton.jit
def _convert(X, DEFAULT, RTNE, STORED, RTZ, N: tl.constexpr):
    o = tl.arange(0, N)
    x = tl.load(X + o)
    tl.store(DEFAULT + o, x.to(tl.bfloat16))
    tl.store(RTNE + o, x.to(tl.bfloat16, fp_downcast_rounding="rtne"))
    tl.store(STORED + o, x)
    tl.store(RTZ + o, x.to(tl.bfloat16, fp_downcast_rounding="rtz"))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a == b) | (a.isnan() & b.isnan())).all()) and torch.equal(a.signbit(), b.signbit())


def main() -> int:
    torch.manual_seed(seed_arg())
    failures = []
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), 3.4e38, -3.39e38, 1e-40, -1e-39, 0.0, -0.0,
                            1.00390625, 1.01171875, -1.00390625, 2.0**-126])  # the 1.0039 pair: ties to even
    n = 2048
    x = torch.cat([special, torch.randn(n - special.numel()) * torch.logspace(-20, 20, n - special.numel())])
    outs = [torch.empty(n, dtype=torch.bfloat16) for _ in range(4)]
    _convert[(1,)](x, *outs, N=n)
    want = x.bfloat16()
    for name, got in zip(("default", "rtne", "store"), outs[:3], strict=False):
        if not _same(got, want):
            bad = (got != want) & ~(got.isnan() & want.isnan())
            failures.append(f"float32 -> bfloat16 ({name}) differs from torch at {bad.sum().item()} of {n}, "
                            f"e.g. {x[bad][:3].tolist()} -> {got[bad][:3].tolist()}, not {want[bad][:3].tolist()}")
    normal = x.isfinite() & (x.abs() < 3e38) & (x.abs() >= 2.0**-126)  # the interpreter's own rtz, unpatched
    trunc = (x.view(torch.int32) & -65536).view(torch.float32).bfloat16()  # clear the low 16 bits
    if not torch.equal(outs[3][normal], trunc[normal]):
        failures.append("float32 -> bfloat16 with rtz asked for no longer truncates")

    gu = torch.randn(64, 2 * 300, dtype=torch.bfloat16) * 3
    got = swiglu.silu_mul(gu[:, :300], gu[:, 300:])
    want = reference.silu_mul(gu[:, :300], gu[:, 300:])
    agree = (got == want).float().mean().item()
    if agree < 0.999:  # float32 exp may differ in its last bit from torch's, which moves a rare rounding
        failures.append(f"bfloat16 silu_mul agrees with torch's in only {agree:.1%} of elements")
    return report(failures, "interp-ok")


if __name__ == "__main__":
    raise SystemExit(main())
