"""From an OpenAI request body to engine requests: tokenize, check lengths, build `SamplingParams`.

Everything a client can get wrong is caught here and answered 400 naming the field, before any engine
work is queued. Prompts are tokenized once, here, and sent to the engine as token ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from tessera.gateway.errors import APIError, bad_request, from_validation
from tessera.gateway.protocol import ChatCompletionRequest, CompletionRequest
from tessera.specs import GenerateRequest, SamplingParams

_SEED_SPACE = 2**63


@dataclass(frozen=True)
class Plan:
    """One HTTP request as engine requests: choice `p * n + i` is sample `i` of prompt `p`."""

    request_id: str
    prompts: tuple[tuple[int, ...], ...]
    requests: tuple[GenerateRequest, ...]
    n: int

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def token_budget(self) -> int:
        return sum(len(r.prompt_token_ids or ()) + r.sampling.max_tokens for r in self.requests)


def check_model(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise APIError(404, f"model {requested!r} is not served here (this server serves {served!r})",
                       param="model", code="model_not_found")


def _encode(tokenizer: Any, text: str, param: str) -> tuple[int, ...]:
    if tokenizer is None:
        raise bad_request(param, "this model has no tokenizer; send the prompt as token ids")
    return tuple(tokenizer.encode(text))


def completion_prompts(req: CompletionRequest, tokenizer: Any) -> list[tuple[int, ...]]:
    """The prompt field as token-id lists; raises 400 (param "prompt") on empty or out-of-vocabulary input."""
    p = req.prompt
    if isinstance(p, str):
        prompts = [_encode(tokenizer, p, "prompt")]
    elif not p:
        raise bad_request("prompt", "prompt must not be an empty list")
    elif all(isinstance(x, str) for x in p):
        prompts = [_encode(tokenizer, x, f"prompt[{i}]") for i, x in enumerate(p)]
    elif all(isinstance(x, int) for x in p):
        prompts = [tuple(p)]
    else:
        prompts = [tuple(x) for x in p]
    vocab = getattr(tokenizer, "vocab_size", None)
    for i, ids in enumerate(prompts):
        where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        if not ids:
            raise bad_request(where, "prompt must contain at least one token")
        if vocab is not None and max(ids) >= vocab:
            raise bad_request(where, f"token id {max(ids)} is outside the vocabulary [0, {vocab})")
    return prompts


def chat_prompt(req: ChatCompletionRequest, tokenizer: Any) -> tuple[int, ...]:
    """Render the messages with the tokenizer's chat template and tokenize them."""
    if tokenizer is None:
        raise bad_request("messages", "this model has no tokenizer, so it has no chat template")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt)
    except ValueError as exc:
        raise bad_request("messages", f"chat template failed: {exc}") from exc
    ids = _encode(tokenizer, text, "messages")
    if not ids:
        raise bad_request("messages", "the rendered conversation is empty")
    return ids


def _check_unsupported(req: CompletionRequest | ChatCompletionRequest) -> None:
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options", "stream_options is only allowed when stream is true")
    if isinstance(req, CompletionRequest):
        if req.best_of is not None and req.best_of != req.n:
            raise bad_request("best_of", f"best_of must equal n ({req.n}) when given, got {req.best_of}",
                              code="unsupported")
    elif req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs", "top_logprobs requires logprobs to be true")


def _sampling(req: CompletionRequest | ChatCompletionRequest, max_tokens: int, seed: int | None) -> SamplingParams:
    logprobs = req.logprobs if isinstance(req, CompletionRequest) else (
        (req.top_logprobs or 0) if req.logprobs else None)
    fields: dict[str, Any] = {
        "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k, "min_p": req.min_p,
        "presence_penalty": req.presence_penalty, "frequency_penalty": req.frequency_penalty,
        "repetition_penalty": req.repetition_penalty, "stop": req.stop,
        "stop_token_ids": req.stop_token_ids,
    }
    fields = {k: v for k, v in fields.items() if v is not None}
    try:
        return SamplingParams(n=1, seed=seed, max_tokens=max_tokens, min_tokens=req.min_tokens,
                              ignore_eos=req.ignore_eos, logprobs=logprobs,
                              skip_special_tokens=req.skip_special_tokens, **fields)
    except ValidationError as exc:
        raise from_validation(exc.errors(), in_body=False) from exc


def plan(req: CompletionRequest | ChatCompletionRequest, prompts: list[tuple[int, ...]], *, request_id: str,
         max_model_len: int) -> Plan:
    """Check every prompt against the context length and build one engine request per choice.

    `max_tokens` defaults to 16 for completions (as OpenAI's) and to whatever fits the context for chat.
    Raises `APIError(400)` naming `prompt`/`messages` when a prompt alone fills the context, and
    `max_tokens` when prompt + max_tokens exceeds it."""
    _check_unsupported(req)
    chat = isinstance(req, ChatCompletionRequest)
    asked = (req.max_completion_tokens or req.max_tokens) if chat else req.max_tokens
    what = "messages" if chat else "prompt"
    requests = []
    for p, ids in enumerate(prompts):
        room = max_model_len - len(ids)
        if room < 1:
            raise bad_request(what, f"the prompt has {len(ids)} tokens; this model's context is {max_model_len} "
                              "tokens, which leaves no room to generate", code="context_length_exceeded")
        max_tokens = asked if asked is not None else (room if chat else 16)
        if req.min_tokens > max_tokens:
            raise bad_request("min_tokens", f"min_tokens={req.min_tokens} exceeds max_tokens={max_tokens}")
        if max_tokens > room:
            field = "max_completion_tokens" if chat and req.max_completion_tokens else "max_tokens"
            raise bad_request(field, f"{field}={max_tokens} plus the prompt's {len(ids)} tokens exceeds this "
                              f"model's context of {max_model_len} tokens (at most {room})",
                              code="context_length_exceeded")
        for i in range(req.n):
            seed = None if req.seed is None else (req.seed + i) % _SEED_SPACE
            requests.append(GenerateRequest(request_id=f"{request_id}-{p * req.n + i}", prompt_token_ids=ids,
                                            sampling=_sampling(req, max_tokens, seed)))
    return Plan(request_id=request_id, prompts=tuple(prompts), requests=tuple(requests), n=req.n)
