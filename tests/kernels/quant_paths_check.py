"""Run as a script under TRITON_INTERPRET=1 (CPU) or on CUDA: the quantized matmuls' dispatch paths.

- the prefill dequantize kernels give exactly the reference's float32 weights rounded once to the
  activation dtype (int8; int4 at groups 32/64/128 with a partial last group);
- M > 64 with half-precision x goes through dequantize + torch.mm, and matches the reference;
- the autotuner runs once per shape: a repeated call launches the remembered config without it (a
  config's pre-hook, which sizes the fp8 TMA kernel's boxes, still runs), and returns the same result;
- fp8 from `TMA_MIN_ROWS` rows runs the persistent TMA kernel, below it the pointer kernel;
- the ops trace under torch.compile(fullgraph=True) and match eager.
Prints one JSON list of failures, then "paths-ok" if none.
"""

from __future__ import annotations

import torch
from check_report import report, seed_arg

from tessera.kernels import reference, registry  # registering installs the interpreter fixes
from tessera.kernels.support import triton_interpreting
from tessera.kernels.triton import fp8_matmul, quant_dequant, quant_gemv, quant_matmul


def _close(op: str, got: torch.Tensor, want: torch.Tensor) -> str | None:
    tol = registry.catalogue[op].tolerance(str(want.dtype).removeprefix("torch."))
    try:
        torch.testing.assert_close(got, want, atol=tol.atol, rtol=tol.rtol)
    except AssertionError as e:
        return " ".join(str(e).splitlines()[:3])
    return None


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(gen: torch.Generator, m: int, k: int, n: int, group: int, dtype: torch.dtype) -> dict[str, tuple]:
    x = torch.randn(m, k, generator=gen).to(dtype)
    w_q = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = ((torch.rand(n, generator=gen) + 0.5) / 127 * k**-0.5).to(dtype)
    groups = -(-k // group)
    qweight = reference.pack_int4(torch.randint(0, 16, (n, k), generator=gen))
    scales = ((torch.rand(n, groups, generator=gen) + 0.2) * k**-0.5 / 8).to(dtype)
    zeros = torch.randint(0, 16, (n, groups), generator=gen).to(dtype)
    w8 = (torch.randn(n, k, generator=gen) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
    ops = {"matmul.int8_weight_only": (x, w_q, scale), "matmul.int4_awq": (x, qweight, scales, zeros, group),
           "matmul.fp8": (x, w8, torch.rand(n, generator=gen) * 1e-2 + 1e-3)}
    return {op: tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args) for op, args in ops.items()}


class _Counter:
    """Counts calls of `obj.name` (kept working) while installed."""

    def __init__(self, obj: object, name: str) -> None:
        self.obj, self.name, self.calls = obj, name, 0
        self.orig = getattr(obj, name)

    def __enter__(self) -> _Counter:
        def counted(*args: object, **kwargs: object) -> object:
            self.calls += 1
            return self.orig(*args, **kwargs)

        setattr(self.obj, self.name, counted)
        return self

    def __exit__(self, *exc: object) -> None:
        setattr(self.obj, self.name, self.orig)


def _same_weights(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Bitwise equal. Except that Triton 3.6's interpreter casts float32 -> bfloat16 by truncation (the
    GPU's cvt rounds to nearest even, and the GPU test holds bfloat16 to bitwise equality): under the
    interpreter a bfloat16 weight may sit one ulp toward zero of the reference's, never further."""
    if got.dtype != torch.bfloat16 or not triton_interpreting():
        return torch.equal(got, want)
    ulps = got.view(torch.int16).int() - want.view(torch.int16).int()
    return bool(((ulps == 0) | ((ulps == -1) & (got.abs() <= want.abs()))).all())


def check_dequantize(gen: torch.Generator, failures: list[str]) -> None:
    n, k = 21, 232  # 232 = 128 + 104: the last group of 64 and 128 is partial
    device = DEVICE
    for dtype in (torch.bfloat16, torch.float16):
        w_q = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8).to(device)
        scale = (torch.rand(n, generator=gen) / 100).to(dtype=dtype, device=device)
        want = (w_q.float() * scale.float()[:, None]).to(dtype)
        if not _same_weights(quant_dequant.dequantize_int8(w_q, scale, dtype), want):
            failures.append(f"dequantize_int8 {dtype} differs from the reference weights")
        for group in (32, 64, 128):
            groups = -(-k // group)
            qweight = reference.pack_int4(torch.randint(0, 16, (n, k), generator=gen)).to(device)
            scales = (torch.rand(n, groups, generator=gen) / 10).to(dtype=dtype, device=device)
            zeros = torch.randint(0, 16, (n, groups), generator=gen).to(dtype=dtype, device=device)
            want = reference.dequantize_int4(qweight, scales, zeros, group).to(dtype)
            if not _same_weights(quant_dequant.dequantize_int4(qweight, scales, zeros, group, dtype), want):
                failures.append(f"dequantize_int4 {dtype} g{group} differs from the reference weights")


def check_paths_and_tuning(gen: torch.Generator, failures: list[str]) -> None:
    impls = {"matmul.int8_weight_only": quant_matmul.matmul_int8_weight_only,
             "matmul.int4_awq": quant_matmul.matmul_int4_awq, "matmul.fp8": fp8_matmul.matmul_fp8}
    tuned = {"matmul.int8_weight_only": [quant_gemv._int8_tuned, quant_matmul._int8_kernel],
             "matmul.int4_awq": [quant_gemv._int4_tuned, quant_matmul._int4_kernel],
             "matmul.fp8": [fp8_matmul._fp8_gemm_kernel, fp8_matmul._fp8_gemm_tma_kernel]}
    for dtype in (torch.float32, torch.bfloat16):
        for m in (1, 20, 70, fp8_matmul.TMA_MIN_ROWS + 2):
            for op, args in _inputs(gen, m, 96, 48, 32, dtype).items():
                if op == "matmul.fp8" and dtype == torch.float32:
                    continue
                name = f"{op} {dtype} m{m}"
                want = registry.get(op, backend="reference")(*args)
                with (_Counter(quant_dequant, "int8_mm") as mm8, _Counter(quant_dequant, "int4_mm") as mm4,
                      _Counter(fp8_matmul, "_tma_launch") as tma):
                    first = impls[op](*args)
                dequantized = mm8.calls + mm4.calls
                if op == "matmul.fp8" and tma.calls != int(m >= fp8_matmul.TMA_MIN_ROWS):
                    failures.append(f"{name}: the TMA kernel ran {tma.calls} times")
                if op != "matmul.fp8" and dequantized != int(quant_dequant.serves(m, dtype)):
                    failures.append(f"{name}: dequantize + torch.mm ran {dequantized} times")
                err = _close(op, first, want)
                if err:
                    failures.append(f"{name}: {err}")
                counters = [_Counter(kernel, "run") for kernel in tuned[op]]
                for c in counters:
                    c.__enter__()
                try:
                    again = impls[op](*args)
                finally:
                    for c in counters:
                        c.__exit__()
                if any(c.calls for c in counters):
                    failures.append(f"{name}: the autotuner ran again for a remembered shape")
                if not torch.equal(first, again):
                    failures.append(f"{name}: a repeated call returned a different result")


def check_compile(gen: torch.Generator, failures: list[str]) -> None:
    args = _inputs(gen, 5, 64, 32, 32, torch.bfloat16)

    def step(x: torch.Tensor) -> torch.Tensor:
        a = registry("matmul.int8_weight_only", x, *args["matmul.int8_weight_only"][1:])
        b = registry("matmul.int4_awq", x, *args["matmul.int4_awq"][1:])
        c = registry("matmul.fp8", x, *args["matmul.fp8"][1:])
        return torch.cat((a, b, c), dim=1)

    x = args["matmul.fp8"][0]
    for op, a in args.items():
        if registry.get(op, *a).backend not in ("triton", "scaled_mm"):
            failures.append(f"compile check: {op} dispatches to {registry.get(op, *a).backend} here")
    eager = step(x)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    if not torch.equal(compiled, eager):
        failures.append("compiled quantized matmuls differ from eager")


def main(seed: int) -> int:
    gen = torch.Generator().manual_seed(seed)
    failures: list[str] = []
    check_dequantize(gen, failures)
    check_paths_and_tuning(gen, failures)
    check_compile(gen, failures)
    return report(failures, "paths-ok")


if __name__ == "__main__":
    raise SystemExit(main(seed_arg()))
