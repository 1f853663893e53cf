"""`benchmarks/probe_launch_floor.py`: its weightless GEMV reads the whole row and writes every element of the
next one (under the interpreter, several grids), and for sm_90 with PDL it waits before it reads anything."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_CHECK = """
import torch
import probe_launch_floor as probe
for width, programs in ((100, 1), (100, 7), (2048, 132), (2048, 1024)):
    block = 1 << (width - 1).bit_length()
    x = torch.randn(width, dtype=torch.bfloat16)
    y = torch.full((width,), float("nan"), dtype=torch.bfloat16)
    probe._row_kernel[(programs,)](x, y, width, READ=True, BLOCK=block, PDL=0)
    want = (x.float().sum() * 1e-6).to(torch.bfloat16)
    assert bool((y == want).all()), (width, programs, y, want)
    untouched = torch.full((width,), 3.0, dtype=torch.bfloat16)
    probe._row_kernel[(programs,)](x, untouched, width, READ=False, BLOCK=block, PDL=0)
    assert bool((untouched == 3.0).all())
print("floor kernels ok")
"""


def test_row_kernel_reads_the_row_and_writes_all_of_the_next() -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", _CHECK], capture_output=True, text=True, env=env, timeout=300,
                          cwd=ROOT / "benchmarks")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "floor kernels ok" in proc.stdout


def test_row_kernel_waits_before_it_reads(compile_sm90) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import probe_launch_floor as probe
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    ptx = compile_sm90(probe._row_kernel, {"X": "bf16", "Y": "bf16"}, {"READ": True, "BLOCK": 2048, "PDL": 1},
                       {"N": 2048}).asm["ptx"]
    wait = ptx.index("griddepcontrol.wait")
    assert wait < ptx.index("ld.global") and wait < ptx.index("st.global")
    assert ptx.index("griddepcontrol.launch_dependents") > wait
