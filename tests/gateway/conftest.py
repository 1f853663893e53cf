"""Fixtures for the gateway tests: a scripted engine implementing the AsyncEngine contract (for route
logic, where a real model adds nothing but time) and a live uvicorn server on a loopback port."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from tessera.model.tokenizer import Tokenizer
from tessera.serve.errors import RequestRejected
from tessera.specs import (
    CompletionOutput,
    EngineConfig,
    GenerateRequest,
    ModelConfig,
    RequestMetrics,
    RequestOutput,
    TokenLogprob,
)

CORPUS = ("the quick brown fox jumps over the lazy dog. " * 20 + "hello world, a small test of text. " * 20
          + "Sphinx of black quartz, judge my vow! 0123456789 " * 10)
CONTINUATION = "the quick brown fox jumps over the lazy dog. "


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.train([CORPUS], vocab_size=300, show_progress=False)


@dataclass
class Stats:
    num_running: int
    num_waiting: int
    kv_usage: float
    num_preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    generation_tokens_total: int
    prompt_tokens_total: int


class ScriptedEngine:
    """Answers every prompt with CONTINUATION repeated, one token per `delay` seconds, honouring
    max_tokens, stop strings, stop_token_ids and logprobs as the contract says. Records what it saw."""

    def __init__(self, tokenizer: Tokenizer, *, delay: float = 0.0, max_model_len: int = 128,
                 capacity: int = 64) -> None:
        self.tokenizer = tokenizer
        self.model_name = "scripted"
        self.max_model_len = max_model_len
        self.delay = delay
        self.capacity = capacity
        self.healthy = True
        self.fail: Exception | None = None
        self.script = tokenizer.encode(CONTINUATION)
        self.active: set[str] = set()
        self.seen: list[GenerateRequest] = []
        self.aborted: list[str] = []
        self.generated = 0

    def stats(self) -> Stats:
        return Stats(len(self.active), 0, len(self.active) / self.capacity, 0, 0, 0, self.generated,
                     sum(len(r.prompt_token_ids or ()) for r in self.seen))

    async def abort(self, request_id: str) -> None:
        if request_id in self.active:
            self.active.discard(request_id)
            self.aborted.append(request_id)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        if self.fail is not None:
            raise self.fail
        s = request.sampling
        prompt = request.prompt_token_ids or tuple(self.tokenizer.encode(request.prompt or ""))
        if len(prompt) + s.max_tokens > self.max_model_len:
            raise RequestRejected("max_tokens", s.max_tokens, "exceeds the context")
        rid = request.request_id
        self.seen.append(request)
        self.active.add(rid)
        arrival = time.time()
        metrics = RequestMetrics(arrival_time=arrival)
        ids: list[int] = []
        try:
            for k in range(s.max_tokens):
                await asyncio.sleep(self.delay)
                if rid not in self.active:
                    return
                ids.append(self.script[k % len(self.script)])
                self.generated += 1
                if k == 0:
                    metrics = metrics.model_copy(update={"first_token_time": time.time()})
                text = self.tokenizer.decode(ids)
                reason = "length" if k + 1 == s.max_tokens else None
                if ids[-1] in s.stop_token_ids:
                    reason = "stop"
                for stop in s.stop:
                    if stop in text:
                        text, reason = text[: text.index(stop)], "stop"
                lps = None
                if s.logprobs is not None:
                    lps = tuple(TokenLogprob(token_id=t, logprob=-0.25 * (j % 4),
                                             top={(t + d) % 300: -0.5 * d for d in range(s.logprobs)})
                                for j, t in enumerate(ids))
                done = reason is not None
                if done:
                    self.active.discard(rid)
                    metrics = metrics.model_copy(update={"finished_time": time.time()})
                yield RequestOutput(request_id=rid, prompt_token_ids=prompt, finished=done,
                                    outputs=(CompletionOutput(text=text, token_ids=tuple(ids), logprobs=lps,
                                                              finish_reason=reason),),
                                    metrics=metrics if done else None)
                if done:
                    return
        finally:
            await self.abort(rid)


@pytest.fixture
def engine(tokenizer: Tokenizer) -> ScriptedEngine:
    return ScriptedEngine(tokenizer)


class LiveServer:
    """uvicorn on 127.0.0.1 and a free port, in a thread; `url` is the base URL."""

    def __init__(self, app: Any) -> None:
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted sockets only when the listener has it, and
        # without it every response (headers and body are separate writes) waits ~40 ms on delayed ACKs.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", loop="asyncio", http="h11", lifespan="off",
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


@pytest.fixture(scope="session")
def live() -> Iterator[type[LiveServer]]:
    yield LiveServer


def wait_until(predicate: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def make_engine(tokenizer: Tokenizer) -> Any:
    def make(**kw: Any) -> ScriptedEngine:
        return ScriptedEngine(tokenizer, **kw)

    return make


@pytest.fixture
def until() -> Any:
    return wait_until


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Path:
    """A tiny random-weight model with a trained tokenizer, saved as a tessera checkpoint."""
    import torch

    from tessera.model import Transformer
    from tessera.model.checkpoint import save_pretrained

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                      max_seq_len=256, eos_token_id=tokenizer.eos_token_id)
    return save_pretrained(Transformer(cfg), tmp_path_factory.mktemp("tiny") / "model", tokenizer=tokenizer)


ENGINE_CONFIG = EngineConfig(device="cpu", dtype="float32", max_model_len=256, num_blocks=512, block_size=16,
                             max_num_seqs=256, max_num_batched_tokens=2048)


@pytest.fixture(scope="module")
def acceptance_engine(tiny_checkpoint: Path) -> Iterator[Any]:
    """The real AsyncEngine over the tiny checkpoint (one per test module; shut down after it)."""
    from tessera.serve import AsyncEngine

    engine = AsyncEngine.from_path(tiny_checkpoint, config=ENGINE_CONFIG)
    yield engine
    asyncio.run(engine.shutdown(drain=False, timeout=10))
