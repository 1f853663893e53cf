"""The persistent decode launch on int8 weight-only and int4 models (`tessera.model.persistent`, opt-in)
against the per-op path, under Triton's interpreter: a FlatKVCache step, as bench_quant times, and a
paged one."""

from __future__ import annotations

import pytest


def test_quantized_models_through_the_persistent_launch(run_check) -> None:
    pytest.importorskip("triton")
    run_check("persistent_quant_check.py", "persistent-quant-ok", seeded=False, interpret="always", timeout=900)
