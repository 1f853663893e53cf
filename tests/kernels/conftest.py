"""`run_check`: run a check script of this folder in a fresh interpreter and assert it printed its
success marker.

Triton reads TRITON_INTERPRET once, when the kernels are decorated, so a check that needs the CPU
interpreter (or must not have it) runs in its own process. Seeded checks take a random seed unless
TESSERA_TEST_SEED fixes one; a failure names it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def _run_check(script: str, marker: str, *, seeded: bool = True, interpret: str = "without-cuda",
               timeout: int = 600) -> None:
    """`interpret`: "always" (the interpreter even on a GPU machine) or "without-cuda"."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if interpret == "always" or not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    seed = os.environ.get("TESSERA_TEST_SEED", str(int.from_bytes(os.urandom(3), "little"))) if seeded else None
    cmd = [sys.executable, str(HERE / script)] + ([seed] if seeded else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0 and marker in proc.stdout, \
        f"{script} (seed {seed}): {proc.stdout[-3000:]}{proc.stderr[-3000:]}"


@pytest.fixture
def run_check():
    return _run_check
