"""Shared test setup: GPU tests skip without CUDA; the shared corpora are found beside the repo."""

from __future__ import annotations

import os
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
