"""Registered Triton ops trace under torch.compile without graph breaks; autotuning keys are bucketed
so a new length reuses a tuned config; the CUDA C++ sources compile with nvcc for sm_90a."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tessera.kernels.cuda import build
from tessera.kernels.triton import flash_attention, fp8_matmul, quant_gemv, quant_matmul, swiglu
from tessera.kernels.triton.tuning import bucket


def test_triton_ops_compile_fullgraph_and_match_eager(run_check) -> None:
    run_check("compile_check.py", "compile-ok", seeded=False)


def test_bucket_is_the_next_power_of_two() -> None:
    assert [bucket(n) for n in (0, 1, 2, 3, 1000, 1024, 1025)] == [1, 1, 2, 4, 1024, 1024, 2048]


@pytest.mark.parametrize("kernel", [flash_attention._fwd_kernel, swiglu._swiglu_kernel, quant_matmul._int8_kernel,
                                    quant_matmul._int4_kernel, quant_gemv._int8_tuned, quant_gemv._int4_tuned,
                                    fp8_matmul._fp8_gemm_kernel, fp8_matmul._fp8_gemm_tma_kernel])
def test_tuning_keys_never_hold_a_raw_length(kernel: object) -> None:
    keys = kernel.keys
    assert any(k.endswith("_BUCKET") for k in keys), keys
    assert not {"M", "L", "T", "max_seqlen"} & set(keys), keys


@pytest.mark.gpu
def test_new_length_in_a_tuned_bucket_does_not_stall() -> None:
    from tessera.kernels import registry

    def call(t: int) -> float:
        q = torch.randn(t, 32, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(t, 8, 128, device="cuda", dtype=torch.bfloat16)
        cu = torch.tensor([0, t], device="cuda", dtype=torch.int32)
        torch.cuda.synchronize()
        start = time.perf_counter()
        registry("attention.prefill", q, k, k, cu, t)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    call(3000)  # tunes the 4096 bucket (seconds)
    assert call(2500) < 0.5 and call(3999) < 0.5


@pytest.mark.skipif(build.nvcc_path() is None, reason="no nvcc on this machine")
@pytest.mark.parametrize("source", ["rms_norm.cu", "attention.cu", "quant_gemv.cu"])
def test_cuda_sources_compile_for_sm90a(source: str, tmp_path: Path) -> None:
    cmd = [build.nvcc_path(), "-c", str(build.CSRC / source), "-o", str(tmp_path / "k.o"), "-I", str(build.CSRC),
           *build.NVCC_FLAGS]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    cuobjdump = shutil.which("cuobjdump") or str(Path(build.nvcc_path()).parent / "cuobjdump")
    if Path(cuobjdump).exists():
        listing = subprocess.run([cuobjdump, "--list-elf", str(tmp_path / "k.o")], capture_output=True, text=True)
        assert "sm_90a" in listing.stdout, listing.stdout


def test_the_quantized_matmul_ops_fake_shapes() -> None:
    """What torch.compile is told of a quantized matmul op's output, without running it: [M, N], and [M, N / 2]
    for the SwiGLU one (silu_mul of the product's halves)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(3, 256, dtype=torch.bfloat16)
        qweight, groups = torch.empty(48, 128, dtype=torch.uint8), torch.empty(48, 2)
        assert torch.ops.tessera.matmul_int4_awq(x, qweight, groups, groups, 128).shape == (3, 48)
        assert torch.ops.tessera.matmul_int4_awq_swiglu(x, qweight, groups, groups, 128).shape == (3, 24)


def test_eager_bypass_dispatches_only_when_tracing_or_recording_grad() -> None:
    from tessera.kernels.custom_ops import eager_bypass

    calls = []
    call = eager_bypass(lambda *a: calls.append("op"), lambda *a: calls.append("fn"))
    x = torch.ones(2, requires_grad=True)
    call(x)
    with torch.no_grad():
        call(x)
    call(x.detach())
    eager_bypass(lambda *a: calls.append("op"), lambda *a: calls.append("fn"), autograd=False)(x)
    assert calls == ["op", "fn", "fn", "fn"]


def test_decode_gemvs_are_ranked_by_graph_time() -> None:
    from tessera.kernels.triton.tuning import graph_bench

    if not quant_gemv._int8_tuned.configs[1:]:  # the interpreter keeps one config: nothing to rank
        pytest.skip("one config under the interpreter")
    assert quant_gemv._int8_tuned.do_bench is graph_bench and quant_gemv._int4_tuned.do_bench is graph_bench


@pytest.mark.gpu
def test_graph_bench_times_device_work_per_call() -> None:
    from tessera.kernels.triton.tuning import graph_bench

    small = torch.empty(1 << 20, dtype=torch.uint8, device="cuda")
    big = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    t_small = graph_bench(lambda: small.copy_(small.flip(0)))
    median, low, high = graph_bench(lambda: big.add_(1), quantiles=(0.5, 0.2, 0.8))
    assert low <= median <= high
    # 512 MiB moved (read + write): at least 50 us even at 10 TB/s, at most a few ms.
    assert 0.05 < median < 5.0, median
    assert t_small < median / 10, (t_small, median)
