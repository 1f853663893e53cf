"""The official `openai` client against a live server over the real engine (tiny random model):
completions, chat, streaming, and the error classes it raises for our statuses."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tessera.gateway import create_app
from tessera.specs import GenerateRequest, SamplingParams

KEY = "test-key"


@pytest.fixture(scope="module")
def server(acceptance_engine: Any, live: Any) -> Iterator[Any]:
    with live(create_app(acceptance_engine, api_key=KEY)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def direct(engine: Any, ids: list[int], max_tokens: int) -> tuple[int, ...]:
    """Greedy tokens straight from the engine, on a loop of our own (the reference for the HTTP path)."""
    async def run() -> tuple[int, ...]:
        req = GenerateRequest(request_id=f"direct-{threading.get_ident()}-{len(ids)}-{max_tokens}",
                              prompt_token_ids=tuple(ids),
                              sampling=SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
        last = None
        async for out in engine.generate(req):
            last = out
        assert last is not None and last.finished
        return last.outputs[0].token_ids

    return asyncio.run(run())


GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


def test_models(client: openai.OpenAI, acceptance_engine: Any) -> None:
    assert [m.id for m in client.models.list()] == [acceptance_engine.model_name]


def test_completion_matches_the_engine(client: openai.OpenAI, acceptance_engine: Any) -> None:
    tok = acceptance_engine.tokenizer
    r = client.completions.create(model=acceptance_engine.model_name, prompt="the quick brown", max_tokens=12,
                                  logprobs=2, **GREEDY)
    expected = direct(acceptance_engine, tok.encode("the quick brown"), 12)
    assert r.choices[0].text == tok.decode(list(expected))
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(tok.encode("the quick brown")) and r.usage.completion_tokens == 12
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 12 and all(x <= 0 for x in lp.token_logprobs)
    assert lp.tokens == [tok.decode([t], skip_special_tokens=False) for t in expected]


def test_chat_logprobs_are_greedy(client: openai.OpenAI, acceptance_engine: Any) -> None:
    r = client.chat.completions.create(model=acceptance_engine.model_name, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=6, logprobs=True, top_logprobs=3, **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:
        # greedy: the chosen token is the most likely, so it heads its own top list
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert entry.bytes == list(entry.token.encode())


def test_token_id_prompts_and_n(client: openai.OpenAI, acceptance_engine: Any) -> None:
    r = client.completions.create(model=acceptance_engine.model_name, prompt=[[5, 6, 7], [8, 9]], n=2,
                                  max_tokens=4, seed=3, temperature=1.0, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 16


def test_chat(client: openai.OpenAI, acceptance_engine: Any) -> None:
    tok = acceptance_engine.tokenizer
    messages = [{"role": "system", "content": "you are terse"}, {"role": "user", "content": "hello world"}]
    r = client.chat.completions.create(model=acceptance_engine.model_name, messages=messages, max_tokens=8, **GREEDY)
    ids = tok.encode(tok.apply_chat_template(messages))
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == tok.decode(list(direct(acceptance_engine, ids, 8)))


@pytest.mark.parametrize("chat", [False, True])
def test_streaming_equals_whole(client: openai.OpenAI, acceptance_engine: Any, chat: bool) -> None:
    name = acceptance_engine.model_name
    if chat:
        kw: dict[str, Any] = {"model": name, "messages": [{"role": "user", "content": "a b c"}], "max_tokens": 10}
        whole = client.chat.completions.create(**kw, **GREEDY).choices[0].message.content
        stream = client.chat.completions.create(**kw, **GREEDY, stream=True, stream_options={"include_usage": True})
        parts, usage = [], None
        for chunk in stream:
            parts += [c.delta.content or "" for c in chunk.choices]
            usage = chunk.usage or usage
    else:
        kw = {"model": name, "prompt": "a b c", "max_tokens": 10}
        whole = client.completions.create(**kw, **GREEDY).choices[0].text
        stream = client.completions.create(**kw, **GREEDY, stream=True, stream_options={"include_usage": True})
        parts, usage = [], None
        for chunk in stream:
            parts += [c.text for c in chunk.choices]
            usage = chunk.usage or usage
    assert "".join(parts) == whole
    assert usage is not None and usage.completion_tokens == 10


def test_bad_input_is_bad_request(client: openai.OpenAI, acceptance_engine: Any) -> None:
    name = acceptance_engine.model_name
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=name, prompt="x", max_tokens=acceptance_engine.max_model_len + 1)
    assert e.value.body["param"] == "max_tokens" and e.value.status_code == 400
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}], temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x")


def test_bad_key_is_authentication_error(server: Any, acceptance_engine: Any) -> None:
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=acceptance_engine.model_name, prompt="x", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_full_queue_is_rate_limit_error(acceptance_engine: Any, live: Any) -> None:
    name = acceptance_engine.model_name
    with live(create_app(acceptance_engine, max_queue=1, retry_after_s=2)) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        hog = c.completions.create(model=name, prompt="x", max_tokens=200, stream=True, **GREEDY)
        next(iter(hog))  # admitted and generating
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model=name, prompt="y", max_tokens=2)
        assert e.value.response.headers["retry-after"] == "2"
        hog.close()
