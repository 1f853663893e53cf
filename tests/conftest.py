"""Shared test setup: GPU tests skip without CUDA; the shared corpora are found beside the repo;
`run_check` runs a check script of the test's folder in a fresh interpreter.

Triton reads TRITON_INTERPRET once, when the kernels are decorated, so a check that needs the CPU
interpreter (or must not have it) runs in its own process. Seeded checks take a random seed unless
TESSERA_TEST_SEED fixes one; a failure names it.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TESSERA_SHARED_DATA", ROOT.parent / "shared" / "data"))


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only reference corpora (`../shared/data`); tests using it skip when it is absent."""
    if not (SHARED_DATA / "wikitext-2" / "test.txt").exists():
        pytest.skip(f"shared corpora not found at {SHARED_DATA}")
    return SHARED_DATA


def _run_check(script: str, marker: str, *, folder: Path, seeded: bool = True, interpret: str = "without-cuda",
               timeout: int = 600) -> None:
    """Run `folder / script` and assert it exits 0 having printed `marker`. `interpret`: "always" (the
    interpreter even on a GPU machine) or "without-cuda"."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if interpret == "always" or not _cuda_available():
        env["TRITON_INTERPRET"] = "1"
    seed = os.environ.get("TESSERA_TEST_SEED", str(int.from_bytes(os.urandom(3), "little"))) if seeded else None
    cmd = [sys.executable, str(folder / script)] + ([seed] if seeded else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0 and marker in proc.stdout, \
        f"{script} (seed {seed}): {proc.stdout[-3000:]}{proc.stderr[-3000:]}"


@pytest.fixture
def run_check(request: pytest.FixtureRequest):
    """`_run_check` for scripts in the requesting test's folder."""
    return functools.partial(_run_check, folder=Path(request.node.fspath).parent)
