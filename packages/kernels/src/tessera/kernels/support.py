"""Building blocks of `supports(...)` checks: each returns the reasons a backend cannot run (empty = it can).

Checks never read tensor values (no host sync), so dispatch stays cheap and CUDA-graph capturable.
Also the backend-free launch settings the Triton kernels read: `triton_interpreting` and the
`static_weights` declaration (which must import without Triton, since the serving engine makes it).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

HALF = (torch.bfloat16, torch.float16)
FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def bucket(n: int) -> int:
    """The power of two >= n (>= 1): the tuning key for a length."""
    return 1 << max(0, int(n) - 1).bit_length()


@functools.cache
def triton_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 when the backends were
    imported: `triton.jit` reads it once, at decoration, so later changes are ignored here too)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_static = threading.local()


@contextmanager
def static_weights() -> Iterator[None]:
    """Declare, for kernel launches from this thread inside the block, that no decode GEMV's weight
    operand is written by the kernel launched just before it: true of a model's parameters and
    quantized buffers, which is all a forward pass multiplies by. Under programmatic dependent launch
    mode 3 (`tessera.kernels.triton.pdl`, the default) the GEMVs then load their first weight tile
    before waiting for that kernel; outside the block they wait first. Nests; CUDA graphs keep what
    was captured."""
    depth = getattr(_static, "depth", 0)
    _static.depth = depth + 1
    try:
        yield
    finally:
        _static.depth = depth


def weights_static() -> bool:
    """Whether this thread is inside `static_weights()`."""
    return getattr(_static, "depth", 0) > 0


def device_reasons(tensors: Iterable[torch.Tensor], *, allow_cpu: bool = False, hint: str = "") -> list[str]:
    """All tensors must sit on one CUDA device (or the CPU when `allow_cpu`); `hint` ends the reason."""
    tensors = list(tensors)
    if not tensors:
        if allow_cpu or torch.cuda.is_available():
            return []
        return ["no CUDA device" + hint]
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        return [f"tensors on several devices: {sorted(str(d) for d in devices)}"]
    device = devices.pop()
    if device.type == "cuda" or (allow_cpu and device.type == "cpu"):
        return []
    return [f"tensors on {device}, needs cuda" + hint]


def triton_device_reasons(*tensors: torch.Tensor) -> list[str]:
    """Triton kernels run on CUDA tensors, or on CPU tensors under the interpreter."""
    return device_reasons(tensors, allow_cpu=triton_interpreting(), hint=" (or TRITON_INTERPRET=1 for CPU)")


def dtype_reasons(name: str, t: torch.Tensor, allowed: Iterable[torch.dtype]) -> list[str]:
    allowed = tuple(allowed)
    if t.dtype in allowed:
        return []
    return [f"{name}.dtype={t.dtype} not in {[str(d).removeprefix('torch.') for d in allowed]}"]


def same_dtype_reasons(**tensors: torch.Tensor) -> list[str]:
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) <= 1:
        return []
    return ["dtypes differ: " + ", ".join(f"{n}={str(d).removeprefix('torch.')}" for n, d in dtypes.items())]


def no_grad_reasons(*tensors: torch.Tensor) -> list[str]:
    """For backends without a backward: refuse inputs that need gradients while autograd records."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return ["inputs require grad and this backend has no backward"]
    return []


def tensors_in(args: Iterable[object]) -> list[torch.Tensor]:
    return [a for a in args if isinstance(a, torch.Tensor)]


def norm_reasons(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> list[str]:
    """What a normalised matmul cannot take in its x, residual and norm weight (beyond the plain op's x)."""
    reasons = dtype_reasons("weight", weight, FLOATS)
    if residual.shape != x.shape or residual.dtype != x.dtype:
        reasons.append(f"residual {tuple(residual.shape)}/{residual.dtype} differs from x {tuple(x.shape)}/{x.dtype}")
    if weight.shape != x.shape[-1:]:
        reasons.append(f"weight.shape={tuple(weight.shape)} does not match x's last dim {x.shape[-1]}")
    return reasons


def qkv_rope_epilogue_reasons(x: torch.Tensor, rows: int, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                              v_cache: torch.Tensor, slots: torch.Tensor, n_q_heads: int,
                              n_kv_heads: int) -> list[str]:
    """Why a decode GEMV of x [M, K] with a fused q/k/v weight of `rows` rows cannot rotate q and k and write k and
    v to the caches in its epilogue (the CUDA and Triton q/k/v rope GEMVs; empty when it can): the rows must be
    (n_q_heads + 2 n_kv_heads) heads of a head_dim that is a multiple of 16; cos and sin [M, head_dim] with unit
    column stride and one row stride; the caches contiguous [..., n_kv_heads, head_dim] of one shape, all in x's
    dtype; slots a contiguous int64 [M]. Devices are the caller's to check."""
    m, heads = x.shape[0], n_q_heads + 2 * n_kv_heads
    if n_q_heads < 0 or n_kv_heads < 1 or rows % heads:
        return [f"the weight's {rows} rows are not (n_q_heads + 2 n_kv_heads) * head_dim for n_q_heads={n_q_heads}, "
                f"n_kv_heads={n_kv_heads}"]
    d = rows // heads
    reasons = [] if d % 16 == 0 else [f"head_dim={d} is not a multiple of 16"]
    for name, t in (("cos", cos), ("sin", sin)):
        if (t.dtype != x.dtype or t.dim() != 2 or tuple(t.shape) != (m, d) or t.stride(-1) != 1
                or t.stride(0) != cos.stride(0)):
            reasons.append(f"{name} {tuple(t.shape)}/{t.dtype} is not [M={m}, head_dim={d}] in x's dtype {x.dtype} "
                           "with contiguous rows (and cos's row stride)")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if (t.dtype != x.dtype or not t.is_contiguous() or t.dim() < 3 or tuple(t.shape[-2:]) != (n_kv_heads, d)
                or t.shape != k_cache.shape):
            reasons.append(f"{name} {tuple(t.shape)}/{t.dtype} is not a contiguous [..., n_kv_heads={n_kv_heads}, "
                           f"head_dim={d}] in x's dtype {x.dtype}, shaped as k_cache")
    if slots.dtype != torch.int64 or slots.dim() != 1 or slots.shape[0] != m or slots.stride(0) != 1:
        reasons.append(f"slots {tuple(slots.shape)}/{slots.dtype} is not a contiguous int64 [M={m}]")
    return reasons
