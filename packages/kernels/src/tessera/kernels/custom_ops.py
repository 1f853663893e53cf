"""Triton and cuBLASLt backends as `torch.library` custom ops that eager calls bypass.

`torch.compile` must see such a kernel as one opaque node with a known output shape, which is what a
custom op with a fake implementation gives it; an op with a backward also needs the dispatcher so that
autograd records it. Otherwise going through the op's dispatcher only costs host time, which dominates
a decode-shape call, so eager calls run the implementation directly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def eager_bypass(op: Callable[..., Any], fn: Callable[..., Any], autograd: bool = True) -> Callable[..., Any]:
    """A callable that runs custom op `op` (registered over `fn`) while torch.compile traces, or while
    autograd must record it (`autograd`: the op has a backward and a tensor argument requires grad),
    and `fn` itself otherwise."""

    def call(*args: object) -> Any:
        if torch.compiler.is_compiling() or (autograd and torch.is_grad_enabled() and any(
                isinstance(a, torch.Tensor) and a.requires_grad for a in args)):
            return op(*args)
        return fn(*args)

    return call


def matmul_custom_op(name: str, fn: Callable[..., torch.Tensor],
                     rows_per_output: int = 1) -> Callable[..., torch.Tensor]:
    """Register `fn(x [M, K], w [N, ...], *rest) -> [M, N / rows_per_output]` (2: silu_mul of the product's halves)
    as custom op `tessera::<name>` and return a callable that traces through the op under `torch.compile` and
    calls `fn` itself otherwise. `fn` needs full type annotations (they define the op's schema)."""
    op = torch.library.custom_op(f"tessera::{name}", fn, mutates_args=())

    @op.register_fake
    def _(x: torch.Tensor, w: torch.Tensor, *rest: object) -> torch.Tensor:
        return x.new_empty((x.shape[0], w.shape[0] // rows_per_output))

    return eager_bypass(op, fn, autograd=False)


def normed_custom_op(name: str, fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]
                     ) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """Register `fn(x [M, K], residual [M, K], weight [K], w [N, ...], *rest) -> (y [M, N], h [M, K])` (a
    matmul of rms_norm_residual's output, and h = x + residual) as custom op `tessera::<name>`, as
    `matmul_custom_op` does."""
    op = torch.library.custom_op(f"tessera::{name}", fn, mutates_args=())

    @op.register_fake
    def _(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, w: torch.Tensor,
          *rest: object) -> tuple[torch.Tensor, torch.Tensor]:
        return x.new_empty((x.shape[0], w.shape[0])), x.new_empty(x.shape)

    return eager_bypass(op, fn, autograd=False)
