"""A client that goes away (streaming or not) has its engine requests aborted and its queue room freed,
on a live server: only a real socket close produces the `http.disconnect` this relies on."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tessera.gateway import create_app


@pytest.mark.parametrize("n", [1, 3])
def test_streaming_disconnect_aborts(make_engine: Any, live: Any, until: Any, n: int) -> None:
    engine = make_engine(delay=0.02, max_model_len=1024)
    app = create_app(engine)
    with live(app) as server, httpx.Client(base_url=server.url, timeout=10) as c:
        body = {"prompt": "hi", "max_tokens": 500, "stream": True, "n": n}
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
        until(lambda: not engine.active, what="engine requests aborted")
        assert len(engine.aborted) == n
        assert all(len(engine.seen[0].prompt_token_ids) >= 1 for _ in engine.seen)
        until(lambda: app.state.gateway.admission.sequences == 0, what="queue room released")
        assert app.state.gateway.admission.tokens == 0
        metrics = c.get("/metrics").text
        assert 'tessera:request_aborted_total{model_name="scripted",reason="disconnect"} 1.0' in metrics


def test_non_streaming_disconnect_aborts(make_engine: Any, live: Any, until: Any) -> None:
    engine = make_engine(delay=0.02, max_model_len=1024)
    app = create_app(engine)
    with live(app) as server:
        with httpx.Client(base_url=server.url, timeout=0.3) as c, pytest.raises(httpx.ReadTimeout):
            c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 500})
        until(lambda: len(engine.aborted) == 1 and not engine.active, what="engine request aborted")
        until(lambda: app.state.gateway.admission.sequences == 0, what="queue room released")
        # the server is still fine afterwards
        with httpx.Client(base_url=server.url, timeout=10) as c:
            r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3})
            assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
