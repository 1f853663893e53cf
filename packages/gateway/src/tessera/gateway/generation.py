"""Running one HTTP request's engine requests: merge their output streams, enforce the deadline, and
make sure every exit path (finish, timeout, client gone, error) leaves no request on the engine.

Cleanup awaits run shielded: when Starlette cancels a stream because the client went away, the
surrounding cancel scope would otherwise cancel the abort itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, TypeVar

import anyio
from starlette.requests import Request

from tessera.gateway.errors import APIError
from tessera.gateway.metrics import GatewayMetrics
from tessera.serve.errors import EngineDeadError, EngineOverloaded, RequestRejected
from tessera.specs import GenerateRequest, RequestOutput

log = logging.getLogger("tessera.gateway")
T = TypeVar("T")


class ClientDisconnected(Exception):
    """The HTTP client went away before its answer was ready."""


def engine_error(exc: Exception, engine: Any, retry_after_s: int, prompt_field: str = "prompt") -> APIError:
    """The HTTP face of an engine exception. The engine names its own fields; `prompt_token_ids` is
    reported as the API field the prompt came in (`prompt` or `messages`)."""
    if isinstance(exc, RequestRejected):
        field = prompt_field if exc.field in ("prompt", "prompt_token_ids") else exc.field
        return APIError(400, str(exc), param=field, code="invalid_value")
    if isinstance(exc, EngineOverloaded):
        return APIError(429, str(exc), code="engine_overloaded", headers={"Retry-After": str(retry_after_s)})
    if isinstance(exc, EngineDeadError) or not engine.healthy:
        return APIError(503, f"the engine is not running ({type(exc).__name__}: {exc})", code="engine_dead")
    log.error("engine request failed", exc_info=exc)
    return APIError(500, f"engine error: {type(exc).__name__}", code="internal_error")


async def _abort_all(engine: Any, request_ids: list[str]) -> None:
    with anyio.CancelScope(shield=True):
        for rid in request_ids:
            await engine.abort(rid)


async def _one(engine: Any, req: GenerateRequest, metrics: GatewayMetrics) -> AsyncIterator[RequestOutput]:
    """The engine's stream for one request, observing inter-token gaps and the finished request."""
    last_t, last_n = time.perf_counter(), 0
    async with aclosing(engine.generate(req)) as stream:
        async for out in stream:
            now = time.perf_counter()
            n = len(out.outputs[0].token_ids) if out.outputs else 0
            if n > last_n:
                if last_n:
                    metrics.observe_tokens(now - last_t, n - last_n)
                last_t, last_n = now, n
            if out.finished:
                metrics.observe_finished(out)
            yield out


async def outputs(engine: Any, requests: tuple[GenerateRequest, ...], metrics: GatewayMetrics, *,
                  deadline: float | None) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Yield `(choice index, cumulative output)` for all `requests` interleaved as they arrive, until all
    have finished. Raises TimeoutError past `deadline` (a `time.monotonic()` value) and the engine's own
    exceptions; whatever way this generator ends, unfinished requests are aborted on the engine."""
    unfinished = {r.request_id for r in requests}
    ids = [r.request_id for r in requests]

    def remaining() -> float:
        return float("inf") if deadline is None else max(0.0, deadline - time.monotonic())

    try:
        if len(requests) == 1:
            async with aclosing(_one(engine, requests[0], metrics)) as stream:
                while True:
                    with anyio.fail_after(remaining()):
                        out = await anext(stream, None)
                    if out is None:
                        return
                    if out.finished:
                        unfinished.discard(out.request_id)
                    yield 0, out
        queue: asyncio.Queue[tuple[int, RequestOutput | None, BaseException | None]] = asyncio.Queue()

        async def pump(index: int, req: GenerateRequest) -> None:
            try:
                async for out in _one(engine, req, metrics):
                    queue.put_nowait((index, out, None))
            except Exception as exc:
                queue.put_nowait((index, None, exc))

        tasks = [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(requests)]
        try:
            while unfinished:
                with anyio.fail_after(remaining()):
                    index, out, exc = await queue.get()
                if exc is not None:
                    raise exc
                assert out is not None
                if out.finished:
                    unfinished.discard(out.request_id)
                yield index, out
        finally:
            for t in tasks:
                t.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        if unfinished:
            await _abort_all(engine, [rid for rid in ids if rid in unfinished])


async def unless_disconnected(request: Request, work: Callable[[], Awaitable[T]]) -> T:
    """Run `work()`; if the client disconnects first, cancel it and raise ClientDisconnected. Used for
    non-streaming answers, where nothing else would notice the client leaving. Exceptions of `work()`
    propagate as themselves (not wrapped in an ExceptionGroup)."""
    gone = False
    result: list[T] = []
    error: list[Exception] = []
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            nonlocal gone
            while (await request.receive())["type"] != "http.disconnect":
                pass
            gone = True
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        try:
            result.append(await work())
        except Exception as exc:
            error.append(exc)
        tg.cancel_scope.cancel()
    if error:
        raise error[0]
    if gone and not result:
        raise ClientDisconnected
    return result[0]
