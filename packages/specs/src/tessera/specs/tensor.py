"""`TensorSpec`: a named tensor shape with symbolic dimensions, checked at package boundaries."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from tessera.specs.base import Spec

Dim = int | str


class TensorShapeError(ValueError):
    """A tensor does not match its spec; the message names the tensor and the dimension."""


def dtype_name(dtype: Any) -> str:
    """Framework-neutral dtype name: torch.bfloat16 -> 'bfloat16', numpy float32 -> 'float32'."""
    name = getattr(dtype, "name", None)
    return name if isinstance(name, str) else str(dtype).removeprefix("torch.")


class TensorSpec(Spec):
    """A tensor's name, dims (ints, symbols such as "B", or one leading "..."), dtypes and layout.

    `check(x, **bound)` validates anything with `.shape` and `.dtype` and returns the symbol
    bindings, so callers can check several tensors against one another.
    """

    SCHEMA_VERSION: ClassVar[int] = 1
    schema_version: Literal[1] = 1
    name: str
    dims: tuple[Dim, ...]
    dtypes: tuple[str, ...] = Field(default=(), description="allowed dtype names; empty allows any")
    layout: Literal["contiguous", "strided"] = "strided"

    @field_validator("dims")
    @classmethod
    def _one_ellipsis_first(cls, dims: tuple[Dim, ...]) -> tuple[Dim, ...]:
        if "..." in dims[1:]:
            raise ValueError(f"'...' may only lead the dims, got {dims}")
        for d in dims:
            if isinstance(d, int) and d < 0:
                raise ValueError(f"fixed dims must be non-negative, got {d}")
        return dims

    def check(self, x: Any, **bound: int) -> dict[str, int]:
        """Validate `x` and return the bindings of every symbolic dim (merged with `bound`)."""
        shape = tuple(int(s) for s in x.shape)
        dims = self.dims
        if dims and dims[0] == "...":
            dims = dims[1:]
            if len(shape) < len(dims):
                raise TensorShapeError(
                    f"{self.name}: expected at least {len(dims)} dims {self.dims}, got shape {shape}"
                )
            shape = shape[len(shape) - len(dims):]
        elif len(shape) != len(dims):
            raise TensorShapeError(f"{self.name}: expected {len(dims)} dims {self.dims}, got shape {shape}")
        out = dict(bound)
        for i, (dim, size) in enumerate(zip(dims, shape, strict=True)):
            if isinstance(dim, int):
                if size != dim:
                    raise TensorShapeError(f"{self.name}: dim {i} must be {dim}, got {size} (shape {shape})")
            elif dim in out and out[dim] != size:
                raise TensorShapeError(
                    f"{self.name}: dim {i} ({dim!r}) is {size} but {dim!r} is bound to {out[dim]} (shape {shape})"
                )
            else:
                out[dim] = size
        if self.dtypes:
            got = dtype_name(x.dtype)
            if got not in self.dtypes:
                raise TensorShapeError(f"{self.name}: dtype must be one of {list(self.dtypes)}, got {got}")
        if self.layout == "contiguous" and hasattr(x, "is_contiguous") and not x.is_contiguous():
            raise TensorShapeError(f"{self.name}: must be contiguous")
        return out
