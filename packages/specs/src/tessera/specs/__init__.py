"""Tessera's contracts. Pure pydantic: importing this never imports torch."""

from tessera.specs.base import Spec, SpecVersionError
from tessera.specs.distill import (
    CheckpointConfig,
    DataConfig,
    DistillConfig,
    LossConfig,
    OptimizerConfig,
    ParallelConfig,
    TemperatureSchedule,
)
from tessera.specs.engine import EngineConfig, SpeculativeConfig
from tessera.specs.kernels import (
    CATALOGUE,
    KernelImpl,
    KernelRegistry,
    KernelSpec,
    KernelUnavailableError,
    Tolerance,
    UnknownOpError,
)
from tessera.specs.kv_cache import KVCacheHandle, KVCacheManager, KVCacheSpec
from tessera.specs.model_card import Lineage, ModelCard, TokenizerInfo
from tessera.specs.model_config import PRESETS, ModelConfig, RopeScaling
from tessera.specs.pipeline import PipelineConfig
from tessera.specs.quant import AnyQuantConfig, AWQConfig, FP8Config, Int8Config, QuantConfig, RTNInt4Config
from tessera.specs.sampling import SamplingParams
from tessera.specs.serve_abi import (
    CompletionOutput,
    FinishReason,
    GenerateRequest,
    RequestMetrics,
    RequestOutput,
    TokenLogprob,
)
from tessera.specs.tensor import TensorShapeError, TensorSpec, dtype_name

__version__ = "0.1.0"

__all__ = [
    "CATALOGUE",
    "PRESETS",
    "AWQConfig",
    "AnyQuantConfig",
    "CheckpointConfig",
    "CompletionOutput",
    "DataConfig",
    "DistillConfig",
    "EngineConfig",
    "FP8Config",
    "FinishReason",
    "GenerateRequest",
    "Int8Config",
    "KVCacheHandle",
    "KVCacheManager",
    "KVCacheSpec",
    "KernelImpl",
    "KernelRegistry",
    "KernelSpec",
    "KernelUnavailableError",
    "Lineage",
    "LossConfig",
    "ModelCard",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "PipelineConfig",
    "QuantConfig",
    "RTNInt4Config",
    "RequestMetrics",
    "RequestOutput",
    "RopeScaling",
    "SamplingParams",
    "Spec",
    "SpecVersionError",
    "SpeculativeConfig",
    "TemperatureSchedule",
    "TensorShapeError",
    "TensorSpec",
    "TokenLogprob",
    "TokenizerInfo",
    "Tolerance",
    "UnknownOpError",
    "dtype_name",
]
