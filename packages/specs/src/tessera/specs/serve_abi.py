"""The serve ABI: a request in, per-request outputs out. Stable across minor versions."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import NonNegativeInt, model_validator

from tessera.specs.base import Spec
from tessera.specs.sampling import SamplingParams

FinishReason = Literal["stop", "length", "abort"]


class GenerateRequest(Spec):
    """Exactly one of `prompt` (text) and `prompt_token_ids` is given."""

    SCHEMA_VERSION: ClassVar[int] = 1
    schema_version: Literal[1] = 1
    request_id: str
    prompt: str | None = None
    prompt_token_ids: tuple[NonNegativeInt, ...] | None = None
    sampling: SamplingParams = SamplingParams()
    arrival_time: float | None = None

    @model_validator(mode="after")
    def _one_prompt(self) -> GenerateRequest:
        if (self.prompt is None) == (self.prompt_token_ids is None):
            raise ValueError("exactly one of prompt and prompt_token_ids must be given")
        if self.prompt_token_ids is not None and not self.prompt_token_ids:
            raise ValueError("prompt_token_ids must not be empty")
        return self


class TokenLogprob(Spec):
    SCHEMA_VERSION: ClassVar[int] = 1
    schema_version: Literal[1] = 1
    token_id: int
    logprob: float
    top: dict[int, float] = {}


class CompletionOutput(Spec):
    SCHEMA_VERSION: ClassVar[int] = 1
    schema_version: Literal[1] = 1
    index: NonNegativeInt = 0
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    cumulative_logprob: float | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None


class RequestMetrics(Spec):
    SCHEMA_VERSION: ClassVar[int] = 1
    schema_version: Literal[1] = 1
    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: NonNegativeInt = 0
    num_cached_tokens: NonNegativeInt = 0
    spec_draft_tokens: NonNegativeInt = 0
    spec_accepted_tokens: NonNegativeInt = 0

    @property
    def acceptance_rate(self) -> float | None:
        return self.spec_accepted_tokens / self.spec_draft_tokens if self.spec_draft_tokens else None


class RequestOutput(Spec):
    SCHEMA_VERSION: ClassVar[int] = 1
    schema_version: Literal[1] = 1
    request_id: str
    prompt: str | None = None
    prompt_token_ids: tuple[int, ...]
    outputs: tuple[CompletionOutput, ...]
    finished: bool
    metrics: RequestMetrics | None = None
