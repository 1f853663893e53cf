"""Route logic against a scripted engine: bodies, prompt forms, streaming, logprobs, usage, metrics."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tessera.gateway import create_app

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def events(body: str) -> list[Any]:
    out = []
    for block in body.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


async def test_completion_text_and_usage(engine: Any, tokenizer: Any) -> None:
    async with client(create_app(engine)) as c:
        r = await c.post("/v1/completions", json={"prompt": "hello world", "max_tokens": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "scripted"
    (choice,) = body["choices"]
    assert choice["text"] == tokenizer.decode(engine.script[:5])
    assert choice["finish_reason"] == "length"
    prompt_len = len(tokenizer.encode("hello world"))
    assert body["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": 5, "total_tokens": prompt_len + 5}
    assert engine.seen[0].prompt_token_ids == tuple(tokenizer.encode("hello world"))


@pytest.mark.parametrize("prompt,n,expected_prompts", [
    ("abc", 3, 1), (["a b", "c d", "hello"], 1, 3), ([5, 6, 7], 2, 1), ([[5, 6], [7], [8, 9, 10]], 2, 3)])
async def test_prompt_forms_and_choice_order(engine: Any, prompt: Any, n: int, expected_prompts: int) -> None:
    async with client(create_app(engine)) as c:
        r = await c.post("/v1/completions", json={"prompt": prompt, "n": n, "max_tokens": 3, "seed": 7})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [ch["index"] for ch in choices] == list(range(expected_prompts * n))
    seen = {req.request_id: req for req in engine.seen}
    rid = r.json()["id"]
    for idx in range(expected_prompts * n):
        req = seen[f"{rid}-{idx}"]
        assert req.sampling.n == 1 and req.sampling.seed == 7 + idx % n
    per_prompt = [seen[f"{rid}-{p * n}"].prompt_token_ids for p in range(expected_prompts)]
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] == sum(len(ids) for ids in per_prompt)
    assert usage["completion_tokens"] == 3 * expected_prompts * n


async def test_sampling_fields_reach_the_engine(engine: Any) -> None:
    body = {"prompt": "x", "max_tokens": 4, "temperature": 0.5, "top_p": 0.9, "stop": ["zz", "yy"], "seed": 3,
            "presence_penalty": 0.5, "frequency_penalty": -0.5, "top_k": 5, "min_p": 0.1,
            "repetition_penalty": 1.2, "min_tokens": 1, "ignore_eos": True, "stop_token_ids": [2]}
    async with client(create_app(engine)) as c:
        assert (await c.post("/v1/completions", json=body)).status_code == 200
    s = engine.seen[0].sampling
    assert (s.temperature, s.top_p, s.stop, s.seed, s.presence_penalty, s.frequency_penalty) == (
        0.5, 0.9, ("zz", "yy"), 3, 0.5, -0.5)
    assert (s.top_k, s.min_p, s.repetition_penalty, s.min_tokens, s.ignore_eos, s.stop_token_ids) == (
        5, 0.1, 1.2, 1, True, (2,))


async def test_chat_uses_the_tokenizers_template(engine: Any, tokenizer: Any) -> None:
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}]}]
    async with client(create_app(engine)) as c:
        r = await c.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 4, "model": "scripted"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": body["choices"][0]["message"]["content"]}
    rendered = tokenizer.apply_chat_template([{"role": "system", "content": "be brief"},
                                              {"role": "user", "content": "hello there"}])
    assert engine.seen[0].prompt_token_ids == tuple(tokenizer.encode(rendered))
    assert body["usage"]["prompt_tokens"] == len(tokenizer.encode(rendered))


async def test_chat_default_max_tokens_fills_the_context(engine: Any) -> None:
    async with client(create_app(engine)) as c:
        r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    req = engine.seen[0]
    assert len(req.prompt_token_ids) + req.sampling.max_tokens == engine.max_model_len


@pytest.mark.parametrize("chat", [False, True])
async def test_stream_concatenates_to_the_full_answer(engine: Any, chat: bool) -> None:
    base: dict[str, Any] = {"max_tokens": 12, "n": 2, "stop": [" fox"]}
    base |= {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}
    path = "/v1/chat/completions" if chat else "/v1/completions"
    async with client(create_app(engine)) as c:
        whole = (await c.post(path, json=base)).json()
        r = await c.post(path, json=base | {"stream": True, "stream_options": {"include_usage": True}})
    assert r.headers["content-type"].startswith("text/event-stream")
    evs = events(r.text)
    assert evs[-1] == "[DONE]"
    usage_chunk = evs[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]
    texts: dict[int, str] = {0: "", 1: ""}
    reasons: dict[int, str] = {}
    for ev in evs[:-2]:
        assert ev["usage"] is None
        assert ev["object"] == ("chat.completion.chunk" if chat else "text_completion")
        for ch in ev["choices"]:
            texts[ch["index"]] += (ch["delta"].get("content") or "") if chat else ch["text"]
            if ch["finish_reason"]:
                reasons[ch["index"]] = ch["finish_reason"]
    for ch in whole["choices"]:
        final = ch["message"]["content"] if chat else ch["text"]
        assert " fox" not in final and final == texts[ch["index"]]
        assert reasons[ch["index"]] == ch["finish_reason"] == "stop"


async def test_chat_stream_starts_with_the_role(engine: Any) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    async with client(create_app(engine)) as c:
        evs = events((await c.post("/v1/chat/completions", json=body)).text)
    assert evs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "usage" not in evs[1]


async def test_completion_logprobs(engine: Any, tokenizer: Any) -> None:
    async with client(create_app(engine)) as c:
        r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 6, "logprobs": 3})
    lp = r.json()["choices"][0]["logprobs"]
    ids = engine.script[:6]
    assert lp["tokens"] == [tokenizer.decode([t], skip_special_tokens=False) for t in ids]
    assert lp["token_logprobs"] == [-0.25 * (j % 4) for j in range(6)]
    assert all(len(top) == 3 for top in lp["top_logprobs"])
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:j]) for j in range(6)]
    assert engine.seen[0].sampling.logprobs == 3


async def test_chat_logprobs_stream_and_whole_agree(engine: Any) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "logprobs": True, "top_logprobs": 2}
    async with client(create_app(engine)) as c:
        whole = (await c.post("/v1/chat/completions", json=body)).json()
        evs = events((await c.post("/v1/chat/completions", json=body | {"stream": True})).text)
    content = whole["choices"][0]["logprobs"]["content"]
    assert len(content) == 5 and all(len(e["top_logprobs"]) == 2 for e in content)
    assert all(e["bytes"] == list(e["token"].encode()) for e in content)
    streamed = [e for ev in evs[1:-1] for ch in ev["choices"] if ch["logprobs"] for e in ch["logprobs"]["content"]]
    assert streamed == content


async def test_models_and_health(engine: Any) -> None:
    async with client(create_app(engine)) as c:
        models = (await c.get("/v1/models")).json()
        assert [m["id"] for m in models["data"]] == ["scripted"]
        assert models["data"][0]["max_model_len"] == engine.max_model_len
        assert (await c.get("/health")).status_code == 200
        engine.healthy = False
        assert (await c.get("/health")).status_code == 503
        r = await c.post("/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"


async def test_metrics_names_and_counts(engine: Any) -> None:
    async with client(create_app(engine)) as c:
        for _ in range(3):
            assert (await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4})).status_code == 200
        text = (await c.get("/metrics")).text
    for name in ("tessera:num_requests_running", "tessera:num_requests_waiting", "tessera:kv_cache_usage_perc",
                 "tessera:num_preemptions_total", "tessera:prefix_cache_hits_total",
                 "tessera:prefix_cache_queries_total", "tessera:time_to_first_token_seconds_bucket",
                 "tessera:inter_token_latency_seconds_bucket", "tessera:e2e_request_latency_seconds_bucket"):
        assert name in text, name
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    lab = '{model_name="scripted"}'
    assert float(samples["tessera:time_to_first_token_seconds_count" + lab]) == 3
    assert float(samples["tessera:e2e_request_latency_seconds_count" + lab]) == 3
    assert float(samples["tessera:inter_token_latency_seconds_count" + lab]) == 3 * 3
    assert float(samples["tessera:generation_tokens_total" + lab]) == 12
    assert float(samples["tessera:num_requests_running" + lab]) == 0
    assert float(samples["tessera:gateway_queue_sequences" + lab]) == 0
    assert float(samples['tessera:request_success_total{finished_reason="length",model_name="scripted"}']) == 3
