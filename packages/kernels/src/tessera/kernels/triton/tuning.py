"""Autotuning that never stalls serving: keys are bucketed and results cached on disk.

Kernels key their tuning on `*_BUCKET` arguments (powers of two) rather than raw lengths, so a new
sequence length reuses the bucket's winner instead of benchmarking every config again; with
`cache_results` Triton also keeps winners across processes. Under the interpreter only a small
config runs: timing means nothing there.
"""

from __future__ import annotations

from collections.abc import Sequence

import triton

from tessera.kernels.support import triton_interpreting


def bucket(n: int) -> int:
    """The power of two >= n (>= 1): the tuning key for a length."""
    return 1 << max(0, int(n) - 1).bit_length()


def autotune(configs: Sequence[triton.Config], key: list[str], interpret: triton.Config,
             **kwargs: object):
    """`triton.autotune` with on-disk caching; under the interpreter only the `interpret` config."""
    configs = [interpret] if triton_interpreting() else list(configs)
    return triton.autotune(configs=configs, key=key, cache_results=True, **kwargs)


def dot_precision(dtype: object) -> str:
    """float32 operands get exact IEEE products (the spec's float32 tolerance is tighter than tf32's)."""
    import torch

    return "ieee" if dtype == torch.float32 else "tf32"
