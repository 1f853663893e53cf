"""AsyncEngine: streaming, cancellation freeing blocks, errors surfacing to the caller, shutdown."""

from __future__ import annotations

import asyncio

import pytest

from tessera.serve import AsyncEngine, EngineOverloaded, RequestRejected
from tessera.specs import GenerateRequest, SamplingParams

from .conftest import engine
from .test_engine import GREEDY, prompts


def request(rid: str, ids, sp: SamplingParams = GREEDY) -> GenerateRequest:
    return GenerateRequest(request_id=rid, prompt_token_ids=tuple(ids), sampling=sp)


async def collect(eng: AsyncEngine, req: GenerateRequest):
    return [out async for out in eng.generate(req)]


def test_streams_cumulative_outputs_equal_to_the_sync_engine(model) -> None:
    ps = prompts(3, seed=12)
    sync = engine(model)
    from .conftest import run

    want = [o.outputs[0].token_ids for o in run(sync, ps, GREEDY)]
    finished = []

    async def main():
        eng = AsyncEngine(engine(model))
        eng.add_request_listener(finished.append)
        streams = await asyncio.gather(*(collect(eng, request(f"s{i}", p)) for i, p in enumerate(ps)))
        stats = eng.stats()
        await eng.shutdown()
        return streams, stats, eng

    streams, stats, eng = asyncio.run(main())
    for stream, tokens in zip(streams, want):
        lengths = [len(o.outputs[0].token_ids) for o in stream]
        assert lengths == sorted(lengths) and stream[-1].finished and not any(o.finished for o in stream[:-1])
        assert stream[-1].outputs[0].token_ids == tokens
        m = stream[-1].metrics
        assert m.arrival_time <= m.first_token_time <= m.finished_time
    assert sorted(o.request_id for o in finished) == ["s0", "s1", "s2"]
    assert stats.generation_tokens_total == 36 and stats.num_running == 0
    assert not eng.healthy  # the loop thread has stopped


def test_cancelling_the_consumer_aborts_and_frees_blocks(model) -> None:
    async def main():
        inner = engine(model)
        eng = AsyncEngine(inner)
        long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        got = []

        async def consume():
            async for out in eng.generate(request("c", range(10), long)):
                got.append(out)

        task = asyncio.create_task(consume())
        while len(got) < 2:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(500):
            if not inner.has_unfinished():
                break
            await asyncio.sleep(0.01)
        free = inner.bm.num_free_blocks
        await eng.shutdown()
        return inner, free, got

    inner, free, got = asyncio.run(main())
    assert free == inner.num_blocks and not got[-1].finished


def test_abort_ends_the_stream_with_reason_abort(model) -> None:
    async def main():
        eng = AsyncEngine(engine(model))
        stream = eng.generate(request("a", range(5), SamplingParams(max_tokens=200, ignore_eos=True)))
        first = await stream.__anext__()
        await eng.abort("a")
        rest = [o async for o in stream]
        await eng.shutdown()
        return first, rest

    first, rest = asyncio.run(main())
    assert not first.finished and rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"


def test_errors_reach_the_caller(model) -> None:
    async def main():
        eng = AsyncEngine(engine(model, max_model_len=32))
        with pytest.raises(RequestRejected) as e:
            await collect(eng, request("r", range(30), SamplingParams(max_tokens=10)))
        assert e.value.field == "max_tokens"
        await eng.shutdown()
        # one running and one waiting fill the queue, so the third is refused
        eng = AsyncEngine(engine(model, max_waiting=1, max_num_seqs=1))
        long = SamplingParams(max_tokens=200, ignore_eos=True)
        a = asyncio.create_task(collect(eng, request("a", range(5), long)))
        await asyncio.sleep(0.02)
        b = asyncio.create_task(collect(eng, request("b", range(5), SamplingParams(max_tokens=5))))
        await asyncio.sleep(0.02)
        with pytest.raises(EngineOverloaded):
            await collect(eng, request("c", range(5)))
        await eng.abort("a")
        await asyncio.gather(a, b)
        await eng.shutdown()

    asyncio.run(main())
