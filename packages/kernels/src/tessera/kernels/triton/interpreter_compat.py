"""Fixes to Triton 3.6's CPU interpreter, installed only under TRITON_INTERPRET=1 (CPU tests).

The interpreter stores bfloat16 as raw uint16 words and, in three places, treats those words as
numbers; the compiled GPU path is unaffected. Patched here so the CPU parity tests exercise the
same kernels in bfloat16 too:
- `tl.dot` on bfloat16 operands multiplied the raw words: operands are widened to float32 first
  (exact, and what the tensor cores' float32 accumulation computes).
- integer <-> bfloat16 casts reinterpreted values with `astype(uint16)`: they go through float32.
- float32 -> float8_e4m3 conversion rounded some values a binade low (124.3 became 64): conversions
  to and from E4M3 go through torch's, which rounds to nearest even like the GPU's `cvt`.
- float32 -> bfloat16 conversion truncated, even where round-to-nearest-even was asked for; the GPU's
  `cvt.rn.bf16.f32` rounds to nearest even. A single output is one ulp off either way, but a truncated
  value that feeds a reduction (the gated GEMVs' silu_mul over K) is biased toward zero, which made the
  CPU results drift from the GPU's past the parity tolerances. These conversions go through torch's,
  unless round-toward-zero is asked for explicitly.
- NumPy >= 2.4 refuses `int(one-element 1-d array)`, which the interpreter uses for runtime loop
  bounds (`range(0, K, BLOCK)`): the single element is read explicitly.
"""

from __future__ import annotations

from typing import Any


def install() -> None:
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_tessera_compat", False):
        return
    original_patch = interpreter._patch_lang_tensor
    original_dot = builder.create_dot
    original_cast = builder.cast_impl
    original_fp_to_fp = builder.create_fp_to_fp

    def patch_lang_tensor(tensor: type, scope: Any) -> None:
        original_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    def create_dot(self: Any, a: Any, b: Any, d: Any, input_precision: Any, max_num_imprecise_acc: Any) -> Any:
        if a.dtype.scalar == tl.bfloat16:
            a = original_cast(self, a, tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = original_cast(self, b, tl.float32)
        return original_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def to_bf16(src: Any) -> Any:
        import numpy as np
        import torch

        data = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
        return interpreter.TensorHandle(data.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)

    def cast_impl(self: Any, src: Any, dst_type: Any) -> Any:
        src_ty, dst_ty = src.dtype.scalar, dst_type.scalar
        if src_ty == tl.float32 and dst_ty == tl.bfloat16:
            return to_bf16(src)
        if src_ty == tl.bfloat16 and dst_ty not in (tl.float32, tl.bfloat16):
            return original_cast(self, original_cast(self, src, tl.float32), dst_type)
        if dst_ty == tl.bfloat16 and src_ty not in (tl.float32, tl.bfloat16):
            return original_cast(self, original_cast(self, src, tl.float32), dst_type)
        return original_cast(self, src, dst_type)

    def create_fp_to_fp(self: Any, src: Any, dst_type: Any, rounding_mode: Any) -> Any:
        import numpy as np
        import torch

        src_ty, dst_ty = src.dtype.scalar, dst_type.scalar
        if dst_ty == tl.float8e4nv and src_ty == tl.float32:
            data = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.float8_e4m3fn)
            return interpreter.TensorHandle(data.view(torch.uint8).numpy(), dst_ty)
        if src_ty == tl.float8e4nv and dst_ty == tl.float32:
            data = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.uint8)).view(torch.float8_e4m3fn)
            return interpreter.TensorHandle(data.float().numpy(), dst_ty)
        if dst_ty == tl.bfloat16 and src_ty == tl.float32 and rounding_mode != interpreter._ir.ROUNDING_MODE.RTZ:
            return to_bf16(src)
        return original_fp_to_fp(self, src, dst_type, rounding_mode)

    interpreter._patch_lang_tensor = patch_lang_tensor
    builder.create_fp_to_fp = create_fp_to_fp
    builder.create_dot = create_dot
    builder.cast_impl = cast_impl
    for name in ("create_si_to_fp", "create_ui_to_fp", "create_fp_to_si", "create_fp_to_ui", "create_fp_ext",
                 "create_fp_trunc"):
        setattr(builder, name, lambda self, src, dst_type: self.cast_impl(src, dst_type))
    builder.create_int_cast = lambda self, src, dst_type, is_signed: self.cast_impl(src, dst_type)
    builder._tessera_compat = True
