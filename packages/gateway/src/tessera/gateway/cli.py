"""`tessera serve` / `python -m tessera.gateway`: load a model into an AsyncEngine and serve it over HTTP.

SIGINT/SIGTERM shut down gracefully: the listening socket closes, in-flight requests (streams included)
run to completion for up to --drain-timeout seconds, then the engine drains and stops.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from tessera.specs import EngineConfig, SpeculativeConfig

QUANT_METHODS = ("int8", "int4_rtn", "awq", "fp8")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="tessera serve",
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                    "/v1/models, /health, /metrics).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", required=True, help="tessera checkpoint dir or HF model dir")
    spec = ap.add_argument_group("speculative decoding")
    how = spec.add_mutually_exclusive_group()
    how.add_argument("--draft", default=None, help="draft model dir (same vocabulary; a shallow distilled student)")
    how.add_argument("--ngram", action="store_true", help="n-gram prompt-lookup drafting, no draft model")
    spec.add_argument("--num-speculative-tokens", type=int, default=None, metavar="K",
                      help="draft tokens a round; when unset, the --config file's value, else 4")
    ap.add_argument("--quant", default=None, choices=QUANT_METHODS, help="quantize the model on load")
    ap.add_argument("--served-model-name", default=None, help="name reported by /v1/models (default: engine's)")
    net = ap.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="address to bind")
    net.add_argument("--port", type=int, default=8000, help="port to bind")
    net.add_argument("--api-key", default=os.environ.get("TESSERA_API_KEY"),
                     help="require 'Authorization: Bearer KEY' on every route but /health (env TESSERA_API_KEY)")
    adm = ap.add_argument_group("admission")
    adm.add_argument("--max-queue", type=int, default=512, help="most sequences admitted at once (beyond: 429)")
    adm.add_argument("--max-queue-tokens", type=int, default=2**21,
                     help="most prompt+max_tokens tokens admitted at once (beyond: 429)")
    adm.add_argument("--max-body-bytes", type=int, default=4 * 2**20, help="largest request body (beyond: 413)")
    adm.add_argument("--request-timeout", type=float, default=600.0, help="per-request timeout in s (0: none)")
    adm.add_argument("--retry-after", type=int, default=1, help="Retry-After seconds sent with a 429")
    adm.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to finish in-flight requests")
    eng = ap.add_argument_group("engine")
    eng.add_argument("--config", type=Path, default=None,
                     help="EngineConfig as YAML or JSON; the flags below override only the fields they are given for")
    eng.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    eng.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    eng.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    eng.add_argument("--max-num-seqs", type=int, default=256, help="most sequences per engine step")
    eng.add_argument("--max-num-batched-tokens", type=int, default=8192, help="most tokens per engine step")
    eng.add_argument("--max-waiting", type=int, default=4096, help="engine waiting-queue bound")
    eng.add_argument("--num-blocks", type=int, default=None, help="KV-cache blocks (default: sized from memory)")
    eng.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    eng.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    eng.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    eng.add_argument("--seed", type=int, default=0, help="engine seed")
    eng.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                     help="split every layer across N ranks (N GPUs, or N CPU processes over gloo)")
    ap.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return ap


# EngineConfig field -> (flag dest, how the flag's value maps onto the field)
_FLAG_FIELDS = {
    "device": "device", "dtype": "dtype", "max_model_len": "max_model_len", "max_num_seqs": "max_num_seqs",
    "max_num_batched_tokens": "max_num_batched_tokens", "max_waiting": "max_waiting", "num_blocks": "num_blocks",
    "block_size": "block_size", "enable_prefix_caching": "no_prefix_caching", "enforce_eager": "enforce_eager",
    "seed": "seed", "tensor_parallel_size": "tensor_parallel",
}


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """`--config` (if any), then every engine flag the user changed from its default."""
    defaults = build_parser().parse_args(["--model", args.model])
    fields = EngineConfig.load(args.config).model_dump() if args.config else {}
    for field, dest in _FLAG_FIELDS.items():
        value = getattr(args, dest)
        if value != getattr(defaults, dest) or not args.config:
            fields[field] = (not value) if dest == "no_prefix_caching" else value
    fields["model"] = args.model
    spec = SpeculativeConfig.from_flags(fields.get("speculative"), draft=args.draft, ngram=args.ngram,
                                        num_speculative_tokens=args.num_speculative_tokens)
    fields["speculative"] = spec.model_dump() if spec else None
    return EngineConfig.model_validate(fields)


async def serve(engine: Any, args: argparse.Namespace) -> None:
    """Run the app over `engine` until SIGINT/SIGTERM, then drain and shut the engine down."""
    import uvicorn

    from tessera.gateway import create_app

    app = create_app(engine, api_key=args.api_key or None, max_queue=args.max_queue,
                     max_queue_tokens=args.max_queue_tokens, max_body_bytes=args.max_body_bytes,
                     request_timeout_s=args.request_timeout or None, retry_after_s=args.retry_after,
                     served_model_name=args.served_model_name)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, lifespan="off",
                            timeout_graceful_shutdown=int(max(1, args.drain_timeout)))
    # uvicorn stops gracefully on SIGINT/SIGTERM, then re-raises the signal to the handler that was in place
    # before it started; with the default one the process would die there, before the engine drains.
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, _noted) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        await uvicorn.Server(config).serve()
    finally:
        await engine.shutdown(drain=True, timeout=args.drain_timeout)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _noted(sig: int, frame: Any) -> None:
    logging.getLogger("tessera.gateway").info("signal %s: shutting down", signal.Signals(sig).name)


async def _main(args: argparse.Namespace, config: EngineConfig) -> None:
    from tessera.serve import AsyncEngine

    engine = AsyncEngine.from_path(args.model, draft=args.draft, quant=args.quant, config=config)
    await serve(engine, args)


def main_serve(argv: list[str] | None = None) -> int:
    """Entry point of `tessera serve`; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = engine_config(args)
    except ValueError as exc:  # pydantic's ValidationError included: names the field and the value
        parser.error(str(exc))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_main(args, config))
    return 0
