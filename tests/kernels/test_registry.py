"""The registry's contract: best backend, forcing, pins, errors that name what is wrong."""

from __future__ import annotations

import pytest
import torch

from tessera.kernels import registry
from tessera.specs import CATALOGUE, KernelRegistry, KernelUnavailableError, UnknownOpError


def test_rms_norm_reference_on_cpu() -> None:
    impl = registry.get("rms_norm")
    assert impl.backend == "reference"
    x, w = torch.randn(4, 33, dtype=torch.float64), torch.randn(33, dtype=torch.float64)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(impl(x.float(), w.float(), 1e-6), expected.float(), atol=1e-5, rtol=1e-5)


def test_unknown_op_and_backend_are_named() -> None:
    with pytest.raises(UnknownOpError, match="'no_such_op'"):
        registry.get("no_such_op")
    with pytest.raises(KernelUnavailableError, match="'no_such_backend'"):
        registry.get("rms_norm", backend="no_such_backend")


def test_every_catalogued_op_has_a_reference() -> None:
    for spec in CATALOGUE:
        assert "reference" in registry.backends(spec.name), spec.name
        assert {"float32", "bfloat16"} <= set(spec.tolerances), spec.name


def _toy() -> KernelRegistry:
    reg = KernelRegistry(catalogue={s.name: s for s in CATALOGUE})
    reg.register("rms_norm", "reference", lambda x, w, eps=1e-6: "ref")
    reg.register("rms_norm", "fast", lambda x, w, eps=1e-6: "fast", priority=10,
                 supports=lambda *a, **k: [] if a and a[0] == "ok" else ["needs 'ok' input"])
    return reg


def test_best_supported_backend_wins_and_falls_back() -> None:
    reg = _toy()
    assert reg.get("rms_norm", "ok", None).backend == "fast"
    assert reg.get("rms_norm", "bad", None).backend == "reference"
    assert reg("rms_norm", "ok", None) == "fast"


def test_forced_backend_lists_reasons() -> None:
    reg = _toy()
    with pytest.raises(KernelUnavailableError, match="needs 'ok' input"):
        reg.get("rms_norm", "bad", None, backend="fast")


def test_pins_from_env_and_api(monkeypatch: pytest.MonkeyPatch) -> None:
    reg = _toy()
    monkeypatch.setenv("TESSERA_KERNELS", "rms_norm=reference")
    assert reg.get("rms_norm", "ok", None).backend == "reference"
    reg.pin("rms_norm", "fast")
    assert reg.get("rms_norm", "ok", None).backend == "fast"
    monkeypatch.setenv("TESSERA_KERNELS", "rms_norm")
    with pytest.raises(ValueError, match="op=backend"):
        reg.pins()


def test_no_backend_error_lists_every_reason() -> None:
    reg = KernelRegistry(catalogue={s.name: s for s in CATALOGUE})
    reg.register("swiglu", "a", lambda: None, supports=lambda *a: ["reason A"], priority=2)
    reg.register("swiglu", "b", lambda: None, supports=lambda *a: ["reason B"], priority=1)
    with pytest.raises(KernelUnavailableError, match="a: reason A; b: reason B"):
        reg.get("swiglu")


def test_table_has_every_op() -> None:
    rows = registry.table()
    assert {r["op"] for r in rows} == {s.name for s in CATALOGUE}
    assert all(r["reference"] == "yes" for r in rows)


def test_info_command(capsys: pytest.CaptureFixture[str]) -> None:
    from tessera.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "student-6m" in out and "rms_norm" in out


def test_unknown_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    from tessera.cli import main

    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
