"""What the HTTP gateway costs, and how it holds up under load.

1. Added latency: the same request (fresh random prompt, greedy, EOS ignored) made straight to the
   `AsyncEngine` and through the gateway over loopback HTTP, alternately, so both see the same machine
   state. Reported for the whole request (non-streaming) and for the first token (streaming), p50 and
   p99 of each path, their difference, and the percentiles of the per-pair difference.
2. Load: N concurrent clients (default 200) with mixed completions/chat, streaming/not, 10% hanging up
   mid-stream: status counts, req/s, tokens/s, latency and TTFT percentiles, and whether the engine's
   running/waiting/KV gauges return to zero afterwards.

Runs on CPU with a tiny random model (the gateway's cost does not depend on the model), or on a GPU
with --model PATH --device cuda:

    python3 benchmarks/bench_gateway.py --tiny                 # seconds, CPU
    python3 benchmarks/bench_gateway.py                        # the committed CPU figure
    python3 benchmarks/bench_gateway.py --model DIR --device cuda --out $OUT
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table, write_result

from tessera.gateway import create_app
from tessera.gateway.loadgen import Connection, mix, percentiles, run_load, sse_events
from tessera.specs import EngineConfig, GenerateRequest, SamplingParams


def tiny_model(directory: Path) -> Path:
    """A random 2-layer model with a byte-level BPE trained on this file's own text."""
    import torch

    from tessera.model import Transformer
    from tessera.model.checkpoint import save_pretrained
    from tessera.model.tokenizer import Tokenizer
    from tessera.specs import ModelConfig

    tok = Tokenizer.train([Path(__file__).read_text() * 4], vocab_size=512, show_progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                      max_seq_len=512, eos_token_id=tok.eos_token_id)
    return save_pretrained(Transformer(cfg), directory / "tiny", tokenizer=tok)


class Server:
    """uvicorn on 127.0.0.1 and a free port, in a thread."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        # IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted sockets only then (else ~40 ms delayed-ACK stalls).
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", loop="asyncio"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def prompt(rng: random.Random, vocab: int, length: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(length)]


async def direct(engine: Any, ids: list[int], max_tokens: int, tag: str) -> tuple[float, float]:
    """(seconds to first output, seconds to the finished output) straight from the engine."""
    req = GenerateRequest(request_id=tag, prompt_token_ids=tuple(ids),
                          sampling=SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    t0 = time.perf_counter()
    first = None
    async for _ in engine.generate(req):
        first = first if first is not None else time.perf_counter() - t0
    return first or 0.0, time.perf_counter() - t0


async def over_http(conn: Connection, ids: list[int], max_tokens: int, stream: bool) -> tuple[float, float]:
    """(seconds to first token event, seconds to the whole answer) through the gateway."""
    body = {"prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream}
    t0 = time.perf_counter()
    if not stream:
        status, data = await conn.request("POST", "/v1/completions", body)
        assert status == 200, data
        t = time.perf_counter() - t0
        return t, t
    status, chunks = await conn.stream("POST", "/v1/completions", body)
    assert status == 200
    first = None
    async for _ in sse_events(chunks):
        first = first if first is not None else time.perf_counter() - t0
    return first or 0.0, time.perf_counter() - t0


async def added_latency(engine: Any, url: str, *, pairs: int, max_tokens: int, prompt_len: int,
                        vocab: int) -> dict[str, Any]:
    rng = random.Random(0)
    conn = Connection(url)
    rows: dict[str, list[tuple[float, float]]] = {"direct": [], "http": [], "direct_s": [], "http_s": []}
    for i in range(-5, pairs):  # five warm-up pairs, not recorded
        for stream in (False, True):
            a, b = prompt(rng, vocab, prompt_len), prompt(rng, vocab, prompt_len)  # fresh: no prefix-cache hits
            order = (0, 1) if i % 2 == 0 else (1, 0)  # alternate which path goes first
            res: dict[int, tuple[float, float]] = {}
            for which in order:
                if which == 0:
                    res[0] = await direct(engine, a, max_tokens, f"bench-{i}-{stream}")
                else:
                    res[1] = await over_http(conn, b, max_tokens, stream)
            if i >= 0:
                suffix = "_s" if stream else ""
                rows["direct" + suffix].append(res[0])
                rows["http" + suffix].append(res[1])
    await conn.close()

    def figures(d: list[tuple[float, float]], h: list[tuple[float, float]], k: int) -> dict[str, float]:
        dv, hv = [x[k] for x in d], [x[k] for x in h]
        pd, ph = percentiles(dv, (50, 99)), percentiles(hv, (50, 99))
        diff = percentiles([y - x for x, y in zip(dv, hv)], (50, 99))
        return {"direct_p50_ms": pd["p50"] * 1e3, "direct_p99_ms": pd["p99"] * 1e3, "http_p50_ms": ph["p50"] * 1e3,
                "http_p99_ms": ph["p99"] * 1e3, "added_p50_ms": (ph["p50"] - pd["p50"]) * 1e3,
                "added_p99_ms": (ph["p99"] - pd["p99"]) * 1e3, "paired_diff_p50_ms": diff["p50"] * 1e3,
                "paired_diff_p99_ms": diff["p99"] * 1e3}

    return {"whole request (non-streaming)": figures(rows["direct"], rows["http"], 1),
            "first token (streaming)": figures(rows["direct_s"], rows["http_s"], 0)}


def gauges(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(tessera:[a-z_]+)\{[^}]*\} (\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


async def load(url: str, clients: int, max_tokens: tuple[int, int]) -> dict[str, Any]:
    report = await run_load(url, mix(clients, seed=0, disconnect_frac=0.1, max_tokens=max_tokens), timeout_s=300)
    summary = report.summary()
    conn = Connection(url)
    deadline = time.monotonic() + 30
    while True:
        _, text = await conn.request("GET", "/metrics")
        g = gauges(text)
        idle = all(g[k] == 0 for k in ("tessera:num_requests_running", "tessera:num_requests_waiting",
                                       "tessera:kv_cache_usage_perc", "tessera:gateway_queue_sequences"))
        if idle or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    await conn.close()
    summary["returned_to_idle"] = idle
    summary["server_errors_5xx"] = sum(o.status >= 500 for o in report.outcomes)
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model dir (default: a tiny random model built here)")
    ap.add_argument("--device", default="cpu", help="engine device (cpu, cuda, auto)")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    ap.add_argument("--pairs", type=int, default=200, help="direct/HTTP request pairs per mode")
    ap.add_argument("--max-tokens", type=int, default=8, help="tokens per request in the latency pairs")
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt tokens in the latency pairs")
    ap.add_argument("--clients", type=int, default=200, help="concurrent clients in the load run")
    ap.add_argument("--tiny", action="store_true", help="a few seconds on CPU (fewer pairs and clients)")
    ap.add_argument("--out", type=Path, default=None, help="results dir (default benchmarks/results)")
    args = ap.parse_args(argv)
    if args.tiny:
        args.pairs, args.clients = 20, 40
    from tessera.serve import AsyncEngine

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.model) if args.model else tiny_model(Path(tmp))
        config = EngineConfig(device=args.device, dtype=args.dtype, max_model_len=512, max_num_seqs=256)
        engine = AsyncEngine.from_path(path, config=config)
        app = create_app(engine, max_queue=4 * args.clients)
        vocab = engine.tokenizer.vocab_size if engine.tokenizer is not None else 256
        with Server(app) as server:
            latency = asyncio.run(added_latency(engine, server.url, pairs=args.pairs, max_tokens=args.max_tokens,
                                                prompt_len=args.prompt_len, vocab=vocab))
            under_load = asyncio.run(load(server.url, args.clients, (4, 24)))
        asyncio.run(engine.shutdown(drain=False, timeout=10))

    print_table([{"measure": k, **{n: round(v, 3) for n, v in d.items()}} for k, d in latency.items()],
                title=f"Gateway added latency ({args.pairs} pairs, {args.max_tokens} tokens, {args.prompt_len}-token "
                      "prompts; ms)")
    lat, ttft = under_load["latency_s"], under_load["ttft_s"]
    print_table([{"clients": under_load["clients"], "hung_up": under_load["disconnecting"],
                  "ok": under_load["completed_ok"], "5xx": under_load["server_errors_5xx"],
                  "req/s": under_load["req_per_s"], "tok/s": under_load["tokens_per_s"],
                  "lat_p50_s": lat.get("p50"), "lat_p99_s": lat.get("p99"), "ttft_p50_s": ttft.get("p50"),
                  "ttft_p99_s": ttft.get("p99"), "idle_after": under_load["returned_to_idle"]}],
                title="Load on loopback (mixed completions/chat, streaming/not, 10% hang up mid-stream)")
    payload = {"config": {"model": args.model or "tiny random (2 layers, d_model 64)", "device": args.device,
                          "pairs": args.pairs, "max_tokens": args.max_tokens, "prompt_len": args.prompt_len,
                          "clients": args.clients, "tiny": args.tiny},
               "added_latency_ms": latency, "load": under_load}
    print(f"\nwrote {write_result('gateway', payload, args.out)}")
    ok = under_load["server_errors_5xx"] == 0 and under_load["returned_to_idle"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
