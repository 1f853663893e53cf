"""`benchmarks/probe_persistent_layer.py`: its one-launch kernel computes what one launch per projection
computes (under the interpreter, one program, float32; with and without attention over a cache), and it
compiles for sm_90 with its grid barrier publishing at GPU scope and its activations read past L1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_probe_matches_one_launch_per_projection() -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "probe_persistent_layer.py"), "--tiny"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "persistent, BN" in proc.stdout and "disagree" not in proc.stdout


@pytest.mark.parametrize("attention", [False, True])
def test_persistent_kernel_compiles_for_sm90(attention: bool, compile_sm90) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import probe_persistent_layer as probe
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    consts = {"L": 28, "D": 1024, "NQKV": 4096, "DO": 2048, "DO_P": 2048, "NGU": 6144, "DI": 3072, "DI_P": 4096,
              "BN_QKV": 16, "BN_O": 8, "BN_GU": 16, "BN_D": 8, "PREFETCH": True, "SPIN_LIMIT": 1 << 16,
              "ATTN": attention, "TMAX": 512, "HKV": 8, "G": 2, "HD": 128, "S": 16, "SP": 16, "SCALE": 128 ** -0.5,
              "DEPTH": 2}
    ptrs = {"h_ptr": "fp32", "wqkv": "bf16", "wo": "bf16", "wgu": "bf16", "wd": "bf16", "a_ptr": "bf16",
            "o_ptr": "bf16", "g_ptr": "bf16", "kc": "bf16", "vc": "bf16", "part": "fp32", "hcnt": "i32",
            "counter": "i32", "flag": "i32", "ones": "bf16", "cos": "bf16", "sin": "bf16", "slot": "i64",
            "table": "i32", "ctx": "i32"}
    ptx = compile_sm90(probe._layers_kernel, ptrs, consts, {}, 16, 1).asm["ptx"]
    # arrive with acquire-release, poll with acquire, at GPU scope; the residual and activations through L2
    assert "atom.global.gpu.acq_rel.add" in ptx and "ld.global.gpu.acquire.b32" in ptx
    assert "ld.global.cg" in ptx and "bar.sync" in ptx
    # with attention, the last split of a head resets its counter for the next layer
    assert ("atom.global.gpu.relaxed.exch" in ptx) == attention
