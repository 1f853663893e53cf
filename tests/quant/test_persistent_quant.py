"""The persistent decode launch on int8 weight-only and int4 models (`tessera.model.persistent`, opt-in)
against the per-op path, under Triton's interpreter (one program): a FlatKVCache step, as bench_quant
times, and a paged one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_quantized_models_through_the_persistent_launch() -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "persistent_quant_check.py")],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0 and "persistent-quant-ok" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
