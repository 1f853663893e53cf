"""`kv_cache.write` in Triton: scatter each new token's K and V rows into its cache slot, in place.

One program per token copies its [Hkv, D] rows for both caches; a negative slot (a padding lane)
writes nothing. No host sync, so it sits inside captured decode graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tessera.kernels.support import FLOATS, dtype_reasons, no_grad_reasons, triton_device_reasons
from tessera.kernels.triton import pdl
from tessera.specs import KernelRegistry


@triton.jit
def _write_kernel(K, V, KC, VC, SLOTS, stride_kn, stride_kh, stride_vn, stride_vh, stride_kc, stride_vc, H, D,
                  BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr = 0):
    pdl.enter(PDL)  # before the early return: a PDL kernel always waits
    n = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < H) & (offs_d[None, :] < D)
    # The slot and both rows are loaded together, before any store: a load after a store (which may alias
    # it as far as the compiler knows) or after the slot's test would wait for it, one more memory round
    # trip at decode. A padding lane's rows are read and dropped.
    slot = tl.load(SLOTS + n)
    k = tl.load(K + n * stride_kn + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(V + n * stride_vn + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    if slot < 0:
        return
    dst = offs_h[:, None] * D + offs_d[None, :]
    tl.store(KC + slot * stride_kc + dst, k.to(KC.dtype.element_ty), mask=mask)
    tl.store(VC + slot * stride_vc + dst, v.to(VC.dtype.element_ty), mask=mask)


@torch.library.custom_op("tessera::kv_cache_write", mutates_args=("k_cache", "v_cache"))
def _write_op(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              slot_mapping: torch.Tensor) -> None:
    n, h, d = k.shape
    if n == 0:
        return
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    _write_kernel[(n,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                        k_cache.stride(1), v_cache.stride(1), h, d, BLOCK_H=triton.next_power_of_2(h),
                        BLOCK_D=triton.next_power_of_2(d), num_warps=4, **pdl.launch_options(k.device))


def kv_cache_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Same contract as `reference.kv_cache_write`: in place, slot < 0 skipped."""
    _write_op(k, v, k_cache, v_cache, slot_mapping)


def supports(k: torch.Tensor | None = None, v: torch.Tensor | None = None, k_cache: torch.Tensor | None = None,
             v_cache: torch.Tensor | None = None, slot_mapping: torch.Tensor | None = None) -> list[str]:
    if k is None or v is None or k_cache is None or v_cache is None or slot_mapping is None:
        return triton_device_reasons()
    reasons = triton_device_reasons(k, v, k_cache, v_cache, slot_mapping)
    reasons += dtype_reasons("k", k, FLOATS) + dtype_reasons("k_cache", k_cache, FLOATS)
    if k.shape != v.shape or k.dim() != 3 or k_cache.dim() != 4 or k_cache.shape[2:] != k.shape[1:]:
        reasons.append(f"shapes k={tuple(k.shape)} v={tuple(v.shape)} k_cache={tuple(k_cache.shape)} disagree")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not c.is_contiguous():
            reasons.append(f"{name} is not contiguous")
    if slot_mapping.dtype != torch.int64:
        reasons.append(f"slot_mapping.dtype={slot_mapping.dtype} is not int64")
    return reasons + no_grad_reasons(k, v)


def register(reg: KernelRegistry) -> None:
    reg.register("kv_cache.write", "triton", kv_cache_write, supports=supports, priority=20)
