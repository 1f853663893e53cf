"""Completeness: every catalogued op has a reference, sample inputs the reference accepts, and a
tolerance for every dtype it is sampled in; every backend module's ops are catalogued."""

from __future__ import annotations

import pytest
import torch

from tessera.kernels import reference, registry
from tessera.kernels.samples import SAMPLERS, dtypes, samples
from tessera.specs import CATALOGUE


@pytest.mark.parametrize("op", [spec.name for spec in CATALOGUE])
def test_op_is_complete(op: str) -> None:
    assert op in reference.REFERENCES, f"{op} has no reference"
    assert op in SAMPLERS, f"{op} has no samples"
    spec = registry.catalogue[op]
    for dtype in dtypes(op):
        spec.tolerance(str(dtype).removeprefix("torch."))
        cases = samples(op, dtype, seed=1)
        assert cases, f"{op} has no samples in {dtype}"
        for sample in cases:
            out = reference.REFERENCES[op](*sample.args, **sample.kwargs)
            outs = [sample.args[i] for i in sample.inplace] if sample.inplace else (
                list(out) if isinstance(out, tuple) else [out])
            assert all(torch.isfinite(o.float()).all() for o in outs), f"{op}[{sample.name}] is not finite"


def test_samples_cover_odd_and_non_contiguous_inputs() -> None:
    for op in SAMPLERS:
        cases = samples(op, torch.float32, seed=2)
        tensors = [a for s in cases for a in s.args if isinstance(a, torch.Tensor) and a.is_floating_point()]
        assert any(not t.is_contiguous() for t in tensors), f"{op}: every sample is contiguous"


def test_samples_are_fresh_per_seed() -> None:
    a = samples("rms_norm", torch.float32, seed=3)[0].args[0]
    b = samples("rms_norm", torch.float32, seed=4)[0].args[0]
    assert not torch.equal(a, b)


def test_unknown_op_has_no_samples() -> None:
    with pytest.raises(KeyError, match="'nope'"):
        samples("nope", torch.float32)
