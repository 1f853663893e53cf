"""The multi-rank launcher's verdict on a rank: a rank killed by a signal after it printed `DONE` (its work done,
its group destroyed) died in interpreter teardown and passes; any other non-zero exit fails."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _launch import DONE, _failed


def test_a_rank_fails_unless_it_exits_cleanly_or_dies_after_reporting_done() -> None:
    assert not _failed(0, "")
    assert not _failed(-6, f"losses...\n{DONE}\nterminate called without an active exception\n")
    assert _failed(-6, "terminate called without an active exception\n")  # died before finishing
    assert _failed(-9, "")
    assert _failed(1, f"{DONE}\n")  # a Python error after the marker is still an error
