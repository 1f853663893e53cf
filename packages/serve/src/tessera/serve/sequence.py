"""One sequence being generated: its tokens, how many have KV in the cache, its cache handle, and
what it has produced so far. A request with `n > 1` is n sequences (one per completion index)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from tessera.serve.detokenizer import IncrementalDetokenizer
from tessera.specs import KVCacheHandle, SamplingParams, TokenLogprob


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """`token_ids` is prompt + output. `num_computed` tokens have their KV written in the cache; the
    rest (at least one while unfinished: the last sampled token) are fed to the next forward.
    `seed` keys every random draw for this sequence together with the token's position, so the
    output does not depend on batch composition or on preemption."""

    seq_id: int
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    seed: int
    max_model_len: int
    index: int = 0
    arrival_time: float = field(default_factory=time.time)
    prompt: str | None = None
    token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_draft_computed: int = 0
    handle: KVCacheHandle | None = None
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    text: str = ""
    detok: IncrementalDetokenizer | None = None
    logprobs: list[TokenLogprob] | None = None
    cumulative_logprob: float = 0.0
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        if self.sampling.logprobs is not None and self.logprobs is None:
            self.logprobs = []

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def num_uncomputed(self) -> int:
        """Tokens whose KV is not yet in the cache (fed to the next forward)."""
        return len(self.token_ids) - self.num_computed

    @property
    def is_decode(self) -> bool:
        return self.num_uncomputed == 1

    @property
    def max_len(self) -> int:
        """The longest this sequence may grow: prompt + max_tokens, capped by the context."""
        return min(len(self.prompt_token_ids) + self.sampling.max_tokens, self.max_model_len)

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
