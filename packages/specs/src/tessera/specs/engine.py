"""`EngineConfig` and `SpeculativeConfig`: how the serving engine is sized and scheduled."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, PositiveInt, model_validator

from tessera.specs.base import Spec


class SpeculativeConfig(Spec):
    """`draft`: a smaller model proposes `num_speculative_tokens` tokens per round.
    `ngram`: prompt lookup proposes the continuation of the latest n-gram match in the context."""

    SCHEMA_VERSION: ClassVar[int] = 1
    schema_version: Literal[1] = 1
    method: Literal["draft", "ngram"] = "draft"
    draft_model: str | None = None
    num_speculative_tokens: int = Field(default=4, ge=1, le=16)
    ngram_min: PositiveInt = 1
    ngram_max: PositiveInt = 4

    @model_validator(mode="after")
    def _check(self) -> SpeculativeConfig:
        if self.method == "draft" and not self.draft_model:
            raise ValueError("draft_model is required when method is 'draft'")
        if self.ngram_min > self.ngram_max:
            raise ValueError(f"ngram_min ({self.ngram_min}) exceeds ngram_max ({self.ngram_max})")
        return self

    @classmethod
    def from_flags(cls, base: SpeculativeConfig | dict | None, *, draft: str | None = None, ngram: bool = False,
                   num_speculative_tokens: int | None = None) -> SpeculativeConfig | None:
        """`base` (a config file's section, or None) with command-line flags over it: `draft` or `ngram`
        picks the method, `num_speculative_tokens` the k; flags left unset keep `base`'s values."""
        spec = base.model_dump() if isinstance(base, SpeculativeConfig) else dict(base or {})
        if draft or ngram:
            spec.update(method="draft" if draft else "ngram", draft_model=draft)
        elif num_speculative_tokens is not None and not spec:
            raise ValueError("--num-speculative-tokens needs --draft, --ngram or a speculative section in --config")
        if num_speculative_tokens is not None:
            spec["num_speculative_tokens"] = num_speculative_tokens
        return cls.model_validate(spec) if spec else None


class EngineConfig(Spec):
    """Serving engine settings. `num_blocks=None` sizes the KV cache from `kv_cache_memory_fraction`
    of free device memory (GPU) or `kv_cache_bytes` (CPU)."""

    SCHEMA_VERSION: ClassVar[int] = 1
    schema_version: Literal[1] = 1
    model: str | None = None
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "auto"
    device: str = "auto"
    seed: int = 0
    max_model_len: PositiveInt | None = None
    block_size: PositiveInt = 16
    num_blocks: PositiveInt | None = None
    kv_cache_memory_fraction: float = Field(default=0.85, gt=0.0, le=1.0)
    kv_cache_bytes: PositiveInt = 256 * 2**20
    max_num_seqs: PositiveInt = 256
    max_num_batched_tokens: PositiveInt = 8192
    max_waiting: PositiveInt = 4096
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    enforce_eager: bool = False
    cuda_graph_batch_sizes: tuple[PositiveInt, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    speculative: SpeculativeConfig | None = None
    tensor_parallel_size: PositiveInt = 1
    kernels: dict[str, str] = Field(default_factory=dict, description="op name -> pinned backend")

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        if self.max_num_batched_tokens < self.max_num_seqs and not self.enable_chunked_prefill:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}) without chunked prefill"
            )
        return self
