"""Admission control: a bounded queue of sequences and of tokens in front of the engine.

A request is admitted with its number of sequences (prompts x n) and its token budget (prompt tokens
plus max_tokens per sequence) and holds them until its last sequence finishes or is aborted. When
either bound would be exceeded the request is refused at once with 429 and `Retry-After`, so a
burst cannot pile unbounded work (and memory) onto the engine's waiting queue.
"""

from __future__ import annotations

from dataclasses import dataclass

from tessera.gateway.errors import APIError


@dataclass
class Ticket:
    sequences: int
    tokens: int
    released: bool = False


class Admission:
    """Counts admitted sequences and tokens; single-threaded (used from the event loop only)."""

    def __init__(self, max_sequences: int, max_tokens: int, retry_after_s: int = 1) -> None:
        if max_sequences < 1 or max_tokens < 1:
            raise ValueError(f"max_sequences={max_sequences} and max_tokens={max_tokens} must both be >= 1")
        self.max_sequences = max_sequences
        self.max_tokens = max_tokens
        self.retry_after_s = max(1, int(retry_after_s))
        self.sequences = 0
        self.tokens = 0
        self.rejected = 0

    def overloaded(self, message: str) -> APIError:
        return APIError(429, message, code="queue_full", headers={"Retry-After": str(self.retry_after_s)})

    def admit(self, sequences: int, tokens: int) -> Ticket:
        """Reserve room, or raise `APIError`: 400 when the request alone exceeds a bound (it could never
        be admitted), 429 with Retry-After when it would fit an idle queue but not the current one."""
        if sequences > self.max_sequences:
            raise APIError(400, f"request needs {sequences} sequences (prompts x n), over max_queue="
                           f"{self.max_sequences}", param="n", code="request_too_large")
        if tokens > self.max_tokens:
            raise APIError(400, f"request needs {tokens} tokens (prompt + max_tokens per sequence), over "
                           f"max_queue_tokens={self.max_tokens}", param="max_tokens", code="request_too_large")
        if self.sequences + sequences > self.max_sequences:
            self.rejected += 1
            raise self.overloaded(f"queue full: {self.sequences} sequences queued, max_queue={self.max_sequences}")
        if self.tokens + tokens > self.max_tokens:
            self.rejected += 1
            raise self.overloaded(f"queue full: {self.tokens} tokens queued, max_queue_tokens={self.max_tokens}")
        self.sequences += sequences
        self.tokens += tokens
        return Ticket(sequences, tokens)

    def release(self, ticket: Ticket) -> None:
        """Give a ticket's room back; releasing twice is a no-op."""
        if ticket.released:
            return
        ticket.released = True
        self.sequences -= ticket.sequences
        self.tokens -= ticket.tokens
