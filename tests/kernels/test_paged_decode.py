"""Paged decode's split merge: in the same launch (the last split to arrive merges) and by the second
kernel, equal to the reference, with the arrival counters left at zero."""

from __future__ import annotations


def test_split_merge_in_launch_and_by_second_kernel(run_check) -> None:
    run_check("paged_decode_check.py", "paged-decode-ok")
