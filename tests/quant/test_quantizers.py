"""Round trips of each weight quantizer against its derived error bound, and the quantized linear
modules against `torch.nn.functional.linear` on the dequantized weight.

Bounds (derived in each module's docstring), with a float32 slack of a few ulps of the quantities
involved:
  int8:  |w - dq| <= scale / 2                       (per row)
  int4:  |w - dq| <= scale / 2                       (per group, both zero-point and symmetric)
  fp8:   |w - dq| <= max(2^-4 |w|, 2^-10 scale)      (half an E4M3 ulp; subnormal step below 2^-6)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.kernels import reference
from tessera.quant.fp8 import FP8_MAX, dequantize_fp8, quantize_fp8
from tessera.quant.int8 import dequantize_int8, quantize_int8
from tessera.quant.linear import FP8Linear, Int4Linear, Int8Linear
from tessera.quant.rtn import fake_quantize_int4, int4_params, quantize_int4

EPS = torch.finfo(torch.float32).eps


def _weights(seed: int, n: int, k: int, outliers: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    if outliers:
        # a few large weights and an all-positive row exercise the range edges
        w[0, : k // 3] = w[0, : k // 3].abs() + 0.1
        w[min(1, n - 1), k // 2] = 3.0
    return w


shapes = st.tuples(st.integers(1, 9), st.sampled_from([32, 64, 96, 128, 256]))


@settings(max_examples=30, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_int8_round_trip_within_half_step(shape: tuple[int, int], seed: int) -> None:
    w = _weights(seed, *shape)
    w_q, scale = quantize_int8(w)
    assert w_q.dtype == torch.int8 and scale.shape == (shape[0],)
    assert int(w_q.abs().max()) <= 127
    err = (w - dequantize_int8(w_q, scale)).abs()
    bound = scale[:, None] / 2 + 4 * EPS * w.abs().amax(dim=1, keepdim=True)
    assert bool((err <= bound).all()), float((err - bound).max())
    # the largest magnitude of each row is represented exactly (no clipping)
    assert bool((w_q.abs().amax(dim=1) == 127).all())


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 9), groups=st.integers(1, 4), seed=st.integers(0, 2**16), group=st.sampled_from([32, 64]),
       zero_point=st.booleans())
def test_int4_round_trip_within_half_step(n: int, groups: int, seed: int, group: int, zero_point: bool) -> None:
    k = groups * group
    w = _weights(seed, n, k)
    qweight, scales, zeros = quantize_int4(w, group, zero_point)
    assert qweight.shape == (n, k // 2) and qweight.dtype == torch.uint8
    assert scales.shape == zeros.shape == (n, k // group)
    assert bool(((zeros >= 0) & (zeros <= 15) & (zeros == zeros.round())).all())
    dq = reference.dequantize_int4(qweight, scales, zeros, group)
    step = scales.repeat_interleave(group, dim=1)
    err = (w - dq).abs()
    bound = step / 2 + 8 * EPS * w.abs().amax()
    assert bool((err <= bound).all()), float((err - bound).max())
    torch.testing.assert_close(fake_quantize_int4(w, group, zero_point), dq, rtol=0, atol=0)


def test_int4_zero_point_is_tighter_on_one_sided_groups() -> None:
    w = torch.rand(4, 64) * 0.1 - 0.01  # mostly positive: an asymmetric grid wastes fewer codes
    s_asym, _ = int4_params(w, 32, zero_point=True)
    s_sym, _ = int4_params(w, 32, zero_point=False)
    assert bool((s_asym < s_sym).all())


def test_int4_rejects_indivisible_in_features() -> None:
    with pytest.raises(ValueError, match="in_features=96 is not divisible by group_size=128"):
        quantize_int4(torch.randn(4, 96), 128)


@settings(max_examples=30, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16), granularity=st.sampled_from(["per_row", "per_tensor"]))
def test_fp8_round_trip_within_half_ulp(shape: tuple[int, int], seed: int, granularity: str) -> None:
    w = _weights(seed, *shape)
    w[-1, -1] = 1e-6  # lands in the subnormal range of the scaled grid
    w_q, scale = quantize_fp8(w, granularity)  # type: ignore[arg-type]
    assert w_q.dtype == torch.float8_e4m3fn
    assert scale.shape == ((shape[0],) if granularity == "per_row" else (1,))
    s = scale[:, None] if granularity == "per_row" else scale
    err = (w - dequantize_fp8(w_q, scale)).abs()
    bound = torch.maximum(w.abs() * 2.0**-4, s * 2.0**-10) * (1 + 4 * EPS)
    assert bool((err <= bound).all()), float((err - bound).max())
    assert float(w_q.float().abs().max()) == FP8_MAX


def _linear(k: int, n: int, bias: bool, dtype: torch.dtype = torch.float32) -> torch.nn.Linear:
    torch.manual_seed(k + n)
    lin = torch.nn.Linear(k, n, bias=bias)
    return lin.to(dtype)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kind", ["int8", "int4", "fp8_row", "fp8_tensor"])
def test_quant_linear_matches_linear_on_dequantized_weight(kind: str, bias: bool) -> None:
    lin = _linear(128, 48, bias)
    mod = {
        "int8": lambda: Int8Linear.from_linear(lin),
        "int4": lambda: Int4Linear.from_linear(lin, group_size=64),
        "fp8_row": lambda: FP8Linear.from_linear(lin, "per_row"),
        "fp8_tensor": lambda: FP8Linear.from_linear(lin, "per_tensor"),
    }[kind]()
    x = torch.randn(2, 5, 128)
    w = mod.dequantized_weight()
    if kind.startswith("fp8"):
        # activations are quantized per row at run time: reproduce that with torch's own fp8 cast
        amax = x.abs().amax(-1, keepdim=True)
        x = (x / (amax / FP8_MAX)).to(torch.float8_e4m3fn).float() * (amax / FP8_MAX)
    expected = F.linear(x, w, lin.bias)
    torch.testing.assert_close(mod(x), expected, rtol=1e-5, atol=1e-5)
    assert mod(x).shape == (2, 5, 48)
    names = {n for n, _ in mod.named_parameters()} | {n for n, _ in mod.named_buffers()}
    assert ("bias" in names) == bias


@pytest.mark.parametrize("kind", ["int8", "int4", "fp8_row"])
def test_quant_linear_close_to_float_linear(kind: str) -> None:
    """Output error relative to the float layer stays within what each format's step implies."""
    lin = _linear(256, 64, True)
    mod = {"int8": lambda: Int8Linear.from_linear(lin), "int4": lambda: Int4Linear.from_linear(lin, 128),
           "fp8_row": lambda: FP8Linear.from_linear(lin)}[kind]()
    x = torch.randn(16, 256)
    with torch.no_grad():
        ref = lin(x)
    rel = float((mod(x) - ref).norm() / ref.norm())
    assert rel < {"int8": 0.01, "int4": 0.15, "fp8_row": 0.06}[kind]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quant_linear_keeps_half_dtype(dtype: torch.dtype) -> None:
    lin = _linear(64, 32, True, dtype)
    for mod in (Int8Linear.from_linear(lin), Int4Linear.from_linear(lin, 32), FP8Linear.from_linear(lin)):
        y = mod(torch.randn(3, 64, dtype=dtype))
        assert y.dtype == dtype and y.shape == (3, 32)
        assert mod.bias is not None and mod.bias.dtype == dtype
