"""`tessera serve` / `python -m tessera.gateway` as a user runs it: a subprocess on a loopback port,
API key from the environment, and a SIGTERM that lets an in-flight stream finish before exiting."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tessera.gateway.cli import build_parser, main_serve


def test_help_lists_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main_serve(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--draft", "--quant", "--host", "--port", "--api-key", "--max-queue", "TESSERA_API_KEY"):
        assert flag in text
    assert build_parser().parse_args(["--model", "m"]).host == "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_subprocess_auth_and_graceful_shutdown(tiny_checkpoint: Path, until: Any) -> None:
    port = free_port()
    env = os.environ | {"TESSERA_API_KEY": "env-key"}
    cmd = [sys.executable, "-m", "tessera.gateway", "--model", str(tiny_checkpoint), "--port", str(port),
           "--device", "cpu", "--max-model-len", "256", "--num-blocks", "256", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                return httpx.get(url + "/health").status_code == 200
            except httpx.TransportError:
                return False

        until(up, timeout=90, what="server up")
        assert httpx.get(url + "/v1/models").status_code == 401
        auth = {"Authorization": "Bearer env-key"}
        assert httpx.get(url + "/v1/models", headers=auth).status_code == 200
        body = {"prompt": "hello", "max_tokens": 240, "n": 4, "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.Client(base_url=url, headers=auth, timeout=60) as c, c.stream("POST", "/v1/completions",
                                                                                   json=body) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            proc.send_signal(signal.SIGTERM)

            def refusing() -> bool:
                try:
                    httpx.get(url + "/health", timeout=1)
                except httpx.TransportError:
                    return True
                return False

            until(refusing, timeout=20, what="listening socket closed")
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]", rest[-3:]
        assert '"completion_tokens":960' in rest[-2]  # the in-flight stream ran to its end
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_tensor_parallel_flag_reaches_the_engine_config() -> None:
    from tessera.gateway.cli import build_parser, engine_config

    args = build_parser().parse_args(["--model", "m", "--tensor-parallel", "4"])
    assert engine_config(args).tensor_parallel_size == 4


def test_engine_config_file_with_flags_overriding(tmp_path) -> None:
    from tessera.gateway.cli import build_parser, engine_config
    from tessera.specs import EngineConfig

    path = tmp_path / "engine.yaml"
    EngineConfig(max_num_seqs=7, block_size=32, enable_prefix_caching=False, seed=5).dump(path)
    cfg = engine_config(build_parser().parse_args(["--model", "m", "--config", str(path), "--seed", "9"]))
    assert (cfg.max_num_seqs, cfg.block_size, cfg.enable_prefix_caching, cfg.seed) == (7, 32, False, 9)
    assert cfg.model == "m"
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_num_seqs: 0\n")
    with pytest.raises(ValueError, match="max_num_seqs"):
        engine_config(build_parser().parse_args(["--model", "m", "--config", str(bad)]))


def test_speculative_flags_reach_the_engine_config(tmp_path) -> None:
    from tessera.gateway.cli import build_parser, engine_config
    from tessera.specs import EngineConfig, SpeculativeConfig

    def cfg(*flags: str) -> EngineConfig:
        return engine_config(build_parser().parse_args(["--model", "m", *flags]))

    assert cfg().speculative is None
    spec = cfg("--draft", "d", "--num-speculative-tokens", "6").speculative
    assert (spec.method, spec.draft_model, spec.num_speculative_tokens) == ("draft", "d", 6)
    assert cfg("--draft", "d").speculative.num_speculative_tokens == 4
    spec = cfg("--ngram").speculative
    assert (spec.method, spec.draft_model) == ("ngram", None)
    # a config file's speculative section keeps its k unless the flag is given
    path = tmp_path / "engine.yaml"
    EngineConfig(speculative=SpeculativeConfig(method="ngram", num_speculative_tokens=3)).dump(path)
    assert cfg("--config", str(path)).speculative.num_speculative_tokens == 3
    assert cfg("--config", str(path), "--draft", "d").speculative.num_speculative_tokens == 3
    assert cfg("--config", str(path), "--num-speculative-tokens", "5").speculative.num_speculative_tokens == 5
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        cfg("--draft", "d", "--num-speculative-tokens", "0")
    with pytest.raises(SystemExit):  # argparse: not allowed together
        cfg("--draft", "d", "--ngram")
    with pytest.raises(ValueError, match="needs --draft"):
        cfg("--num-speculative-tokens", "5")


def test_serve_refuses_bad_speculative_flags_before_loading(capsys) -> None:
    from tessera.gateway.cli import main_serve

    with pytest.raises(SystemExit) as exc:
        main_serve(["--model", "/nonexistent", "--draft", "d", "--num-speculative-tokens", "99"])
    assert exc.value.code == 2
    assert "num_speculative_tokens" in capsys.readouterr().err
