"""The quantized matmuls' paths: prefill dequantize + cuBLAS, cached split-K workspaces, the autotuner
run once per shape, the torch._scaled_mm fp8 backend's refusals, and (on a GPU) CUDA-graph capture."""

from __future__ import annotations

import pytest
import torch

from tessera.kernels import reference, registry, scaled_mm
from tessera.kernels.triton import quant_dequant
from tessera.kernels.triton import quant_gemv as qg


def test_paths_tuning_and_compile(run_check) -> None:
    run_check("quant_paths_check.py", "paths-ok")


def test_prefill_threshold() -> None:
    m = quant_dequant.FUSED_MAX_M
    assert quant_dequant.serves(m + 1, torch.bfloat16) and quant_dequant.serves(4096, torch.float16)
    assert not quant_dequant.serves(m, torch.bfloat16) and not quant_dequant.serves(4096, torch.float32)


def test_split_workspace_is_allocated_once_per_shape() -> None:
    cpu = torch.device("cpu")
    ws, counters = qg._workspace(2048, 8, cpu)
    again, counters_again = qg._workspace(2048, 8, cpu)
    assert ws is again and counters is counters_again
    assert ws.numel() >= 8 * qg.MAX_M * 2048 and ws.dtype == torch.float32
    assert qg._workspace(512, 8, cpu)[0] is not ws
    none, counters_1 = qg._workspace(2048, 1, cpu)
    assert none is counters_1 is counters  # no split: nothing allocated beyond the counters


def _fp8_inputs(m: int, k: int, n: int, per_row: bool, dtype: torch.dtype = torch.bfloat16,
                device: str = "cpu") -> tuple[torch.Tensor, ...]:
    x = torch.randn(m, k, dtype=dtype, device=device)
    w_q = (torch.randn(n, k, device=device) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
    w_scale = torch.rand(n if per_row else 1, device=device) * 1e-2 + 1e-3
    return x, w_q, w_scale


def test_scaled_mm_outranks_triton_and_refuses_cpu() -> None:
    backends = registry.backends("matmul.fp8")
    assert backends[0] == "scaled_mm" and backends.index("scaled_mm") < backends.index("reference")
    reasons = scaled_mm.supports(*_fp8_inputs(4, 32, 16, per_row=True))
    assert reasons == ["tensors on cpu, needs cuda"]
    assert registry.get("matmul.fp8", *_fp8_inputs(4, 32, 16, per_row=True)).backend != "scaled_mm"


@pytest.mark.parametrize(("bad", "field"), [
    (lambda x, w, s: (x.float(), w, s), "x.dtype"),
    (lambda x, w, s: (x[:, :24], w[:, :24], s), "multiples of 16"),
    (lambda x, w, s: (x, w[:24], s), "multiples of 16"),
    (lambda x, w, s: (x, w.T.contiguous().T, s), "w_q.stride()"),
    (lambda x, w, s: (x, w, s[:3]), "w_scale.shape"),
    (lambda x, w, s: (x, w, s.double()), "w_scale.dtype"),
    (lambda x, w, s: (x, w.float(), s), "w_q.dtype"),
])
def test_scaled_mm_names_each_input_it_cannot_take(bad: object, field: str) -> None:
    x, w_q, w_scale = _fp8_inputs(4, 32, 32, per_row=True)
    reasons = scaled_mm.supports(*bad(x, w_q, w_scale))
    assert any(field in r for r in reasons), reasons


def test_scaled_mm_x_dtypes_follow_torch() -> None:
    assert torch.bfloat16 in scaled_mm.X_DTYPES and torch.float32 not in scaled_mm.X_DTYPES


@pytest.mark.gpu
@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("m", [1, 70, 1024])
def test_scaled_mm_matches_reference_on_gpu(m: int, per_row: bool) -> None:
    args = _fp8_inputs(m, 2048, 512, per_row, device="cuda")
    impl = registry.get("matmul.fp8", *args)
    if torch.cuda.get_device_capability() >= (8, 9):
        assert impl.backend == "scaled_mm"
    tol = registry.catalogue["matmul.fp8"].tolerance("bfloat16")
    torch.testing.assert_close(impl(*args), reference.matmul_fp8(*args), atol=tol.atol, rtol=tol.rtol)


def _gpu_cases(m: int) -> dict[str, tuple]:
    k, n, g = 2048, 1024, 128
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    w_q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
    scale = torch.rand(n, device="cuda") / 127 * k**-0.5
    q4 = reference.pack_int4(torch.randint(0, 16, (n, k), device="cuda"))
    s4 = torch.rand(n, k // g, device="cuda") * k**-0.5 / 8
    z4 = torch.randint(0, 16, (n, k // g), device="cuda").float()
    return {"matmul.int8_weight_only": (x, w_q, scale), "matmul.int4_awq": (x, q4, s4, z4, g),
            "matmul.fp8": _fp8_inputs(m, k, n, per_row=True, device="cuda")}


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 40, 70])
def test_ops_replay_in_a_cuda_graph(m: int) -> None:
    for op, args in _gpu_cases(m).items():
        for backend in [b for b in registry.backends(op) if b != "reference"]:
            impl = registry.get(op, backend=backend)
            if impl.supports(*args):
                continue
            x = args[0].clone()
            impl(x, *args[1:])  # tune and compile outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                ys = [impl(x, *args[1:]) for _ in range(3)]
            x.copy_(torch.randn_like(x))  # new inputs in the captured buffer
            graph.replay()
            # Against the reference: stale workspaces or counters in a replay would show up as garbage.
            want = registry.get(op, backend="reference")(x, *args[1:])
            tol = registry.catalogue[op].tolerance("bfloat16")
            for y in ys:
                err = (y.float() - want.float()).abs() - tol.rtol * want.float().abs()
                assert err.max() <= tol.atol, f"{op}/{backend} m{m}: replay off by {err.max():.3g}"
