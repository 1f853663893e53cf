"""`ModelConfig`: the shape of a decoder-only transformer, with named presets.

Version history:
  1: HF-style field names (hidden_size, num_hidden_layers, ...).
  2: short names (d_model, n_layers, ...) and an explicit rope_scaling block.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from tessera.specs.base import Spec


class RopeScaling(Spec):
    """RoPE frequency scaling. `linear` divides positions by `factor`; `llama3` is Llama-3.1's
    band-wise rescaling of the inverse frequencies (low/high frequency factors and the
    original context length)."""

    SCHEMA_VERSION: ClassVar[int] = 1
    schema_version: Literal[1] = 1
    type: Literal["linear", "llama3"]
    factor: PositiveFloat
    low_freq_factor: PositiveFloat = 1.0
    high_freq_factor: PositiveFloat = 4.0
    original_max_position_embeddings: PositiveInt = 8192

    @model_validator(mode="after")
    def _check_bands(self) -> RopeScaling:
        if self.type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"high_freq_factor ({self.high_freq_factor}) must exceed low_freq_factor ({self.low_freq_factor})"
            )
        return self


def _migrate_v1(data: dict[str, Any]) -> dict[str, Any]:
    renames = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "intermediate_size": "d_ff",
        "rms_norm_eps": "norm_eps",
        "max_position_embeddings": "max_seq_len",
        "tie_word_embeddings": "tie_embeddings",
    }
    out = {renames.get(k, k): v for k, v in data.items()}
    out.setdefault("n_kv_heads", out.get("n_heads"))
    return out


class ModelConfig(Spec):
    """Shape and numerics of a decoder-only transformer (RMSNorm, RoPE, GQA, SwiGLU)."""

    SCHEMA_VERSION: ClassVar[int] = 2
    MIGRATIONS: ClassVar[dict] = {1: _migrate_v1}

    schema_version: Literal[2] = 2
    family: Literal["llama", "qwen2", "qwen3"] = "llama"
    vocab_size: PositiveInt
    d_model: PositiveInt
    n_layers: PositiveInt
    n_heads: PositiveInt
    n_kv_heads: PositiveInt
    head_dim: PositiveInt | None = Field(default=None, description="defaults to d_model // n_heads")
    d_ff: PositiveInt
    rope_theta: PositiveFloat = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: PositiveFloat = 1e-5
    max_seq_len: PositiveInt = 2048
    tie_embeddings: bool = False
    qk_norm: bool = False
    attention_bias: bool = False
    init_std: PositiveFloat = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _fill_head_dim(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = cls.migrate(data)
        if isinstance(data, dict) and data.get("head_dim") is None:
            d_model, n_heads = data.get("d_model"), data.get("n_heads")
            if isinstance(d_model, int) and isinstance(n_heads, int) and n_heads > 0:
                if d_model % n_heads:
                    raise ValueError(
                        f"head_dim is unset and d_model ({d_model}) is not divisible by n_heads ({n_heads})"
                    )
                data = {**data, "head_dim": d_model // n_heads}
        return data

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim is not None and self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"{name} ({value}) must lie in [0, vocab_size={self.vocab_size})")
        return self

    @property
    def n_rep(self) -> int:
        """Query heads per KV head (1 = MHA, n_heads = MQA)."""
        return self.n_heads // self.n_kv_heads

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameter count, computed from the shape (matches the torch module exactly)."""
        hd = self.head_dim or self.d_model // self.n_heads
        q, kv = self.n_heads * hd, self.n_kv_heads * hd
        attn = self.d_model * (q + 2 * kv) + q * self.d_model
        if self.attention_bias:
            attn += q + 2 * kv
        if self.qk_norm:
            attn += 2 * hd
        mlp = 3 * self.d_model * self.d_ff
        per_layer = attn + mlp + 2 * self.d_model
        body = self.n_layers * per_layer + self.d_model
        if not include_embeddings:
            return body
        emb = self.vocab_size * self.d_model
        return body + emb * (1 if self.tie_embeddings else 2)

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        """A named preset; `ModelConfig.presets()` lists them."""
        try:
            return cls.model_validate(PRESETS[name])
        except KeyError:
            raise KeyError(f"unknown ModelConfig preset {name!r}; known: {sorted(PRESETS)}") from None

    @staticmethod
    def presets() -> list[str]:
        return sorted(PRESETS)


_LLAMA3_ROPE = {"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

PRESETS: dict[str, dict[str, Any]] = {
    # The demo pair: small enough to train on two CPU cores in minutes.
    "tiny-teacher": dict(vocab_size=2048, d_model=192, n_layers=4, n_heads=6, n_kv_heads=2, d_ff=512,
                         max_seq_len=256, tie_embeddings=True),
    "tiny-student": dict(vocab_size=2048, d_model=96, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=256,
                         max_seq_len=256, tie_embeddings=True),
    # The quality pair of the distillation figures.
    "teacher-40m": dict(vocab_size=8192, d_model=512, n_layers=12, n_heads=8, n_kv_heads=4, d_ff=1408,
                        max_seq_len=512, tie_embeddings=True),
    "student-6m": dict(vocab_size=8192, d_model=256, n_layers=6, n_heads=4, n_kv_heads=2, d_ff=704,
                       max_seq_len=512, tie_embeddings=True),
    # Shallow students of teacher-40m, meant as speculative drafts. At batch 1 a small model's forward
    # costs about a fixed time per layer (kernel launches, not bytes), so a draft's depth, more than its
    # width, sets the price of each draft token.
    "draft-2l": dict(vocab_size=8192, d_model=512, n_layers=2, n_heads=8, n_kv_heads=4, d_ff=1408,
                     max_seq_len=512, tie_embeddings=True),
    "draft-3l": dict(vocab_size=8192, d_model=384, n_layers=3, n_heads=6, n_kv_heads=2, d_ff=1024,
                     max_seq_len=512, tie_embeddings=True),
    # The throughput pair (shares Llama-3's vocabulary).
    "student-150m": dict(vocab_size=128256, d_model=768, n_layers=8, n_heads=12, n_kv_heads=4, d_ff=2048,
                         rope_theta=500000.0, max_seq_len=8192, tie_embeddings=True),
    # Shapes of published families, for benchmarks (random weights).
    "llama-3.2-1b": dict(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
                         d_ff=8192, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE, norm_eps=1e-5,
                         max_seq_len=131072, tie_embeddings=True, bos_token_id=128000, eos_token_id=128001),
    "llama-3.1-8b": dict(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                         d_ff=14336, rope_theta=500000.0, rope_scaling={**_LLAMA3_ROPE, "factor": 8.0},
                         norm_eps=1e-5, max_seq_len=131072, bos_token_id=128000, eos_token_id=128001),
    "qwen3-0.6b": dict(family="qwen3", vocab_size=151936, d_model=1024, n_layers=28, n_heads=16, n_kv_heads=8,
                       head_dim=128, d_ff=3072, rope_theta=1000000.0, norm_eps=1e-6, max_seq_len=40960,
                       tie_embeddings=True, qk_norm=True, eos_token_id=151645),
}
