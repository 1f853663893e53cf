"""Schema fuzz: requests generated from the app's own OpenAPI document (schemathesis), valid and
invalid, plus arbitrary JSON and bytes, sent to a live server over the real engine. No input may
produce a 5xx, and every refusal is an OpenAI error body."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tessera.gateway import create_app
from tessera.specs import EngineConfig

# Small admission bounds: a generated request with a huge n or max_tokens is refused (400) at once
# instead of keeping the CPU engine busy for minutes.
LIMITS = {"max_queue": 4, "max_queue_tokens": 192}
FUZZ = settings(max_examples=50, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def fuzz_engine(tiny_checkpoint: Path) -> Iterator[Any]:
    """The real engine with a 64-token context: chat requests without max_tokens generate to the end of
    the context, and a short one keeps each generated case quick."""
    from tessera.serve import AsyncEngine

    engine = AsyncEngine.from_path(tiny_checkpoint, config=EngineConfig(device="cpu", dtype="float32",
                                                                        max_model_len=64, num_blocks=128))
    yield engine
    asyncio.run(engine.shutdown(drain=False, timeout=10))


@pytest.fixture(scope="module")
def fuzz_app(fuzz_engine: Any) -> Any:
    return create_app(fuzz_engine, **LIMITS)


@pytest.fixture(scope="module")
def http(fuzz_app: Any, live: Any) -> Iterator[httpx.Client]:
    with live(fuzz_app) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        yield c


def check(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.endswith("data: [DONE]\n\n")
        assert '"error"' not in r.text or '"code":"timeout"' not in r.text


def send(http: httpx.Client, case: Any, model: str) -> httpx.Response:
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        body = body | {"model": model}  # else nearly every case is an unknown-model 404
    kwargs: dict[str, Any] = {"params": case.query or None}
    if isinstance(body, bytes):
        kwargs |= {"content": body, "headers": {"content-type": case.media_type or "application/json"}}
    elif not isinstance(body, schemathesis.core.NotSet):
        kwargs["json"] = body
    return http.request(case.method, case.formatted_path, **kwargs)


OPERATIONS = [("/v1/completions", "POST"), ("/v1/chat/completions", "POST")]


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
@pytest.mark.parametrize("path,method", OPERATIONS)
def test_schema_fuzz(fuzz_app: Any, http: httpx.Client, fuzz_engine: Any, path: str, method: str,
                     mode: Any) -> None:
    schema = schemathesis.openapi.from_dict(fuzz_app.openapi())
    strategy = schema[path][method].as_strategy(generation_mode=mode)
    statuses: list[int] = []

    @FUZZ
    @given(case=strategy)
    def run(case: Any) -> None:
        r = send(http, case, fuzz_engine.model_name)
        statuses.append(r.status_code)
        check(r)

    run()
    if mode == schemathesis.GenerationMode.POSITIVE:
        assert 200 in statuses, sorted(set(statuses))  # the fuzz reached the engine, not only the validators


def test_get_routes_fuzz(fuzz_app: Any, http: httpx.Client) -> None:
    schema = schemathesis.openapi.from_dict(fuzz_app.openapi())
    for path in ("/v1/models", "/health", "/metrics"):
        strategy = schema[path]["GET"].as_strategy()

        @settings(FUZZ, max_examples=5)
        @given(case=strategy)
        def run(case: Any) -> None:
            r = send(http, case, "")
            assert r.status_code == 200, r.text

        run()


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=9), inner, max_size=4),
                    max_leaves=12)
FIELDS = st.sampled_from(["prompt", "messages", "max_tokens", "n", "temperature", "top_p", "stop", "seed", "stream",
                          "logprobs", "top_logprobs", "stream_options", "presence_penalty", "best_of", "model"])


@FUZZ
@given(path=st.sampled_from([p for p, _ in OPERATIONS]), body=st.dictionaries(FIELDS, JSON, max_size=6))
def test_arbitrary_json_bodies(http: httpx.Client, path: str, body: dict[str, Any]) -> None:
    check(http.post(path, content=json.dumps(body), headers={"content-type": "application/json"}))


@FUZZ
@given(path=st.sampled_from([p for p, _ in OPERATIONS]), raw=st.binary(max_size=200))
def test_arbitrary_bytes(http: httpx.Client, path: str, raw: bytes) -> None:
    check(http.post(path, content=raw, headers={"content-type": "application/json"}))
