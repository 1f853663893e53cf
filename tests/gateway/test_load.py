"""Load on loopback: 200 concurrent clients with a mixed workload, 10% hanging up mid-stream.

Zero 5xx, every client that stays gets a complete answer, and afterwards the engine is idle again:
no running or waiting requests, no KV blocks in use, nothing left in the admission queue.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx

from tessera.gateway import create_app
from tessera.gateway.loadgen import mix, run_load


def gauges(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(tessera:[a-z_]+)\{[^}]*\} (\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def test_200_clients_with_disconnects(acceptance_engine: Any, live: Any, until: Any) -> None:
    engine = acceptance_engine
    app = create_app(engine, api_key="k", max_queue=1024)
    plans = mix(200, seed=0, disconnect_frac=0.1, max_tokens=(4, 24))
    with live(app) as server:
        report = asyncio.run(run_load(server.url, plans, api_key="k", timeout_s=100))
        summary = report.summary()
        print("\nload:", {k: summary[k] for k in ("clients", "completed_ok", "status_counts", "wall_s", "req_per_s",
                                                  "tokens_per_s", "latency_s", "ttft_s")})
        assert summary["disconnecting"] == 20
        assert all(o.status < 500 for o in report.outcomes), summary["status_counts"]
        for o in report.completed:
            assert o.status == 200 and o.error is None, (o.plan, o.status, o.error)
            assert o.completion_tokens == o.plan.max_tokens, (o.plan, o.completion_tokens)
            assert o.finish_reasons == ["length"]
        with httpx.Client(base_url=server.url, headers={"Authorization": "Bearer k"}) as c:
            def idle() -> bool:
                g = gauges(c.get("/metrics").text)
                return (g["tessera:num_requests_running"], g["tessera:num_requests_waiting"],
                        g["tessera:kv_cache_usage_perc"], g["tessera:gateway_queue_sequences"],
                        g["tessera:gateway_queue_tokens"]) == (0, 0, 0, 0, 0)

            until(idle, timeout=20, what="gauges back to zero")
            g = gauges(c.get("/metrics").text)
            assert g["tessera:request_success_total"] >= 180
