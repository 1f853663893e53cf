"""Run as a script under TRITON_INTERPRET=1: the Triton `silu_mul`, called directly (as the gated quantized
matmuls' unfused path calls it) on the halves of a transposed fused gate/up output, whose last dim is not
contiguous, matches the reference at the catalogue's tolerance, and so do those matmuls' unfused paths.
(It read such halves as if contiguous: garbage, which the H200 showed as a 100% mismatch of
`matmul.int4_awq_gated` on its transposed sample where timing chose the unfused path.) Prints one JSON
list of failures, then "strided-ok"."""

from __future__ import annotations

import torch
from check_report import report, seed_arg

from tessera.kernels import reference, registry  # registering installs the interpreter fixes
from tessera.kernels.triton import quant_matmul, swiglu


def main() -> int:
    torch.manual_seed(seed_arg())
    failures = []
    for dtype in (torch.float32, torch.bfloat16):
        k = 40
        gu = torch.randn(2 * k, 3, dtype=dtype).T  # [3, 2k], strides (1, 3)
        tol = registry.catalogue["silu_mul"].tolerance(str(dtype).removeprefix("torch."))
        want = reference.silu_mul(gu[:, :k], gu[:, k:])
        for name, got in (("silu_mul of strided halves", swiglu.silu_mul(gu[:, :k], gu[:, k:])),
                          ("the gated matmuls' unfused silu_mul", quant_matmul._halves(gu))):
            try:
                torch.testing.assert_close(got, want, atol=tol.atol, rtol=tol.rtol)
            except AssertionError as e:
                failures.append(f"{dtype}: {name}: {' '.join(str(e).splitlines()[:3])}")
    return report(failures, "strided-ok")


if __name__ == "__main__":
    raise SystemExit(main())
