"""What every seeded check script of this folder ends with: its seed from argv and its report."""

from __future__ import annotations

import json
import sys


def seed_arg() -> int:
    """The seed `run_check` passes as the first argument (0 when run by hand without one)."""
    return int(sys.argv[1]) if len(sys.argv) > 1 else 0


def report(failures: list[str], marker: str) -> int:
    """Print the failures as one JSON list, then `marker` if there are none; the exit status."""
    print(json.dumps(failures))
    if not failures:
        print(marker)
    return 1 if failures else 0
