"""The persistent decode launch on int8 weight-only and int4 models (`tessera.model.persistent`, opt-in)
against the per-op path, under Triton's interpreter: a FlatKVCache step, as bench_quant times, and a
paged one."""

from __future__ import annotations

import pytest


def test_quantized_models_through_the_persistent_launch(run_check) -> None:
    pytest.importorskip("triton")
    run_check("persistent_quant_check.py", "persistent-quant-ok", seeded=False, interpret="always", timeout=900)


def test_quantized_rows_the_word_reads_cannot_take_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel reads int8 rows as int32 words of four weights: a d_ff that is no multiple of 4 is named, and
    the step takes the per-op path."""
    import torch

    from tessera.attn import FlatKVCache
    from tessera.model import Transformer, fuse_projections, persistent
    from tessera.quant import quantize
    from tessera.specs import ModelConfig, QuantConfig

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # past the device check; nothing is launched
    for d_ff, refused in ((96, False), (102, True)):
        cfg = ModelConfig(vocab_size=61, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=d_ff,
                          max_seq_len=64)
        model = quantize(Transformer(cfg).eval(), QuantConfig(method="int8"), progress=False)
        fuse_projections(model)
        with torch.inference_mode():
            found = persistent.reasons(model, torch.tensor([[3]]), FlatKVCache(cfg, 1, 8))
        want = [f"d_ff={d_ff} is not a multiple of 4: int8 rows are read as int32 words of 4 weights"]
        assert found == (want if refused else []), found
