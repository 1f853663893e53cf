"""Engine outputs as OpenAI bodies: whole responses, streamed deltas, logprobs and usage.

The engine yields cumulative outputs; `Progress` turns them into deltas. While a request with stop
strings is unfinished, the last `len(longest stop) - 1` characters are held back, so a stop string the
engine later cuts off is never streamed: the streamed text always concatenates to the final text.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from tessera.gateway import protocol as p
from tessera.specs import CompletionOutput, RequestOutput, TokenLogprob


def token_text(tokenizer: Any, token_id: int) -> str:
    if tokenizer is None:
        return f"token_id:{token_id}"
    return tokenizer.decode([token_id], skip_special_tokens=False)


def finish_reason(out: CompletionOutput) -> str | None:
    """OpenAI's finish reason; "abort" has none and is reported as an error by the caller."""
    return out.finish_reason if out.finish_reason in ("stop", "length") else None


def completion_logprobs(tokenizer: Any, entries: Sequence[TokenLogprob], offset: int,
                        with_top: bool) -> tuple[p.CompletionLogprobs, int]:
    """Legacy-completions logprobs for `entries`, text offsets starting at `offset`; returns the next offset."""
    tokens, lps, tops, offsets = [], [], [], []
    for e in entries:
        text = token_text(tokenizer, e.token_id)
        tokens.append(text)
        lps.append(e.logprob)
        offsets.append(offset)
        offset += len(text)
        if with_top:
            tops.append({token_text(tokenizer, t): lp for t, lp in e.top.items()})
    return p.CompletionLogprobs(tokens=tokens, token_logprobs=lps, top_logprobs=tops if with_top else None,
                                text_offset=offsets), offset


def chat_logprobs(tokenizer: Any, entries: Sequence[TokenLogprob]) -> p.ChatLogprobs:
    def top(token_id: int, lp: float) -> p.TopLogprob:
        text = token_text(tokenizer, token_id)
        return p.TopLogprob(token=text, logprob=lp, bytes=list(text.encode()))

    content = []
    for e in entries:
        head = top(e.token_id, e.logprob)
        tops = [top(t, lp) for t, lp in sorted(e.top.items(), key=lambda kv: -kv[1])]
        content.append(p.TokenLogprobEntry(**head.model_dump(), top_logprobs=tops))
    return p.ChatLogprobs(content=content)


def usage(prompt_tokens: int, finals: Sequence[RequestOutput]) -> p.Usage:
    completion = sum(len(o.outputs[0].token_ids) for o in finals if o.outputs)
    return p.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion)


@dataclass
class Step:
    text: str
    logprobs: tuple[TokenLogprob, ...]
    finish_reason: str | None
    finished: bool


@dataclass
class Progress:
    """What one choice has streamed so far."""

    hold: int
    sent_chars: int = 0
    sent_logprobs: int = 0
    offset: int = 0
    started: bool = False
    done: bool = False
    final: RequestOutput | None = field(default=None, repr=False)

    @classmethod
    def for_stop(cls, stop: Sequence[str]) -> Progress:
        return cls(hold=max((len(s) for s in stop), default=1) - 1)

    def step(self, out: RequestOutput) -> Step:
        """The delta since the previous call: new text (minus the held-back tail while unfinished) and new
        logprob entries."""
        comp = out.outputs[0]
        end = len(comp.text) if out.finished else max(self.sent_chars, len(comp.text) - self.hold)
        text = comp.text[self.sent_chars:end]
        self.sent_chars = max(self.sent_chars, end)
        entries = tuple(comp.logprobs or ())[self.sent_logprobs:]
        self.sent_logprobs += len(entries)
        if out.finished:
            self.done, self.final = True, out
        return Step(text, entries, finish_reason(comp) if out.finished else None, out.finished)


@dataclass
class ChunkWriter:
    """Server-sent events for one streamed request, in OpenAI's chunk format for its endpoint."""

    chat: bool
    id: str
    model: str
    tokenizer: Any
    logprobs: int | None
    include_usage: bool
    created: int = field(default_factory=lambda: int(time.time()))

    def _event(self, choices: list[Any], usage: p.Usage | None = None) -> str:
        cls = p.ChatCompletionChunk if self.chat else p.CompletionResponse
        return sse(cls(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage),
                   with_usage=self.include_usage)

    def opening(self, choices: int) -> list[str]:
        """Chat streams open each choice with an empty assistant delta; completions have no opening."""
        if not self.chat:
            return []
        return [self._event([p.ChatChunkChoice(index=i, delta=p.Delta(role="assistant", content=""))])
                for i in range(choices)]

    def delta(self, index: int, state: Progress, step: Step) -> str | None:
        """The event for one step of choice `index`, or None when it carries nothing."""
        if not (step.text or step.logprobs or step.finished):
            return None
        if self.chat:
            lp = chat_logprobs(self.tokenizer, step.logprobs) if self.logprobs is not None else None
            return self._event([p.ChatChunkChoice(index=index, delta=p.Delta(content=step.text or None), logprobs=lp,
                                                  finish_reason=step.finish_reason)])
        lp = None
        if self.logprobs is not None:
            lp, state.offset = completion_logprobs(self.tokenizer, step.logprobs, state.offset, self.logprobs > 0)
        return self._event([p.CompletionChoice(index=index, text=step.text, logprobs=lp,
                                               finish_reason=step.finish_reason)])

    def usage(self, use: p.Usage) -> str:
        return self._event([], use)


def completion_response(request_id: str, model: str, tok: Any, prompt_tokens: int, finals: Sequence[RequestOutput],
                        logprobs: int | None) -> p.CompletionResponse:
    choices = []
    for i, out in enumerate(finals):
        comp = out.outputs[0]
        lp = completion_logprobs(tok, comp.logprobs or (), 0, logprobs > 0)[0] if logprobs is not None else None
        choices.append(p.CompletionChoice(index=i, text=comp.text, logprobs=lp, finish_reason=finish_reason(comp)))
    return p.CompletionResponse(id=request_id, created=int(time.time()), model=model, choices=choices,
                                usage=usage(prompt_tokens, finals))


def chat_response(request_id: str, model: str, tok: Any, prompt_tokens: int, finals: Sequence[RequestOutput],
                  logprobs: int | None) -> p.ChatCompletionResponse:
    choices = []
    for i, out in enumerate(finals):
        comp = out.outputs[0]
        lp = chat_logprobs(tok, comp.logprobs or ()) if logprobs is not None else None
        choices.append(p.ChatChoice(index=i, message=p.AssistantMessage(content=comp.text), logprobs=lp,
                                    finish_reason=finish_reason(comp)))
    return p.ChatCompletionResponse(id=request_id, created=int(time.time()), model=model, choices=choices,
                                    usage=usage(prompt_tokens, finals))


def sse(obj: BaseModel | dict[str, Any], *, with_usage: bool = True) -> str:
    """One server-sent event; chunks carry `"usage": null` only when the client asked for usage."""
    data = obj.model_dump(mode="json") if isinstance(obj, BaseModel) else obj
    if not with_usage:
        data.pop("usage", None)
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


DONE = "data: [DONE]\n\n"
