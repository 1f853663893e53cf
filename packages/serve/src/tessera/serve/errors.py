"""Errors a caller can act on: a request that can never be served, and a full waiting queue."""

from __future__ import annotations

from typing import Any


class RequestRejected(ValueError):
    """The request can never be served as given (HTTP 400). `field` names the offending input
    (e.g. "prompt", "max_tokens") and `value` is what was given."""

    def __init__(self, field: str, value: Any, reason: str) -> None:
        super().__init__(f"{field}={value!r}: {reason}")
        self.field = field
        self.value = value
        self.reason = reason


class EngineOverloaded(RuntimeError):
    """The waiting queue is full (HTTP 429); retry later."""

    def __init__(self, num_waiting: int, max_waiting: int) -> None:
        super().__init__(f"waiting queue is full ({num_waiting} of max_waiting={max_waiting}); retry later")
        self.num_waiting = num_waiting
        self.max_waiting = max_waiting


class EngineDeadError(RuntimeError):
    """The engine loop failed; no request can make progress."""
