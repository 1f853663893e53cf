from __future__ import annotations

import numpy as np
import pytest

from tessera.specs import TensorShapeError, TensorSpec


def test_binds_symbols_and_checks_consistency() -> None:
    q = TensorSpec(name="q", dims=("B", "T", "H", 8), dtypes=("float32",))
    b = q.check(np.zeros((2, 5, 3, 8), np.float32))
    assert b == {"B": 2, "T": 5, "H": 3}
    k = TensorSpec(name="k", dims=("B", "T", "Hkv", 8))
    with pytest.raises(TensorShapeError, match=r"k: dim 1 \('T'\) is 6"):
        k.check(np.zeros((2, 6, 1, 8)), **b)


def test_fixed_dim_rank_and_dtype_errors_name_the_tensor() -> None:
    s = TensorSpec(name="w", dims=("N", 4), dtypes=("int8",))
    with pytest.raises(TensorShapeError, match="w: dim 1 must be 4"):
        s.check(np.zeros((3, 5), np.int8))
    with pytest.raises(TensorShapeError, match="w: expected 2 dims"):
        s.check(np.zeros((3,), np.int8))
    with pytest.raises(TensorShapeError, match="w: dtype must be one of"):
        s.check(np.zeros((3, 4), np.float32))


def test_leading_ellipsis() -> None:
    s = TensorSpec(name="x", dims=("...", "D"))
    assert s.check(np.zeros((2, 3, 7))) == {"D": 7}
    with pytest.raises(ValueError):
        TensorSpec(name="x", dims=("D", "..."))
