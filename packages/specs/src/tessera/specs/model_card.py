"""`ModelCard`: what a checkpoint directory holds and where it came from.

`ModelCard.schema_version` gates the loader: a card newer than the code is refused, an older one
migrates forward.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, NonNegativeInt, field_validator

from tessera.specs.base import Spec
from tessera.specs.model_config import ModelConfig
from tessera.specs.quant import AnyQuantConfig


class TokenizerInfo(Spec):
    SCHEMA_VERSION: ClassVar[int] = 1
    schema_version: Literal[1] = 1
    file: str = "tokenizer.json"
    vocab_size: int
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    chat_template: str | None = None


class Lineage(Spec):
    """How the weights were made: `pretrain`, `distill` (from `teacher`), `import` (from an HF
    directory), `quantize` (from `parent`)."""

    SCHEMA_VERSION: ClassVar[int] = 1
    schema_version: Literal[1] = 1
    method: Literal["init", "pretrain", "distill", "import", "quantize"] = "init"
    parent: str | None = None
    teacher: str | None = None
    data: tuple[str, ...] = ()
    steps: NonNegativeInt = 0
    tokens: NonNegativeInt = 0
    notes: str = ""


class ModelCard(Spec):
    SCHEMA_VERSION: ClassVar[int] = 1
    schema_version: Literal[1] = 1
    format: Literal["tessera"] = "tessera"
    config: ModelConfig
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    quant: AnyQuantConfig | None = None
    tokenizer: TokenizerInfo | None = None
    lineage: Lineage = Lineage()
    weights: dict[str, str] = Field(description="weight file name -> sha256 hex digest")
    versions: dict[str, str] = {}
    created: str | None = None

    @field_validator("weights")
    @classmethod
    def _sha256(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("weights must list at least one file")
        for name, digest in v.items():
            if "/" in name or "\\" in name or name.startswith("."):
                raise ValueError(f"weight file name {name!r} must be a plain file name")
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"weights[{name!r}] is not a sha256 hex digest: {digest!r}")
        return v
