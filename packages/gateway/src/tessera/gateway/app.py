"""`create_app`: the OpenAI-compatible FastAPI app over an `AsyncEngine`.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics.
The engine runs on its own thread; handlers only await it, so the event loop never blocks on a step.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from tessera.gateway import errors, prepare, render
from tessera.gateway import protocol as p
from tessera.gateway.admission import Admission, Ticket
from tessera.gateway.errors import APIError
from tessera.gateway.generation import ClientDisconnected, engine_error, outputs, unless_disconnected
from tessera.gateway.metrics import GatewayMetrics
from tessera.gateway.middleware import APIKeyMiddleware, BodyLimitMiddleware
from tessera.specs import RequestOutput

if TYPE_CHECKING:
    from tessera.serve import AsyncEngine

# Prompts longer than this are tokenized on a worker thread, so one huge body cannot stall the loop.
_INLINE_TOKENIZE_CHARS = 16_384


@dataclass(frozen=True)
class GatewaySettings:
    """Limits of one app. `max_queue`/`max_queue_tokens` bound the sequences and the token budget
    (prompt + max_tokens) admitted at once; `request_timeout_s=None` disables the per-request timeout."""

    api_key: str | None = None
    max_queue: int = 512
    max_queue_tokens: int = 2**21
    max_body_bytes: int = 4 * 2**20
    request_timeout_s: float | None = 600.0
    retry_after_s: int = 1
    served_model_name: str | None = None


class _SSEResponse(StreamingResponse):
    """A stream whose body iterator is always closed, even when the client vanishes between chunks,
    so the generator's cleanup (abort, release) runs at once rather than at garbage collection."""

    def __init__(self, body: AsyncIterator[str]) -> None:
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._body = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._body.aclose()  # type: ignore[attr-defined]


class Gateway:
    """The request handling behind the routes: validation, admission, generation, rendering."""

    def __init__(self, engine: AsyncEngine, settings: GatewaySettings) -> None:
        self.engine = engine
        self.settings = settings
        self.model_name = settings.served_model_name or engine.model_name
        self.admission = Admission(settings.max_queue, settings.max_queue_tokens, settings.retry_after_s)
        self.metrics = GatewayMetrics(engine.stats, self.model_name,
                                      lambda: (self.admission.sequences, self.admission.tokens))
        self.created = int(time.time())

    async def handle(self, body: p.CompletionRequest | p.ChatCompletionRequest, request: Request) -> Response:
        try:
            return await self._handle(body, request)
        except APIError as exc:
            self.metrics.reject(exc.status)
            raise

    def _engine_error(self, exc: Exception, chat: bool) -> APIError:
        return engine_error(exc, self.engine, self.settings.retry_after_s, "messages" if chat else "prompt")

    async def _prompts(self, body: p.CompletionRequest | p.ChatCompletionRequest) -> list[tuple[int, ...]]:
        tok = self.engine.tokenizer
        if isinstance(body, p.ChatCompletionRequest):
            size = sum(len(m.text()) for m in body.messages)
            fn, arg = (lambda: [prepare.chat_prompt(body, tok)]), size
        else:
            prompt = body.prompt
            size = len(prompt) if isinstance(prompt, str) else sum(len(x) for x in prompt if isinstance(x, str))
            fn, arg = (lambda: prepare.completion_prompts(body, tok)), size
        return fn() if arg <= _INLINE_TOKENIZE_CHARS else await anyio.to_thread.run_sync(fn)

    async def _handle(self, body: p.CompletionRequest | p.ChatCompletionRequest, request: Request) -> Response:
        if not self.engine.healthy:
            raise APIError(503, "the engine is not running", code="engine_dead")
        prepare.check_model(body.model, self.model_name)
        chat = isinstance(body, p.ChatCompletionRequest)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        plan = prepare.plan(body, await self._prompts(body), request_id=rid,
                            max_model_len=self.engine.max_model_len)
        ticket = self.admission.admit(len(plan.requests), plan.token_budget)
        timeout = self.settings.request_timeout_s
        deadline = None if timeout is None else time.monotonic() + timeout
        gen = outputs(self.engine, plan.requests, self.metrics, deadline=deadline)
        try:
            if body.stream:
                first = await unless_disconnected(request, lambda: anext(gen, None))
                stream = self._stream(plan, body, gen, first, ticket)
                ticket = None  # the stream owns it now
                return _SSEResponse(stream)
            finals = await unless_disconnected(request, lambda: _collect(gen, len(plan.requests)))
        except ClientDisconnected:
            self.metrics.abort("disconnect")
            return Response(status_code=499)
        except TimeoutError as exc:
            self.metrics.abort("timeout")
            raise APIError(504, f"request did not finish within the per-request timeout of {timeout} s",
                           code="timeout") from exc
        except APIError:
            raise
        except Exception as exc:
            raise self._engine_error(exc, chat) from exc
        finally:
            if ticket is not None:
                with anyio.CancelScope(shield=True):
                    await gen.aclose()
                self.admission.release(ticket)
        if any(o.outputs[0].finish_reason == "abort" for o in finals):
            raise APIError(503, "the engine aborted the request (shutting down?)", code="aborted")
        build = render.chat_response if chat else render.completion_response
        return _json(build(plan.request_id, self.model_name, self.engine.tokenizer, plan.prompt_tokens, finals,
                           plan.requests[0].sampling.logprobs))

    async def _stream(self, plan: prepare.Plan, body: p.CompletionRequest | p.ChatCompletionRequest,
                      gen: AsyncIterator[tuple[int, RequestOutput]], first: tuple[int, RequestOutput] | None,
                      ticket: Ticket) -> AsyncIterator[str]:
        """The SSE body. Owns `gen` and `ticket`: closing this generator (the client left) aborts what is
        unfinished and releases the room."""
        chat = isinstance(body, p.ChatCompletionRequest)
        writer = render.ChunkWriter(chat=chat, id=plan.request_id, model=self.model_name,
                                    tokenizer=self.engine.tokenizer, logprobs=plan.requests[0].sampling.logprobs,
                                    include_usage=bool(body.stream_options and body.stream_options.include_usage))
        progress = [render.Progress.for_stop(r.sampling.stop) for r in plan.requests]
        ending = "disconnect"
        try:
            for event in writer.opening(len(plan.requests)):
                yield event
            item = first
            while item is not None:
                i, out = item
                if out.finished and out.outputs[0].finish_reason == "abort":
                    raise APIError(503, "the engine aborted the request (shutting down?)", code="aborted")
                event = writer.delta(i, progress[i], progress[i].step(out))
                if event is not None:
                    yield event
                item = await anext(gen, None)
            ending = "done"
            if writer.include_usage:
                yield writer.usage(render.usage(plan.prompt_tokens, [s.final for s in progress if s.final]))
        except TimeoutError:
            ending = "timeout"
            yield render.sse(APIError(504, "request did not finish within the per-request timeout of "
                                      f"{self.settings.request_timeout_s} s", code="timeout").body())
        except APIError as exc:
            ending = "error"
            yield render.sse(exc.body())
        except Exception as exc:
            ending = "error"
            yield render.sse(self._engine_error(exc, chat).body())
        finally:
            with anyio.CancelScope(shield=True):
                await gen.aclose()  # type: ignore[attr-defined]
            self.admission.release(ticket)
            if ending in ("disconnect", "timeout"):
                self.metrics.abort(ending)
        yield render.DONE


async def _collect(gen: AsyncIterator[tuple[int, RequestOutput]], count: int) -> list[RequestOutput]:
    finals: list[RequestOutput | None] = [None] * count
    async for i, out in gen:
        if out.finished:
            finals[i] = out
    return [f for f in finals if f is not None]


def _json(model: Any) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": p.ErrorResponse, "description": desc} for code, desc in (
        (400, "invalid request (the error's `param` names the field)"), (401, "missing or wrong API key"),
        (404, "unknown model"), (413, "request body too large"), (429, "queue full; see Retry-After"),
        (503, "engine not running"), (504, "per-request timeout"))}


def create_app(engine: AsyncEngine, *, api_key: str | None = None, max_queue: int = 512,
               max_queue_tokens: int = 2**21, max_body_bytes: int = 4 * 2**20,
               request_timeout_s: float | None = 600.0, retry_after_s: int = 1,
               served_model_name: str | None = None) -> FastAPI:
    """The OpenAI-compatible app over `engine` (an `AsyncEngine` or anything with its interface).

    `api_key` guards every route but /health; `max_queue` and `max_queue_tokens` bound the sequences and
    token budget admitted at once (beyond: 429 + Retry-After); `max_body_bytes` bounds a request body
    (beyond: 413); `request_timeout_s` bounds each request (beyond: 504, or an error event when streaming).
    The app does not own the engine: shutting the engine down is the caller's job."""
    settings = GatewaySettings(api_key=api_key, max_queue=max_queue, max_queue_tokens=max_queue_tokens,
                               max_body_bytes=max_body_bytes, request_timeout_s=request_timeout_s,
                               retry_after_s=retry_after_s, served_model_name=served_model_name)
    gateway = Gateway(engine, settings)
    app = FastAPI(title="Tessera", version="0.1.0", description="OpenAI-compatible text generation.")
    app.state.gateway = gateway
    errors.install(app)
    streamed = {"text/event-stream": {"schema": {"type": "string"}}}

    @app.post("/v1/completions", response_model=p.CompletionResponse, responses={
        200: {"content": streamed, "description": "a completion, or server-sent chunks when stream is true"},
        **_ERRORS})
    async def completions(body: p.CompletionRequest, request: Request) -> Response:
        return await gateway.handle(body, request)

    @app.post("/v1/chat/completions", response_model=p.ChatCompletionResponse, responses={
        200: {"content": streamed, "description": "a chat completion, or server-sent chunks when stream is true"},
        **_ERRORS})
    async def chat_completions(body: p.ChatCompletionRequest, request: Request) -> Response:
        return await gateway.handle(body, request)

    @app.get("/v1/models", response_model=p.ModelList, responses={401: _ERRORS[401]})
    async def models() -> Response:
        entry = p.ModelCardEntry(id=gateway.model_name, created=gateway.created,
                                 max_model_len=engine.max_model_len)
        return _json(p.ModelList(data=[entry]))

    @app.get("/health", responses={503: {"description": "the engine loop is not running"}})
    async def health() -> JSONResponse:
        ok = bool(engine.healthy)
        return JSONResponse({"status": "ok" if ok else "engine dead"}, status_code=200 if ok else 503)

    @app.get("/metrics", response_class=Response, responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, 401: _ERRORS[401]})
    async def metrics() -> Response:
        return Response(gateway.metrics.render(), media_type=GatewayMetrics.CONTENT_TYPE)

    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    return app
