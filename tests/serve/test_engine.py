"""The engine end to end on tiny random models: greedy parity with a cache-free full forward and with
HF transformers, preemption under memory pressure, seeded sampling, stop conditions, rejections."""

from __future__ import annotations

import random

import pytest
import torch

from tessera.serve.errors import EngineOverloaded, RequestRejected
from tessera.specs import GenerateRequest, RequestOutput, SamplingParams

from .conftest import VOCAB, engine, full_forward_greedy, random_model, run, tiny_config

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def prompts(n: int, seed: int = 0, lo: int = 1, hi: int = 30) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def test_greedy_equals_full_forward_greedy(model) -> None:
    ps = prompts(6)
    eng = engine(model, max_num_batched_tokens=24)  # chunked prefills mixed with decodes
    outs = run(eng, ps, GREEDY)
    for p, out in zip(ps, outs):
        assert list(out.outputs[0].token_ids) == full_forward_greedy(model, p, 12)
        assert out.outputs[0].finish_reason == "length"
    assert eng.bm.num_free_blocks == eng.num_blocks


def test_greedy_equals_transformers_generate(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    from tessera.model.hf import load_hf

    torch.manual_seed(3)
    hf_cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      initializer_range=0.5, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model = load_hf(tmp_path)
    ps = prompts(4, seed=1)
    outs = run(engine(model), ps, GREEDY)
    for p, out in zip(ps, outs):
        ids = torch.tensor([p])  # an explicit mask: generate would otherwise treat id 0 in a prompt as padding
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert list(out.outputs[0].token_ids) == want


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=7,
                                                            ignore_eos=True)])
def test_preemption_keeps_outputs_and_leaks_nothing(model, params) -> None:
    ps = prompts(8, seed=2, lo=6, hi=14)
    roomy = run(engine(model), ps, params)
    tight = engine(model, num_blocks=12, max_num_seqs=8)  # 8 requests of up to 26 tokens: 48 tokens of cache
    outs = run(tight, ps, params)
    assert tight.scheduler.num_preemptions > 0
    assert sum(o.metrics.num_preemptions for o in outs) == tight.scheduler.num_preemptions
    for a, b in zip(roomy, outs):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert tight.bm.num_free_blocks == tight.num_blocks
    tight.bm.check()


def test_seeded_sampling_is_reproducible_and_batch_independent(model) -> None:
    sp = SamplingParams(temperature=0.9, top_k=20, max_tokens=10, seed=123, ignore_eos=True)
    target = prompts(1, seed=5)[0]
    alone = run(engine(model), [target], sp)[0].outputs[0].token_ids
    others = prompts(5, seed=6)
    crowd = run(engine(model), [*others[:3], target, *others[3:]],
                [SamplingParams(temperature=1.0, max_tokens=7, seed=i) for i in range(3)] + [sp]
                + [SamplingParams(temperature=0.5, max_tokens=15) for _ in range(2)])
    assert crowd[3].outputs[0].token_ids == alone
    again = run(engine(model), [target], sp)[0].outputs[0].token_ids
    assert again == alone
    other_seed = run(engine(model), [target], sp.model_copy(update={"seed": 124}))[0].outputs[0].token_ids
    assert other_seed != alone


def test_prefix_cache_hit_gives_same_output(model) -> None:
    eng = engine(model)
    p = prompts(1, seed=9, lo=20, hi=20)[0]
    first = run(eng, [p], GREEDY)[0]
    second = run(eng, [p], GREEDY)[0]
    assert second.metrics.num_cached_tokens == 16 and first.metrics.num_cached_tokens == 0
    assert first.outputs[0].token_ids == second.outputs[0].token_ids
    assert eng.stats().prefix_cache_hits == 16


def test_n_completions_and_logprobs(model) -> None:
    out = run(engine(model), [[1, 2, 3]], SamplingParams(n=3, temperature=1.0, max_tokens=6, seed=1, logprobs=2,
                                                          ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({c.token_ids for c in out.outputs}) > 1
    c = out.outputs[0]
    with torch.no_grad():
        logp = model(torch.tensor([[1, 2, 3, *c.token_ids]]))[0].float().log_softmax(-1)
    for i, lp in enumerate(c.logprobs):
        assert lp.token_id == c.token_ids[i]
        assert lp.logprob == pytest.approx(logp[2 + i, lp.token_id].item(), abs=1e-4)
        assert len(lp.top) == 2 and max(lp.top.values()) == pytest.approx(logp[2 + i].max().item(), abs=1e-4)
    assert c.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in c.logprobs), abs=1e-4)


def test_stop_token_eos_and_min_tokens(model) -> None:
    p = prompts(1, seed=11)[0]
    free_run = full_forward_greedy(model, p, 12)
    stop_tok = free_run[4]
    out = run(engine(model), [p], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=(stop_tok,)))[0]
    c = out.outputs[0]
    assert c.token_ids[-1] == stop_tok and c.finish_reason == "stop" and c.stop_reason == stop_tok
    assert len(c.token_ids) == free_run.index(stop_tok) + 1
    # the model's eos (from its config) stops too, unless ignore_eos; min_tokens bans it early on
    eos_model = random_model(0, tiny_config(init_std=0.5, eos_token_id=free_run[0]))
    out = run(engine(eos_model), [p], SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    assert out.token_ids == (free_run[0],) and out.finish_reason == "stop"
    out = run(engine(eos_model), [p], SamplingParams(temperature=0, max_tokens=12, min_tokens=3))[0].outputs[0]
    assert free_run[0] not in out.token_ids[:3]


def test_stop_strings_and_streaming_text(model, tokenizer) -> None:
    text_model = random_model(4, tiny_config(vocab=tokenizer.vocab_size, init_std=0.5))
    eng = engine(text_model, tokenizer)
    base = run(eng, ["the quick brown"], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0].outputs[0]
    assert base.text == tokenizer.decode(list(base.token_ids))
    half = len(base.text) // 2
    stop = next(base.text[i:i + 2] for i in range(half, len(base.text) - 1) if "\ufffd" not in base.text[i:i + 2])
    out = run(eng, ["the quick brown"], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                                       stop=stop))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == base.text[: base.text.find(stop)]


def test_rejections_name_the_field(model) -> None:
    eng = engine(model, num_blocks=8, max_model_len=40, max_waiting=2)
    with pytest.raises(RequestRejected) as e:
        eng.add_request(GenerateRequest(request_id="a", prompt_token_ids=(1,) * 30,
                                        sampling=SamplingParams(max_tokens=20)))
    assert e.value.field == "max_tokens" and e.value.value == 20
    with pytest.raises(RequestRejected) as e:
        eng.add_request(GenerateRequest(request_id="b", prompt_token_ids=(1,) * 20,
                                        sampling=SamplingParams(max_tokens=19)))  # 39 tokens > 32 slots
    assert e.value.field == "max_tokens" and "KV cache capacity of 32" in str(e.value)
    with pytest.raises(RequestRejected) as e:
        eng.add_request(GenerateRequest(request_id="c", prompt_token_ids=(1,) * 40))
    assert e.value.field == "prompt"
    with pytest.raises(RequestRejected) as e:
        eng.add_request(GenerateRequest(request_id="d", prompt_token_ids=(VOCAB,)))
    assert e.value.field == "prompt_token_ids" and e.value.value == VOCAB
    with pytest.raises(RequestRejected) as e:
        eng.add_request(GenerateRequest(request_id="e", prompt="hi"))
    assert e.value.field == "prompt"
    for rid in "xy":
        eng.add_request(GenerateRequest(request_id=rid, prompt_token_ids=(1,)))
    with pytest.raises(EngineOverloaded):
        eng.add_request(GenerateRequest(request_id="z", prompt_token_ids=(1,)))


def test_abort_frees_blocks(model) -> None:
    eng = engine(model)
    eng.add_request(GenerateRequest(request_id="a", prompt_token_ids=tuple(range(20)),
                                    sampling=SamplingParams(max_tokens=50, ignore_eos=True)))
    eng.step()
    eng.step()
    assert eng.bm.num_free_blocks < eng.num_blocks
    out = eng.abort("a")
    assert out.finished and out.outputs[0].finish_reason == "abort" and len(out.outputs[0].token_ids) == 2
    assert eng.bm.num_free_blocks == eng.num_blocks and not eng.has_unfinished()


def test_final_only_requests_report_once_with_the_same_output(model) -> None:
    eng = engine(model)
    sp = SamplingParams(temperature=0.8, seed=3, max_tokens=9, logprobs=2, ignore_eos=True)
    for rid, final_only in (("every", False), ("last", True)):
        eng.add_request(GenerateRequest(request_id=rid, prompt_token_ids=(5, 6, 7), sampling=sp), final_only=final_only)
    seen: dict[str, list[RequestOutput]] = {"every": [], "last": []}
    while eng.has_unfinished():
        for out in eng.step():
            seen[out.request_id].append(out)
    assert len(seen["every"]) == 9 and not any(o.finished for o in seen["every"][:-1])
    assert len(seen["last"]) == 1 and seen["last"][0].finished
    every, last = seen["every"][-1].outputs[0], seen["last"][0].outputs[0]
    assert every.token_ids == last.token_ids and every.logprobs == last.logprobs and len(last.token_ids) == 9
    assert not eng.requests and eng.bm.num_free_blocks == eng.bm.num_blocks


def _completions(outs: list[RequestOutput]) -> list[tuple]:
    return [(c.token_ids, c.finish_reason, c.stop_reason, c.text, c.logprobs) for o in outs for c in o.outputs]


def test_overlapped_decode_gives_the_outputs_of_step_by_step_decode(model) -> None:
    """Launching each decode step before the previous one's tokens are read changes no output: greedy,
    seeded sampling, n > 1 with logprobs, stop tokens, min_tokens, short max_tokens; with penalties in the
    batch, steps are not overlapped. Every block comes back either way."""
    ps = prompts(6, seed=21, lo=3, hi=12)
    stop_tok = full_forward_greedy(model, ps[2], 12)[5]
    params = [GREEDY, SamplingParams(temperature=0.9, top_p=0.8, max_tokens=11, seed=5, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=12, stop_token_ids=(stop_tok,)),
              SamplingParams(n=2, temperature=1.0, top_k=10, max_tokens=9, seed=2, logprobs=3, ignore_eos=True),
              SamplingParams(temperature=0.7, max_tokens=2, seed=8, min_tokens=2),
              SamplingParams(temperature=0.5, max_tokens=14, seed=9, min_p=0.05, ignore_eos=True)]
    results = {}
    for overlap in (False, True):
        eng = engine(model)
        eng.overlap = overlap
        results[overlap] = _completions(run(eng, ps, params))
        assert (eng.overlapped_steps > 0) == overlap
        assert eng.bm.num_free_blocks == eng.num_blocks
        eng.bm.check()
    assert results[True] == results[False]
    penalised = engine(model)
    run(penalised, ps[:2], SamplingParams(temperature=0.8, seed=1, max_tokens=8, repetition_penalty=1.3))
    assert penalised.overlapped_steps == 0


def test_overlapped_decode_with_arrivals_aborts_and_preemption(model) -> None:
    """Requests arriving and aborted between steps, under a cache tight enough to preempt: the same
    outputs with and without overlap, and no block leaks."""
    ps = prompts(8, seed=23, lo=6, hi=14)
    sp = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=10, seed=4, ignore_eos=True)
    results = {}
    for overlap in (False, True):
        eng = engine(model, num_blocks=12, max_num_seqs=8)
        eng.overlap = overlap
        done: dict[str, RequestOutput] = {}
        pending = list(enumerate(ps))
        for step in range(10_000):
            for i, p in pending[:2] if step % 4 == 0 else ():  # two arrivals every fourth step
                pending.pop(0)
                eng.add_request(GenerateRequest(request_id=f"r{i}", prompt_token_ids=tuple(p), sampling=sp))
            if step == 7:
                done["r1"] = eng.abort("r1")
            if not eng.has_unfinished() and not pending:
                break
            for out in eng.step():
                if out.finished:
                    done[out.request_id] = out
        results[overlap] = {rid: _completions([o]) for rid, o in done.items()}
        assert eng.bm.num_free_blocks == eng.num_blocks
        eng.bm.check()
        if overlap:
            assert eng.overlapped_steps > 0 and eng.scheduler.num_preemptions > 0
    assert results[True] == results[False] and len(results[True]) == len(ps)


def test_a_step_left_in_flight_by_a_stop_is_dropped(model) -> None:
    """A request that stops on a token leaves the step after it already launched; that step's token is
    discarded, its blocks are free, and the next request is served as if it had never run."""
    p = prompts(1, seed=11)[0]
    stop_tok = full_forward_greedy(model, p, 12)[4]
    eng = engine(model)
    out = run(eng, [p], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=(stop_tok,)))[0].outputs[0]
    assert out.token_ids[-1] == stop_tok and out.finish_reason == "stop"
    assert eng._inflight is not None and eng.bm.num_free_blocks == eng.num_blocks
    q = prompts(1, seed=12)[0]
    assert list(run(eng, [q], GREEDY)[0].outputs[0].token_ids) == full_forward_greedy(model, q, 12)
    assert eng.bm.num_free_blocks == eng.num_blocks
    eng.bm.check()
