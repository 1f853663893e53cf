"""Every refusal is an OpenAI error body with the right status, and a 400 names the field at fault."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from tessera.gateway import create_app
from tessera.serve.errors import EngineOverloaded, RequestRejected

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def client(app: Any, **kw: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", **kw)


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": "x", "temperature": 5}, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, "stop[0]"),
    ("/v1/completions", {"prompt": "x", "stop": ["a"] * 17}, "stop"),
    ("/v1/completions", {"prompt": "x", "top_k": 0}, "top_k"),
    ("/v1/completions", {"prompt": "x", "min_tokens": 9, "max_tokens": 3}, "min_tokens"),
    ("/v1/completions", {"prompt": "x", "frobnicate": 1}, "frobnicate"),
    ("/v1/completions", {"max_tokens": 3}, "prompt"),
    ("/v1/completions", {"prompt": [1, "a"]}, "prompt[1]"),
    ("/v1/completions", {"prompt": [-1]}, "prompt[0]"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": [[1], []]}, "prompt[1]"),
    ("/v1/completions", {"prompt": [10**6]}, "prompt"),
    ("/v1/completions", {"prompt": "x", "echo": True}, "echo"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, "best_of"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 1.0}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {"prompt": "x " * 200}, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 500}, "max_tokens"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content[0].type"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "tool_calls": []}]},
     "messages[0].tool_calls"),
    ("/v1/chat/completions", {"messages": USER, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": USER, "max_completion_tokens": 1000}, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": USER, "presence_penalty": 3}, "presence_penalty"),
    ("/v1/chat/completions", {"messages": USER, "stream": "yes please"}, "stream"),
])
async def test_bad_input_is_400_naming_the_field(engine: Any, path: str, body: dict, param: str) -> None:
    async with client(create_app(engine)) as c:
        err = assert_error(await c.post(path, json=body), 400, param)
    assert err["type"] == "invalid_request_error"
    assert not engine.seen


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"null", b'"prompt"', b"\xff\xfe"])
async def test_malformed_bodies_are_400(engine: Any, raw: bytes) -> None:
    async with client(create_app(engine)) as c:
        assert_error(await c.post("/v1/completions", content=raw, headers={"content-type": "application/json"}), 400)


async def test_unknown_model_is_404(engine: Any) -> None:
    async with client(create_app(engine)) as c:
        err = assert_error(await c.post("/v1/completions", json={"prompt": "x", "model": "gpt-9"}), 404, "model")
    assert err["code"] == "model_not_found"


async def test_body_limit_is_413(make_engine: Any) -> None:
    app = create_app(make_engine(max_model_len=4096), max_body_bytes=1000)
    async with client(app) as c:
        assert_error(await c.post("/v1/completions", json={"prompt": "x" * 2000}), 413)

        async def chunks() -> Any:
            for _ in range(5):
                yield b" " * 400

        assert_error(await c.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"}),
                     413)
        assert (await c.post("/v1/completions", json={"prompt": "x" * 900})).status_code == 200


async def test_api_key_guards_every_route_but_health(engine: Any) -> None:
    app = create_app(engine, api_key="s3cret")
    async with client(app) as c:
        for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions"),
                             ("POST", "/v1/chat/completions"), ("GET", "/openapi.json")):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                            {"Authorization": "Bearer s3cret2"}):
                err = assert_error(await c.request(method, path, headers=headers, json={}), 401)
                assert err["code"] == "invalid_api_key"
        assert (await c.get("/health")).status_code == 200
        ok = {"Authorization": "Bearer s3cret"}
        assert (await c.get("/v1/models", headers=ok)).status_code == 200
        assert (await c.post("/v1/completions", headers=ok, json={"prompt": "hi"})).status_code == 200


async def test_full_queue_is_429_with_retry_after(make_engine: Any) -> None:
    engine = make_engine(delay=0.01)
    app = create_app(engine, max_queue=2, retry_after_s=3)
    async with client(app) as c:
        slow = asyncio.ensure_future(c.post("/v1/completions", json={"prompt": "a", "max_tokens": 50, "n": 2}))
        while not engine.active:
            await asyncio.sleep(0.005)
        r = await c.post("/v1/completions", json={"prompt": "b", "max_tokens": 2})
        assert_error(r, 429)
        assert r.headers["retry-after"] == "3"
        assert (await slow).status_code == 200
        assert (await c.post("/v1/completions", json={"prompt": "b", "max_tokens": 2})).status_code == 200
        # a request that could never fit the bound is a 400, not a retry-later 429
        assert_error(await c.post("/v1/completions", json={"prompt": "b", "n": 3}), 400, "n")


async def test_token_budget_is_bounded(make_engine: Any) -> None:
    engine = make_engine(delay=0.01)
    app = create_app(engine, max_queue_tokens=60)
    async with client(app) as c:
        slow = asyncio.ensure_future(c.post("/v1/completions", json={"prompt": "a", "max_tokens": 40}))
        while not engine.active:
            await asyncio.sleep(0.005)
        assert_error(await c.post("/v1/completions", json={"prompt": "b", "max_tokens": 30}), 429)
        assert (await c.post("/v1/completions", json={"prompt": "b", "max_tokens": 5})).status_code == 200
        await slow
        assert_error(await c.post("/v1/completions", json={"prompt": "b", "max_tokens": 70}), 400, "max_tokens")


@pytest.mark.parametrize("exc,status,param", [
    (RequestRejected("prompt", "x", "too long for the cache"), 400, "prompt"),
    (EngineOverloaded(10, 10), 429, None),
    (RuntimeError("boom"), 500, None),
])
async def test_engine_exceptions_map_to_status(engine: Any, exc: Exception, status: int, param: str | None) -> None:
    engine.fail = exc
    async with client(create_app(engine)) as c:
        assert_error(await c.post("/v1/completions", json={"prompt": "x"}), status, param)
        r = await c.post("/v1/completions", json={"prompt": "x", "stream": True})
        assert_error(r, status, param)
        if status == 429:
            assert r.headers["retry-after"] == "1"
        engine.fail = None
        text = (await c.get("/metrics")).text
    assert f'tessera:request_rejected_total{{model_name="scripted",status="{status}"}} 2.0' in text


async def test_dead_engine_is_503(engine: Any) -> None:
    engine.fail = RuntimeError("loop died")
    engine.healthy = False
    async with client(create_app(engine)) as c:
        assert_error(await c.post("/v1/completions", json={"prompt": "x"}), 503)


async def test_timeout_is_504_and_aborts(make_engine: Any) -> None:
    engine = make_engine(delay=0.05)
    app = create_app(engine, request_timeout_s=0.2)
    async with client(app) as c:
        err = assert_error(await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 100}), 504)
        assert err["code"] == "timeout"
        r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 100, "stream": True})
        assert r.status_code == 200
        assert '"code":"timeout"' in r.text and r.text.endswith("data: [DONE]\n\n")
    assert not engine.active and len(engine.aborted) == 2
    assert app.state.gateway.admission.sequences == 0
