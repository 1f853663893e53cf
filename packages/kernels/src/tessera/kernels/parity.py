"""Parity of a backend against the reference, at the catalogue's tolerances, on `samples` inputs.

    python -m tessera.kernels.parity --backend triton [--real] [--seed N]

prints one JSON object: "op|dtype|fwd" (and "op|dtype|bwd" for differentiable backends) ->
"ok (n/m samples)", "skip: <reasons>" or "FAIL <what>". Under TRITON_INTERPRET=1 (set in the environment before the
process starts) Triton runs on CPU; the CPU test suite runs this in a subprocess for that reason.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from typing import Any

import torch

from tessera.kernels import registry
from tessera.kernels.samples import Sample, dtypes, samples

#: Ops whose backends may offer a backward; parity covers their input gradients too.
DIFFERENTIABLE = ("rms_norm", "rms_norm_residual", "attention.prefill", "rope", "rope_qk_norm")


def _clone(args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def _outputs(result: Any, args: tuple[Any, ...], sample: Sample) -> tuple[torch.Tensor, ...]:
    """The op's results (none for an op that returns None), then the arguments it writes in place."""
    results = () if result is None else tuple(result) if isinstance(result, tuple) else (result,)
    return results + tuple(args[i] for i in sample.inplace)


def _assert_close(op: str, what: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    tol = registry.catalogue[op].tolerance(str(dtype).removeprefix("torch."))
    if got.shape != want.shape or got.dtype != want.dtype:
        raise AssertionError(f"{what}: got {tuple(got.shape)}/{got.dtype}, want {tuple(want.shape)}/{want.dtype}")
    torch.testing.assert_close(got, want, atol=tol.atol, rtol=tol.rtol, msg=lambda m: f"{what}: {m}")


def check_forward(op: str, backend: str, sample: Sample, dtype: torch.dtype) -> bool:
    """Run `backend` and the reference on copies of the sample; raise AssertionError on any mismatch.
    Returns False (nothing run) when the backend does not support this sample."""
    impl = registry.get(op, backend=backend)
    if impl.supports(*sample.args, **sample.kwargs):
        return False
    ref = registry.get(op, backend="reference")
    args, ref_args = _clone(sample.args), _clone(sample.args)
    with torch.no_grad():
        got = _outputs(impl(*args, **sample.kwargs), args, sample)
        want = _outputs(ref(*ref_args, **sample.kwargs), ref_args, sample)
    if len(got) != len(want):
        raise AssertionError(f"{op}[{sample.name}]: {len(got)} outputs, reference has {len(want)}")
    for i, (g, w) in enumerate(zip(got, want)):
        _assert_close(op, f"{op}/{backend}[{sample.name}] output {i}", g, w, dtype)
    return True


def _assert_grad_close(op: str, what: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """Gradients have no catalogued tolerance. They are held to the dtype's rtol in relative Frobenius
    norm, ||got - want|| / ||want||: the fused backward rounds P and dS to the input dtype before its
    matmuls (as FlashAttention does), so single elements that nearly cancel can drift further than the
    elementwise output tolerance while the gradient as a whole stays that close."""
    rtol = registry.catalogue[op].tolerance(str(dtype).removeprefix("torch.")).rtol
    if got.shape != want.shape or got.dtype != want.dtype:
        raise AssertionError(f"{what}: got {tuple(got.shape)}/{got.dtype}, want {tuple(want.shape)}/{want.dtype}")
    if not torch.isfinite(got).all():
        raise AssertionError(f"{what}: non-finite values")
    err = float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))
    if err > rtol:
        raise AssertionError(f"{what}: relative norm error {err:.3g} > {rtol}")


def check_backward(op: str, backend: str, sample: Sample, dtype: torch.dtype, seed: int) -> bool:
    """Input gradients of `backend` against the reference's; False when the backend has no backward."""

    def leaves() -> tuple[Any, ...]:
        return tuple(a.detach().clone().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point()
                     else a for a in sample.args)

    args, ref_args = leaves(), leaves()
    impl = registry.get(op, backend=backend)
    if impl.supports(*args, **sample.kwargs):
        return False
    ref = registry.get(op, backend="reference")
    outs, ref_outs = impl(*args, **sample.kwargs), ref(*ref_args, **sample.kwargs)
    outs, ref_outs = (outs, ref_outs) if isinstance(outs, tuple) else ((outs,), (ref_outs,))
    gen = torch.Generator().manual_seed(seed)
    dys = [torch.randn(o.shape, generator=gen).to(dtype=o.dtype, device=o.device) for o in outs]
    torch.autograd.backward(outs, dys)
    torch.autograd.backward(ref_outs, dys)
    for i, (a, r) in enumerate(zip(args, ref_args)):
        if isinstance(a, torch.Tensor) and a.requires_grad:
            _assert_grad_close(op, f"{op}/{backend}[{sample.name}] grad of arg {i}", a.grad, r.grad, dtype)
    return True


def run(backend: str, *, device: str, seed: int, real: bool, ops: list[str] | None = None,
        only_dtypes: list[torch.dtype] | None = None, part: tuple[int, int] = (0, 1)) -> dict[str, str]:
    """Every op the backend registers x dtype (those of `only_dtypes` the op takes, if given): 'ok (n/m
    samples)', 'skip: reasons' or the failure text. `part` (i, n) keeps the samples whose index is i
    modulo n, so n workers can share an op's samples."""
    index, parts = part
    if not 0 <= index < parts:
        raise ValueError(f"part {part}: want (i, n) with 0 <= i < n")
    results: dict[str, str] = {}
    for op in ops or registry.ops():
        if backend not in registry.backends(op):
            continue
        impl = registry.get(op, backend=backend)
        for dtype in dtypes(op):
            if only_dtypes is not None and dtype not in only_dtypes:
                continue
            key = f"{op}|{str(dtype).removeprefix('torch.')}"
            stage = "fwd"
            try:
                cases = samples(op, dtype, device, seed, real=real)[index::parts]
                ran = [s for s in cases if check_forward(op, backend, s, dtype)]
                if not ran:
                    results[key + "|fwd"] = "skip: " + "; ".join(impl.supports(*cases[0].args, **cases[0].kwargs))
                    continue
                results[key + "|fwd"] = f"ok ({len(ran)}/{len(cases)} samples)"
                if op in DIFFERENTIABLE:
                    stage = "bwd"
                    ran = [s for s in ran if check_backward(op, backend, s, dtype, seed)]
                    results[key + "|bwd"] = f"ok ({len(ran)} samples)" if ran else "skip: no backward"
            except Exception as e:
                results[f"{key}|{stage}"] = f"FAIL {type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}"
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tessera.kernels.parity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", required=True, help="backend to check, e.g. triton, sdpa, cuda")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--real", action="store_true", help="model-sized shapes (GPU) instead of tiny ones")
    parser.add_argument("--ops", nargs="*", help="only these ops (default: all the backend registers)")
    args = parser.parse_args(argv)
    results = run(args.backend, device=args.device, seed=args.seed, real=args.real, ops=args.ops)
    json.dump(results, sys.stdout, indent=1)
    print()
    return 0 if not any(v.startswith("FAIL") for v in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
