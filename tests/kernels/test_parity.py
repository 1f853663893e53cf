"""One parity test: every registered backend of every op, every dtype, against the torch reference at
the catalogue's tolerances, on fresh random inputs (odd sizes, non-contiguous views).

On CPU, Triton runs under TRITON_INTERPRET=1 in a subprocess (the variable must be set before triton
is imported, and other tests of the suite import it first); `-m gpu` runs the same check at model
sizes on CUDA. Set TESSERA_TEST_SEED to replay a failure's inputs.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest
import torch

from tessera.kernels import parity, registry
from tessera.kernels.samples import dtypes

SEED = int(os.environ.get("TESSERA_TEST_SEED", int.from_bytes(os.urandom(3), "little")))
CASES = [(op, backend, dtype) for op in registry.ops() for backend in registry.backends(op) if backend != "reference"
         for dtype in dtypes(op)]
#: (op, backend) pairs that must pass their backward check, not merely skip it.
BACKWARD = {("attention.prefill", "triton"), ("attention.prefill", "sdpa"), ("rms_norm", "triton"), ("rope", "triton"),
            ("rope_qk_norm", "triton"), ("rms_norm_residual", "triton"), ("silu_mul", "triton")}


#: Backends that cannot run on a CPU at all, and where their CPU-side checks live.
CUDA_ONLY = {"cuda": "the CUDA C++ backend needs a CUDA device (its sources are compile-tested separately)",
             "scaled_mm": "torch._scaled_mm needs an sm_89+ GPU (its CPU refusal is tested in test_quant_paths)"}


@functools.cache
def _interpreted(backend: str) -> dict[str, str]:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "tessera.kernels.parity", "--backend", backend, "--device", "cpu",
                           "--seed", str(SEED)], capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"parity worker for {backend!r} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


@functools.cache
def _in_process(backend: str, op: str, device: str, real: bool, dtype: torch.dtype,
                part: tuple[int, int] = (0, 1)) -> dict[str, str]:
    # One dtype (and part) a call, so `-n` spreads an op's dtypes over workers: at real shapes on a GPU
    # each dtype compiles and tunes its own kernels, minutes for the quantized matmuls.
    return parity.run(backend, device=device, seed=SEED, real=real, ops=[op], only_dtypes=[dtype], part=part)


def _check(results: dict[str, str], op: str, backend: str, dtype: torch.dtype) -> None:
    key = f"{op}|{str(dtype).removeprefix('torch.')}"
    fwd = results.get(key + "|fwd", "missing")
    assert fwd.startswith("ok"), f"seed {SEED}: {key} forward: {fwd}"
    if op in parity.DIFFERENTIABLE:
        bwd = results.get(key + "|bwd", "missing")
        ok = bwd.startswith("ok") or (bwd == "skip: no backward" and (op, backend) not in BACKWARD)
        assert ok, f"seed {SEED}: {key} backward: {bwd}"


def _id(case: tuple) -> str:
    op, backend, dtype = case
    return f"{op}-{backend}-{str(dtype).removeprefix('torch.')}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_parity(case: tuple) -> None:
    op, backend, dtype = case
    if torch.cuda.is_available():
        results = _in_process(backend, op, "cuda", False, dtype)
    elif backend == "triton":
        results = _interpreted(backend)
    elif backend in CUDA_ONLY:
        pytest.skip(CUDA_ONLY[backend])
    else:
        results = _in_process(backend, op, "cpu", False, dtype)
    _check(results, op, backend, dtype)


#: Ops whose real-shape samples are shared among this many tests a dtype (sample i goes to part i mod n).
#: The int4 samples come four group sizes a shape, each compiling and tuning its own kernels, so the
#: parts split them by group size.
REAL_PARTS = {"matmul.int4_awq": 4, "matmul.int4_awq_swiglu": 4}
REAL_CASES = [(*case, (i, REAL_PARTS.get(case[0], 1))) for case in CASES for i in range(REAL_PARTS.get(case[0], 1))]


def _real_id(case: tuple) -> str:
    op, backend, dtype, (i, n) = case
    return _id((op, backend, dtype)) + (f"-part{i}of{n}" if n > 1 else "")


@pytest.mark.gpu
@pytest.mark.parametrize("case", REAL_CASES, ids=_real_id)
def test_parity_real_shapes(case: tuple) -> None:
    op, backend, dtype, part = case
    _check(_in_process(backend, op, "cuda", True, dtype, part), op, backend, dtype)
