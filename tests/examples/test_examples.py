"""Every script in examples/ runs at its tiny size, as a user would run it, and shows what it claims."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


# One torch thread per example: the suite runs on as many workers as cores, and oversubscribed cores make
# torch's threads wait on each other at every op.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(script: str, *args: str, cwd: Path, timeout: float = 150) -> str:
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=ENV)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_every_example_is_tested() -> None:
    tested = {"custom_kernel.py", "serve_hf_checkpoint.py", "distill_your_text.py", "quantize_awq.py",
              "openai_client.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_custom_kernel(tmp_path: Path) -> None:
    out = run("custom_kernel.py", "--tiny", cwd=tmp_path)
    assert "float32 input -> picked 'example_fused'" in out
    assert "float64 input -> picked 'reference'" in out
    assert "KernelUnavailableError" in out
    assert re.search(r"parity with the reference .*: [1-9]\d* samples ok", out)
    assert re.search(r"model forward: \d+ rms_norm calls went to 'example_fused'", out)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_serve_hf_checkpoint_matches_transformers(family: str, tmp_path: Path) -> None:
    out = run("serve_hf_checkpoint.py", "--tiny", "--family", family, cwd=tmp_path)
    assert f"built a random-weight {family} checkpoint" in out
    assert "greedy token ids equal to transformers.generate: 3/3 prompts" in out


def test_distill_your_text(tmp_path: Path) -> None:
    text = tmp_path / "mine.txt"
    text.write_text("".join(f"Line {i}: the cat sat on the mat number {i % 7}.\n" for i in range(3000)))
    out = run("distill_your_text.py", str(text), "--tiny", "--out", str(tmp_path / "run"), cwd=tmp_path)
    ppl = {m[0]: float(m[1]) for m in re.findall(r"^(teacher|student): .*held-out perplexity ([\d.]+)", out, re.M)}
    assert set(ppl) == {"teacher", "student"}
    assert all(math.isfinite(p) and 1 < p < 512 for p in ppl.values())  # better than uniform over the vocabulary
    assert (tmp_path / "run" / "student" / "final" / "modelcard.json").exists()


def test_quantize_awq(tmp_path: Path) -> None:
    out = run("quantize_awq.py", "--tiny", cwd=tmp_path)
    ppl = {m[0]: float(m[1]) for m in re.findall(r"^(float|int8|int4_rtn|awq)\b.*?([\d.]+)$", out, re.M)}
    assert set(ppl) == {"float", "int8", "int4_rtn", "awq"}
    assert abs(ppl["int8"] / ppl["float"] - 1) < 0.02
    reloaded = float(re.search(r"reloaded perplexity ([\d.]+)", out)[1])
    assert reloaded == pytest.approx(ppl["awq"], rel=1e-4)
    assert "served: 'Return the number of' -> " in out


def test_openai_client_against_a_spawned_server(tmp_path: Path) -> None:
    out = run("openai_client.py", "--spawn", "--tiny", cwd=tmp_path)
    assert "a wrong API key is refused with 401" in out
    assert re.search(r"completion \(8 tokens, length\)", out)
    assert re.search(r"streamed chat \(\d+ events\)", out)
    assert "refused with 400" in out
    assert "server stopped with exit code 0" in out
