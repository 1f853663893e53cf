"""Incremental detokenization for streaming: text grows by whole characters as tokens arrive.

Decoding every output token from scratch each step is quadratic, and decoding one token at a time
breaks characters whose UTF-8 bytes span several byte-level tokens. Instead, keep a small window:
decode `ids[prefix:]` and `ids[prefix:read]`, emit the difference once it no longer ends in a
replacement character (an unfinished code point), then slide the window forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Decoder, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.prefix = 0
        self.read = 0

    def step(self, output_ids: Sequence[int]) -> str:
        """New text for `output_ids` (all output tokens so far); "" while a character is unfinished."""
        skip = self.skip_special_tokens
        before = self.tokenizer.decode(output_ids[self.prefix:self.read], skip_special_tokens=skip)
        after = self.tokenizer.decode(output_ids[self.prefix:], skip_special_tokens=skip)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(output_ids)
            return after[len(before):]
        return ""

    def flush(self, output_ids: Sequence[int]) -> str:
        """Whatever text is still held back (an unfinished character decodes as U+FFFD), for the end."""
        skip = self.skip_special_tokens
        before = self.tokenizer.decode(output_ids[self.prefix:self.read], skip_special_tokens=skip)
        after = self.tokenizer.decode(output_ids[self.prefix:], skip_special_tokens=skip)
        self.prefix = self.read = len(output_ids)
        return after[len(before):]
