"""`AsyncEngine`: the engine loop on its own thread, streaming outputs to asyncio callers.

Only the loop thread touches the `LLMEngine`: callers hand it commands (add, abort) through a queue and
get outputs back through per-request `asyncio.Queue`s filled with `call_soon_threadsafe`, so the event
loop never waits on a model step. A consumer that stops listening (its task cancelled, e.g. a client
disconnect) aborts its request, which frees the request's KV blocks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tessera.serve.engine import EngineStats, LLMEngine
from tessera.serve.errors import EngineDeadError
from tessera.specs import EngineConfig, GenerateRequest, QuantConfig, RequestOutput

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._listeners: list[Callable[[RequestOutput], Any]] = []
        self._failure: BaseException | None = None
        self._accepting = True
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="tessera-engine-loop", daemon=True)
        self._thread.start()

    @classmethod
    def from_path(cls, path: str | Path, *, draft: str | Path | None = None, quant: QuantConfig | str | None = None,
                  config: EngineConfig | None = None) -> AsyncEngine:
        from tessera.serve.llm import LLM

        return cls(LLM(path, draft=draft, quant=quant, config=config).engine)

    # ---- properties the gateway reads ----------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def healthy(self) -> bool:
        return self._thread.is_alive() and self._failure is None

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def add_request_listener(self, fn: Callable[[RequestOutput], Any]) -> None:
        """Call `fn(output)` with every finished request's final output, on the requester's event loop."""
        self._listeners.append(fn)

    # ---- requests -----------------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs as tokens arrive; the last has `finished=True`. Raises RequestRejected,
        EngineOverloaded, or EngineDeadError (the loop failed or is shutting down)."""
        if self._failure is not None:
            raise EngineDeadError(f"engine loop failed: {self._failure!r}")
        if not self._accepting:
            raise EngineDeadError("engine is shutting down")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        added: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._submit(("add", request, stream, added))
        await asyncio.wrap_future(added)
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._submit(("abort", request.request_id, None))

    async def abort(self, request_id: str) -> None:
        """Abort a request (its stream, if any, ends with finish_reason "abort") and free its blocks."""
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._submit(("abort", request_id, done))
        await asyncio.wrap_future(done)

    async def shutdown(self, drain: bool = True, timeout: float = 30.0) -> None:
        """Stop accepting requests; with `drain`, let running ones finish (up to `timeout` seconds);
        abort whatever is left and stop the loop thread."""
        self._accepting = False
        deadline = time.monotonic() + timeout
        while drain and self.engine.has_unfinished() and self.healthy and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self._stop = True
        self._wake.set()
        await asyncio.to_thread(self._thread.join, max(0.1, deadline - time.monotonic()))

    def _submit(self, command: tuple[Any, ...]) -> None:
        if self._failure is not None:
            raise EngineDeadError(f"engine loop failed: {self._failure!r}")
        self._commands.put(command)
        self._wake.set()

    # ---- the loop thread --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop:
                self._handle_commands()
                if self.engine.has_unfinished():
                    self._dispatch(self.engine.step())
                else:
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
            self._handle_commands()
            for request_id in list(self.engine.requests):
                self._abort(request_id, None)
        except BaseException as exc:  # the loop must report any failure to every waiting caller
            log.exception("engine loop failed")
            self._failure = exc
            self._fail_everyone(exc)

    def _handle_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                _, request, stream, added = command
                try:
                    self.engine.add_request(request)
                except Exception as exc:
                    added.set_exception(exc)
                    continue
                self._streams[request.request_id] = stream
                added.set_result(None)
            else:
                _, request_id, done = command
                self._abort(request_id, done)

    def _abort(self, request_id: str, done: concurrent.futures.Future | None) -> None:
        out = self.engine.abort(request_id)
        if out is not None:
            self._dispatch([out])
        if done is not None:
            done.set_result(None)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            alive = _post(stream.loop, stream.queue.put_nowait, out)
            if out.finished or not alive:
                del self._streams[out.request_id]
            if out.finished and alive:
                for fn in self._listeners:
                    _post(stream.loop, fn, out)

    def _fail_everyone(self, exc: BaseException) -> None:
        error = EngineDeadError(f"engine loop failed: {exc!r}")
        for stream in self._streams.values():
            _post(stream.loop, stream.queue.put_nowait, error)
        self._streams.clear()
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            future = command[3] if command[0] == "add" else command[2]
            if future is not None:
                future.set_exception(error)


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[[Any], Any], arg: Any) -> bool:
    """Schedule `fn(arg)` on `loop`; False if that loop has closed (its caller is gone)."""
    try:
        loop.call_soon_threadsafe(fn, arg)
    except RuntimeError:
        return False
    return True
