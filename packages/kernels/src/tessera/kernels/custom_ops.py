"""Matmul backends as `torch.library` custom ops that eager calls bypass.

`torch.compile` must see a Triton or cuBLASLt matmul as one opaque node with a known output shape,
which is what a custom op with a fake implementation gives it. Going through the op's dispatcher
in eager mode, though, costs host time that dominates a decode-shape call, so eager calls run the
implementation directly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def matmul_custom_op(name: str, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Register `fn(x [M, K], w [N, ...], *rest) -> [M, N]` as custom op `tessera::<name>` and return a
    callable that traces through the op under `torch.compile` and calls `fn` itself otherwise.
    `fn` needs full type annotations (they define the op's schema)."""
    op = torch.library.custom_op(f"tessera::{name}", fn, mutates_args=())

    @op.register_fake
    def _(x: torch.Tensor, w: torch.Tensor, *rest: object) -> torch.Tensor:
        return x.new_empty((x.shape[0], w.shape[0]))

    def call(*args: object) -> torch.Tensor:
        return op(*args) if torch.compiler.is_compiling() else fn(*args)

    return call
