"""Serving measurements shared by `tessera bench` and `benchmarks/bench_serve.py`: offline throughput
over a fixed set of requests, and online latency under Poisson arrivals (TTFT, TPOT, inter-token)."""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass

from tqdm.auto import tqdm

from tessera.serve.engine import LLMEngine
from tessera.specs import GenerateRequest, SamplingParams


@dataclass
class BenchRequest:
    prompt_token_ids: list[int]
    max_tokens: int


def random_requests(n: int, input_len: tuple[int, int], output_len: tuple[int, int], vocab_size: int,
                    seed: int = 0) -> list[BenchRequest]:
    """`n` requests of random token ids, lengths uniform in the inclusive ranges."""
    rng = random.Random(seed)
    return [BenchRequest([rng.randrange(vocab_size) for _ in range(rng.randint(*input_len))],
                         rng.randint(*output_len)) for _ in range(n)]


def _request(i: int, r: BenchRequest, temperature: float) -> GenerateRequest:
    return GenerateRequest(request_id=f"bench-{i}", prompt_token_ids=tuple(r.prompt_token_ids),
                           sampling=SamplingParams(max_tokens=r.max_tokens, ignore_eos=True, temperature=temperature,
                                                   seed=i))


def offline_throughput(engine: LLMEngine, requests: list[BenchRequest], temperature: float = 0.0,
                       progress: bool = True) -> dict[str, float]:
    """Submit everything at once and run to completion; tokens per second over the wall time.
    Starts from an empty prefix cache, so earlier runs over the same prompts do not help."""
    engine.bm.reset_prefix_cache()
    start = time.perf_counter()
    pending = list(enumerate(requests))
    out_tokens = 0
    bar = tqdm(total=len(requests), desc="offline", disable=not progress)
    while pending or engine.has_unfinished():
        while pending and len(engine.scheduler.waiting) < engine.config.max_waiting:
            i, r = pending.pop(0)
            engine.add_request(_request(i, r, temperature), final_only=True)
        for out in engine.step():
            if out.finished:
                out_tokens += len(out.outputs[0].token_ids)
                bar.update(1)
    bar.close()
    seconds = time.perf_counter() - start
    prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
    return {"requests": len(requests), "prompt_tokens": prompt_tokens, "output_tokens": out_tokens,
            "seconds": seconds, "output_tok_s": out_tokens / seconds,
            "total_tok_s": (prompt_tokens + out_tokens) / seconds, "preemptions": engine.scheduler.num_preemptions}


def _pct(values: list[float], q: int) -> float:
    """The q-th percentile (1 <= q <= 99); NaN for no values."""
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def online_latency(engine: LLMEngine, requests: list[BenchRequest], rate: float, seed: int = 0,
                   temperature: float = 0.0) -> dict[str, float]:
    """Requests arrive as a Poisson process of `rate` per second. Times in milliseconds: TTFT (arrival
    to first token), TPOT (mean time per output token after the first, per request) and ITL (every gap
    between successive token deliveries), each p50 and p99. Starts from an empty prefix cache."""
    engine.bm.reset_prefix_cache()
    rng = random.Random(seed)
    t, arrivals = 0.0, []
    for _ in requests:
        t += rng.expovariate(rate)
        arrivals.append(t)
    start = time.perf_counter()
    arrival_at: dict[str, float] = {}
    seen: dict[str, int] = {}
    last: dict[str, float] = {}
    ttft, tpot, itl = [], [], []
    first: dict[str, float] = {}
    nxt = 0
    while nxt < len(requests) or engine.has_unfinished():
        now = time.perf_counter() - start
        while nxt < len(requests) and arrivals[nxt] <= now:
            req = _request(nxt, requests[nxt], temperature)
            engine.add_request(req)
            arrival_at[req.request_id] = start + arrivals[nxt]
            nxt += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, arrivals[nxt] - (time.perf_counter() - start)))
            continue
        outs = engine.step()
        stamp = time.perf_counter()
        for out in outs:
            rid, n = out.request_id, len(out.outputs[0].token_ids)
            if n > seen.get(rid, 0):
                if rid not in first:
                    first[rid] = stamp
                    ttft.append((stamp - arrival_at[rid]) * 1e3)
                else:
                    itl.append((stamp - last[rid]) * 1e3)
                last[rid], seen[rid] = stamp, n
            if out.finished and n > 1:
                tpot.append((stamp - first[rid]) * 1e3 / (n - 1))
    seconds = time.perf_counter() - start
    result = {"rate_req_s": rate, "requests": len(requests), "seconds": seconds,
              "output_tok_s": sum(seen.values()) / seconds}
    for name, values in (("ttft_ms", ttft), ("tpot_ms", tpot), ("itl_ms", itl)):
        result[f"{name}_p50"] = _pct(values, 50)
        result[f"{name}_p99"] = _pct(values, 99)
    return result
