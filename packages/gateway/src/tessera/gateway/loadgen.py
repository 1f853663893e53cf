"""A load generator for a running server: N concurrent clients with a seeded mix of completions and
chat, streaming and not, some of which hang up mid-stream. Used by the load test and the benchmark.

The client is a minimal HTTP/1.1 connection over asyncio streams and `h11` (which uvicorn already
brings): one connection per client, no pool, so the client's own cost stays small and flat and is not
measured as server latency, and no HTTP library beyond the server's own dependencies is needed.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import h11


class Connection:
    """One keep-alive HTTP/1.1 connection. `request` sends a JSON body; `stream` yields the body's bytes."""

    def __init__(self, base_url: str, headers: dict[str, str] | None = None) -> None:
        url = urlsplit(base_url)
        if url.scheme != "http" or url.hostname is None:
            raise ValueError(f"base_url must be http://host:port, got {base_url!r}")
        self.host, self.port = url.hostname, url.port or 80
        self.headers = [("Host", f"{self.host}:{self.port}"), *(headers or {}).items()]
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._h11 = h11.Connection(our_role=h11.CLIENT)

    async def _send(self, method: str, path: str, body: bytes | None) -> None:
        if self._writer is None or self._h11.our_state is h11.MUST_CLOSE:
            await self.close()
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
            self._h11 = h11.Connection(our_role=h11.CLIENT)
        elif self._h11.our_state is h11.DONE:
            self._h11.start_next_cycle()
        headers = list(self.headers)
        if body is not None:
            headers += [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        data = self._h11.send(h11.Request(method=method, target=path, headers=headers))
        if body is not None:
            data += self._h11.send(h11.Data(data=body)) + self._h11.send(h11.EndOfMessage())
        else:
            data += self._h11.send(h11.EndOfMessage())
        assert self._writer is not None
        self._writer.write(data)
        await self._writer.drain()

    async def _event(self) -> Any:
        assert self._reader is not None
        while True:
            event = self._h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            self._h11.receive_data(await self._reader.read(65536))

    async def stream(self, method: str, path: str, body: Any = None) -> tuple[int, AsyncIterator[bytes]]:
        """Send a request; returns (status, an iterator over the response body's chunks)."""
        await self._send(method, path, None if body is None else json.dumps(body).encode())
        while not isinstance(response := await self._event(), h11.Response):
            pass

        async def chunks() -> AsyncIterator[bytes]:
            while True:
                event = await self._event()
                if isinstance(event, h11.Data):
                    yield bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    return

        return response.status_code, chunks()

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """Send a request and read the whole response; returns (status, parsed JSON or text)."""
        status, chunks = await self.stream(method, path, body)
        raw = b"".join([c async for c in chunks])
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except OSError:
                pass
        self._reader = self._writer = None


async def sse_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """The `data:` payloads of a server-sent-event stream, in order."""
    buf = b""
    async for chunk in chunks:
        buf += chunk
        while b"\n\n" in buf:
            block, buf = buf.split(b"\n\n", 1)
            for line in block.split(b"\n"):
                if line.startswith(b"data: "):
                    yield line[6:].decode()


@dataclass(frozen=True)
class ClientPlan:
    chat: bool
    stream: bool
    max_tokens: int
    disconnect: bool
    prompt: str


@dataclass
class Outcome:
    plan: ClientPlan
    status: int = 0
    latency_s: float = 0.0
    ttft_s: float | None = None
    completion_tokens: int | None = None
    finish_reasons: list[str] = field(default_factory=list)
    error: str | None = None


WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world", "serve", "tokens")


def mix(n: int, *, seed: int = 0, disconnect_frac: float = 0.1,
        max_tokens: tuple[int, int] = (4, 32)) -> list[ClientPlan]:
    """`n` client plans; exactly round(n * disconnect_frac) of them stream and hang up after the first chunk."""
    rng = random.Random(seed)
    n_drop = round(n * disconnect_frac)
    plans = []
    for i in range(n):
        drop = i < n_drop
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 24)))
        plans.append(ClientPlan(chat=rng.random() < 0.5, stream=drop or rng.random() < 0.5,
                                max_tokens=max_tokens[1] * 4 if drop else rng.randint(*max_tokens),
                                disconnect=drop, prompt=prompt))
    rng.shuffle(plans)
    return plans


def body_for(plan: ClientPlan, model: str | None = None) -> tuple[str, dict[str, Any]]:
    """(path, JSON body) of a plan: sampled at temperature 0.8 with EOS ignored, so lengths are exact."""
    body: dict[str, Any] = {"max_tokens": plan.max_tokens, "temperature": 0.8, "seed": 1, "ignore_eos": True}
    if model:
        body["model"] = model
    if plan.stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    if plan.chat:
        return "/v1/chat/completions", body | {"messages": [{"role": "user", "content": plan.prompt}]}
    return "/v1/completions", body | {"prompt": plan.prompt}


async def run_client(conn: Connection, plan: ClientPlan, model: str | None = None) -> Outcome:
    """One request; never raises (transport failures are recorded in `error`). A disconnecting client
    closes its connection after the first event."""
    path, body = body_for(plan, model)
    out = Outcome(plan)
    t0 = time.perf_counter()
    try:
        if not plan.stream:
            out.status, data = await conn.request("POST", path, body)
            if out.status == 200:
                out.completion_tokens = data["usage"]["completion_tokens"]
                out.finish_reasons = [c["finish_reason"] for c in data["choices"]]
        else:
            out.status, chunks = await conn.stream("POST", path, body)
            async for data in sse_events(chunks):
                if out.ttft_s is None:
                    out.ttft_s = time.perf_counter() - t0
                if plan.disconnect:
                    await conn.close()
                    break
                if data == "[DONE]":
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    out.error = chunk["error"]["message"]
                if chunk.get("usage"):
                    out.completion_tokens = chunk["usage"]["completion_tokens"]
                out.finish_reasons += [c["finish_reason"] for c in chunk.get("choices", []) if c["finish_reason"]]
    except Exception as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    out.latency_s = time.perf_counter() - t0
    return out


def percentiles(values: list[float], qs: tuple[float, ...] = (50, 90, 99)) -> dict[str, float]:
    """Nearest-rank percentiles (`p50`, ...) of `values`; empty input gives an empty dict."""
    if not values:
        return {}
    s = sorted(values)
    return {f"p{q:g}": s[min(len(s) - 1, max(0, round(q / 100 * len(s)) - 1))] for q in qs}


@dataclass
class LoadReport:
    outcomes: list[Outcome]
    wall_s: float

    @property
    def completed(self) -> list[Outcome]:
        """The clients that did not plan to hang up."""
        return [o for o in self.outcomes if not o.plan.disconnect]

    def summary(self) -> dict[str, Any]:
        done = [o for o in self.completed if o.status == 200 and o.error is None]
        return {
            "clients": len(self.outcomes),
            "disconnecting": sum(o.plan.disconnect for o in self.outcomes),
            "completed_ok": len(done),
            "status_counts": dict(Counter(o.status for o in self.outcomes)),
            "errors": sum(o.error is not None for o in self.completed),
            "wall_s": self.wall_s,
            "req_per_s": len(done) / self.wall_s if self.wall_s else 0.0,
            "tokens_per_s": sum(o.completion_tokens or 0 for o in done) / self.wall_s if self.wall_s else 0.0,
            "latency_s": percentiles([o.latency_s for o in done]),
            "ttft_s": percentiles([o.ttft_s for o in done if o.ttft_s is not None]),
        }


async def run_load(base_url: str, plans: list[ClientPlan], *, api_key: str | None = None, model: str | None = None,
                   timeout_s: float = 120.0) -> LoadReport:
    """Start every client at once against `base_url`, each on its own connection, and wait for all
    (raises TimeoutError after `timeout_s`)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def one(plan: ClientPlan) -> Outcome:
        conn = Connection(base_url, headers)
        try:
            return await run_client(conn, plan, model)
        finally:
            await conn.close()

    t0 = time.perf_counter()
    outcomes = await asyncio.wait_for(asyncio.gather(*(one(p) for p in plans)), timeout_s)
    return LoadReport(list(outcomes), time.perf_counter() - t0)
