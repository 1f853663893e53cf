"""The gateway on loopback, in-process: uvicorn on a thread over an `AsyncEngine`, asked over real HTTP.

    with Loopback(AsyncEngine(llm.engine), host="127.0.0.1", port=0) as server:
        status, body = post_json(server.url + "/v1/completions", {...})

Stopping is clean: the server thread is joined (uvicorn closes its socket and finishes in-flight requests)
and then the engine drains and its loop thread ends. The HTTP client is the standard library's `urllib`, so
nothing beyond the runtime packages is needed.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn

from tessera.gateway import create_app
from tessera.serve import AsyncEngine


class Loopback:
    """Serves `engine` through `create_app` on `host:port` (0 = a free port) from a daemon thread.
    `url` is known once the context is entered. Raises RuntimeError when the server does not start within
    `start_timeout` seconds."""

    def __init__(self, engine: AsyncEngine, *, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 60.0,
                 **app_options: Any) -> None:
        self.engine = engine
        config = uvicorn.Config(create_app(engine, **app_options), host=host, port=port, log_level="warning",
                                lifespan="off", timeout_graceful_shutdown=10)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="tessera-loopback-http", daemon=True)
        self.start_timeout = start_timeout
        self.url = ""

    def __enter__(self) -> Loopback:
        return self.start()

    def start(self) -> Loopback:
        """Start serving and wait until the socket listens."""
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the HTTP server did not start on {self.server.config.host}:"
                                   f"{self.server.config.port}")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> dict[str, bool]:
        """Stop the server, then the engine (again: a no-op); returns whether each thread has ended."""
        self.server.should_exit = True
        self.thread.join(timeout=30)
        asyncio.run(self.engine.shutdown(drain=True, timeout=30))
        return {"server_stopped": not self.thread.is_alive(), "engine_stopped": not self.engine.healthy}


def post_json(url: str, body: dict[str, Any], timeout: float = 300.0) -> tuple[int, dict[str, Any]]:
    """(status, decoded JSON body) of a POST; HTTP errors are returned, not raised."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def post_stream(url: str, body: dict[str, Any], timeout: float = 300.0) -> Iterator[dict[str, Any]]:
    """The server-sent events of a streaming POST as decoded JSON objects, until `data: [DONE]`.
    Raises RuntimeError when the status is not 200 or the stream ends without `[DONE]`."""
    request = urllib.request.Request(url, data=json.dumps({**body, "stream": True}).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        if response.status != 200:
            raise RuntimeError(f"POST {url}: status {response.status}")
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                return
            yield json.loads(data)
    raise RuntimeError(f"POST {url}: the event stream ended without [DONE]")


def get_json(url: str, timeout: float = 30.0) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def ask(server: Loopback, prompt: str, chat_message: str, max_tokens: int,
        say: Callable[[str], None] = print) -> dict[str, Any]:
    """A greedy completion of `prompt` and a streaming greedy chat reply to `chat_message`, over HTTP.
    Returns what came back (texts, token counts, chunk count, latencies)."""
    model = get_json(server.url + "/v1/models")["data"][0]["id"]
    t0 = time.perf_counter()
    status, body = post_json(server.url + "/v1/completions",
                             {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    if status != 200:
        raise RuntimeError(f"POST /v1/completions: status {status}: {body}")
    completion = {"status": status, "prompt": prompt, "text": body["choices"][0]["text"],
                  "completion_tokens": body["usage"]["completion_tokens"], "seconds": time.perf_counter() - t0}
    say(f"POST /v1/completions {status}: {prompt!r} -> {completion['text']!r}")
    t0 = time.perf_counter()
    first = None
    pieces: list[str] = []
    chunks = 0
    for event in post_stream(server.url + "/v1/chat/completions",
                             {"model": model, "messages": [{"role": "user", "content": chat_message}],
                              "max_tokens": max_tokens, "temperature": 0}):
        chunks += 1
        delta = event["choices"][0]["delta"].get("content") if event.get("choices") else None
        if delta:
            first = first if first is not None else time.perf_counter() - t0
            pieces.append(delta)
    chat = {"status": 200, "message": chat_message, "text": "".join(pieces), "chunks": chunks,
            "first_token_seconds": first, "seconds": time.perf_counter() - t0}
    say(f"POST /v1/chat/completions (stream) 200: {chunks} events: {chat['text']!r}")
    return {"url": server.url, "model": model, "completion": completion, "chat": chat}
