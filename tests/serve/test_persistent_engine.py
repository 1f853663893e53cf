"""The serving engine with the persistent decode launch on (`TESSERA_PERSISTENT_DECODE=1`) generates what it
generates with it off: greedy, one sequence at a time, under Triton's interpreter (one program)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_engine_greedy_is_unchanged_by_the_persistent_launch() -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "persistent_engine_check.py")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and "persistent-engine-ok" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
