"""`QuantConfig`: a union discriminated on `method` (int8, int4_rtn, awq, fp8).

`QuantConfig(method="awq", ...)` builds the matching subclass, and `QuantConfig.load(...)`
dispatches the same way, so callers never name the subclasses.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, PositiveInt, TypeAdapter

from tessera.specs.base import Spec

_DEFAULT_SKIP = ("lm_head",)


class QuantConfig(Spec):
    """Base of every method's config. Layers whose qualified name matches `skip` (a suffix match)
    stay in floating point; `skip_unsupported` skips layers the method cannot handle instead of
    raising."""

    SCHEMA_VERSION: ClassVar[int] = 1
    schema_version: Literal[1] = 1
    method: str
    skip: tuple[str, ...] = _DEFAULT_SKIP
    skip_unsupported: bool = False

    def __new__(cls, *args: Any, **data: Any) -> QuantConfig:
        if cls is QuantConfig:
            method = data.get("method")
            sub = _METHODS.get(method)  # type: ignore[arg-type]
            if sub is None:
                raise ValueError(f"QuantConfig.method must be one of {sorted(_METHODS)}, got {method!r}")
            return super().__new__(sub)
        return super().__new__(cls)

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        if cls is QuantConfig and not isinstance(obj, QuantConfig):
            return _ADAPTER.validate_python(obj, **kwargs)
        return super().model_validate(obj, **kwargs)

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        if cls is QuantConfig:
            return _ADAPTER.json_schema(*args, **kwargs)
        return super().model_json_schema(*args, **kwargs)


class Int8Config(QuantConfig):
    """Symmetric int8 weights, one scale per output channel; activations stay in floating point."""

    method: Literal["int8"] = "int8"


class _GroupedInt4(QuantConfig):
    group_size: Literal[32, 64, 128] = 128
    zero_point: bool = True


class RTNInt4Config(_GroupedInt4):
    """Round-to-nearest int4 with group-wise scales and zeros: the baseline AWQ is measured against."""

    method: Literal["int4_rtn"] = "int4_rtn"


class AWQConfig(_GroupedInt4):
    """Activation-aware int4: per-input-channel scales s = mean|x|^alpha searched over `n_grid`
    values of alpha in [0, 1), folded into the preceding op, then a clipping search."""

    method: Literal["awq"] = "awq"
    n_grid: PositiveInt = 20
    clip_search: bool = True
    clip_grid: PositiveInt = 20
    max_shrink: float = Field(default=0.5, gt=0.0, lt=1.0)
    calib_samples: PositiveInt = 128
    calib_seq_len: PositiveInt = 512


class FP8Config(QuantConfig):
    """E4M3 weights (per-tensor or per-row scales) with dynamic per-row activation scaling."""

    method: Literal["fp8"] = "fp8"
    weight_scale: Literal["per_tensor", "per_row"] = "per_row"
    activation_scale: Literal["dynamic"] = "dynamic"



_METHODS: dict[str, type[QuantConfig]] = {
    "int8": Int8Config, "int4_rtn": RTNInt4Config, "awq": AWQConfig, "fp8": FP8Config,
}

AnyQuantConfig = Annotated[Int8Config | RTNInt4Config | AWQConfig | FP8Config, Field(discriminator="method")]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(AnyQuantConfig)
