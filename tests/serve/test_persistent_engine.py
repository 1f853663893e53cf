"""The serving engine with the persistent decode launch on (`TESSERA_PERSISTENT_DECODE=1`) generates what it
generates with it off: greedy, one sequence at a time, under Triton's interpreter."""

from __future__ import annotations

import pytest


def test_engine_greedy_is_unchanged_by_the_persistent_launch(run_check) -> None:
    pytest.importorskip("triton")
    run_check("persistent_engine_check.py", "persistent-engine-ok", seeded=False, interpret="always")
