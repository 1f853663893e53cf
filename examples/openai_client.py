"""Call a running `tessera serve` with the official `openai` client: list models, complete, stream a chat.

    tessera serve --model runs/demo/teacher/final --draft runs/demo/student/final --port 8000 &
    python examples/openai_client.py --base-url http://127.0.0.1:8000/v1

    python examples/openai_client.py --spawn [--model DIR] [--tiny]   # start a server on loopback first

With `--spawn`, the script starts `tessera serve` itself on a free loopback port, guarded by an API key,
waits for `/health`, talks to it, then stops it with SIGINT (the server drains and exits 0). Without
`--model`, it serves a tiny random-weight checkpoint built on the spot (its text is gibberish; the point is
the protocol).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import openai


def tiny_checkpoint(directory: Path) -> Path:
    """A random-weight tessera checkpoint with a tokenizer trained on the standard library's docstrings."""
    from tessera.distill.corpus import builtin_corpus
    from tessera.model import Transformer
    from tessera.model.checkpoint import save_pretrained
    from tessera.model.tokenizer import Tokenizer
    from tessera.specs import ModelConfig

    tokenizer = Tokenizer.train(builtin_corpus(100_000), 512)
    config = ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=256,
                         tie_embeddings=True)
    return save_pretrained(Transformer(config), directory, tokenizer=tokenizer)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(model: Path, api_key: str, timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """Start `tessera serve` on loopback; return the process and its /v1 base URL once /health answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "tessera.cli", "serve", "--model", str(model), "--host", "127.0.0.1",
           "--port", str(port), "--api-key", api_key, "--max-num-seqs", "8", "--log-level", "warning"]
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tessera serve exited with {proc.returncode} before answering /health")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, f"http://127.0.0.1:{port}/v1"
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"tessera serve did not answer /health within {timeout:.0f} s")


def talk(client: openai.OpenAI, max_tokens: int) -> None:
    model = client.models.list().data[0].id
    print(f"models: {model}")
    completion = client.completions.create(model=model, prompt="Return the number of", max_tokens=max_tokens,
                                           temperature=0)
    print(f"completion ({completion.usage.completion_tokens} tokens, {completion.choices[0].finish_reason}): "
          f"{completion.choices[0].text!r}")
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is a list?"}],
                                            max_tokens=max_tokens, temperature=0, stream=True)
    pieces, events = [], 0
    for chunk in stream:
        events += 1
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    print(f"streamed chat ({events} events): {''.join(pieces)!r}")
    try:
        client.completions.create(model=model, prompt="x", max_tokens=10**7)
    except openai.BadRequestError as err:
        print(f"an impossible request is refused with 400: {err.body.get('message') if err.body else err}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = ap.add_mutually_exclusive_group(required=True)
    target.add_argument("--base-url", help="the server's OpenAI base URL, e.g. http://127.0.0.1:8000/v1")
    target.add_argument("--spawn", action="store_true", help="start `tessera serve` on loopback first")
    ap.add_argument("--api-key", default=os.environ.get("TESSERA_API_KEY", "unused"),
                    help="bearer key (env TESSERA_API_KEY; --spawn makes one up)")
    ap.add_argument("--model", type=Path, help="with --spawn: the model directory to serve (default: a tiny one)")
    ap.add_argument("--tiny", action="store_true", help="few tokens per request")
    args = ap.parse_args(argv)
    max_tokens = 8 if args.tiny else 32

    if args.base_url:
        talk(openai.OpenAI(base_url=args.base_url, api_key=args.api_key), max_tokens)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or tiny_checkpoint(Path(tmp) / "tiny")
        api_key = "example-key"
        proc, base_url = spawn(model, api_key)
        print(f"spawned tessera serve (pid {proc.pid}) at {base_url}")
        try:
            try:
                openai.OpenAI(base_url=base_url, api_key="wrong-key", max_retries=0).models.list()
            except openai.AuthenticationError:
                print("a wrong API key is refused with 401")
            talk(openai.OpenAI(base_url=base_url, api_key=api_key), max_tokens)
        finally:
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=60)
        print(f"server stopped with exit code {code}")
        return code


if __name__ == "__main__":
    raise SystemExit(main())
