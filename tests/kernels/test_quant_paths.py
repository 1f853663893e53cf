"""The quantized matmuls' paths: prefill dequantize + cuBLAS, cached split-K workspaces, the autotuner
run once per shape, the torch._scaled_mm fp8 backend's refusals, and (on a GPU) CUDA-graph capture."""

from __future__ import annotations

import pytest
import torch

from tessera.kernels import reference, registry, scaled_mm
from tessera.kernels.triton import quant_dequant, split_k
from tessera.kernels.triton import quant_gemv as qg


def test_paths_tuning_and_compile(run_check) -> None:
    run_check("quant_paths_check.py", "paths-ok")


def test_prefill_threshold() -> None:
    m = quant_dequant.FUSED_MAX_M
    assert quant_dequant.serves(m + 1, torch.bfloat16) and quant_dequant.serves(4096, torch.float16)
    assert not quant_dequant.serves(m, torch.bfloat16) and not quant_dequant.serves(4096, torch.float32)


def test_split_workspace_is_allocated_once_per_shape() -> None:
    cpu = torch.device("cpu")
    ws, counters = split_k.workspace(2048, 8, cpu)
    again, counters_again = split_k.workspace(2048, 8, cpu)
    assert ws is again and counters is counters_again
    assert ws.numel() >= 8 * qg.MAX_M * 2048 and ws.dtype == torch.float32
    assert split_k.workspace(512, 8, cpu)[0] is not ws
    none, counters_1 = split_k.workspace(2048, 1, cpu)
    assert none is counters_1 is counters  # no split: nothing allocated beyond the counters


@pytest.fixture
def fresh_counters(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("_counters", "_capture_slabs", "_capture_taken"):
        monkeypatch.setattr(split_k, name, {})


def test_a_capturing_stream_takes_counters_zeroed_before_the_capture(fresh_counters, monkeypatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(split_k, "_capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="eager call on this device"):
        split_k.stream_counters(cpu, 7)
    monkeypatch.setattr(split_k, "_capturing", lambda device: False)
    eager = split_k.stream_counters(cpu, 1)
    assert not eager.any() and split_k.stream_counters(cpu, 1) is eager
    monkeypatch.setattr(split_k, "_capturing", lambda device: True)
    taken = [split_k.stream_counters(cpu, 100 + i) for i in range(split_k.CAPTURE_SETS)]
    slab = split_k._capture_slabs[cpu]
    assert all(t.data_ptr() == row.data_ptr() for t, row in zip(taken, slab, strict=True))
    assert not slab.any() and eager.data_ptr() not in {t.data_ptr() for t in taken}
    assert split_k.stream_counters(cpu, 100) is taken[0]  # a stream keeps its set
    with pytest.raises(RuntimeError, match=f"more than {split_k.CAPTURE_SETS} streams"):
        split_k.stream_counters(cpu, 999)


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


def _gemv_meta(c) -> dict:
    return {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("op", ["int8", "int4"])
def test_every_gemv_config_is_right_in_a_cuda_graph(op: str, m: int) -> None:
    """Each config the decode GEMVs may tune to, not only the one this machine's tuner picks: launched
    eagerly, then three launches sharing one split-K workspace and counter set captured in a graph and
    replayed on new inputs, each output checked against the reference."""
    from tessera.kernels.triton.tuning import bucket

    k, n, g = 2048, 1024, 128
    cases = _gpu_cases(m)
    x = cases["matmul.int8_weight_only"][0].clone()
    if op == "int8":
        weights = cases["matmul.int8_weight_only"][1:]
        pool = qg._prune_int8(qg._int8_tuned.configs, {"M_BUCKET": bucket(m), "N": n, "K": k})
        ref = reference.matmul_int8_weight_only

        def launch(y: torch.Tensor, c) -> None:
            qg.launch_int8(x, *weights, y, kernel=qg.int8_gemv_kernel, **_gemv_meta(c))
    else:
        weights = cases["matmul.int4_awq"][1:]
        pool = qg._prune_int4(qg._int4_tuned.configs, {"M_BUCKET": bucket(m), "N": n, "K": k}, GROUP=g)
        ref = reference.matmul_int4_awq

        def launch(y: torch.Tensor, c) -> None:
            qg.launch_int4(x, *weights[:3], g, y, kernel=qg.int4_gemv_kernel, **_gemv_meta(c))
    assert pool, f"no {op} config left for M={m} N={n} K={k}"
    tol = registry.catalogue["matmul.int8_weight_only" if op == "int8" else "matmul.int4_awq"].tolerance("bfloat16")
    bad = []

    def check(c, where: str, ys: list[torch.Tensor]) -> None:
        want = ref(x, *weights).float()
        for i, y in enumerate(ys):
            err = ((y.float() - want).abs() - tol.rtol * want.abs()).max().item()
            if not err <= tol.atol:
                bad.append(f"{_gemv_meta(c)} {where} call {i}: off by {err:.3g}")

    for c in pool:
        ys = [torch.empty(m, n, dtype=x.dtype, device=x.device) for _ in range(3)]
        launch(ys[0], c)
        torch.cuda.synchronize()
        check(c, "eager", ys[:1])
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for y in ys:
                launch(y, c)
        for _ in range(2):
            x.copy_(torch.randn_like(x))
            graph.replay()
            torch.cuda.synchronize()
            check(c, "replay", ys)
    assert not bad, f"{len(bad)} of {len(pool)} {op} configs wrong at M={m}:\n" + "\n".join(bad[:20])


@pytest.mark.gpu
def test_a_graph_replays_right_when_an_earlier_capture_never_ran() -> None:
    """Graph A captures the first split-K launch of a capture stream and is never replayed; graph B,
    captured after it on the same stream, is. B's counters must already be zero: a zero fill recorded in
    A would never have run. A's pool is first left holding nonzero bytes where those counters land."""
    k, n, m = 8192, 2048, 1
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
    scale = torch.rand(n, device="cuda") / 127 * k**-0.5
    y = torch.empty(m, n, dtype=x.dtype, device="cuda")
    split = next(c for c in qg._prune_int8(qg._int8_tuned.configs, {"M_BUCKET": 1, "N": n, "K": k})
                 if c.kwargs["SPLIT_K"] > 1)
    meta = {**split.kwargs, "num_warps": split.num_warps, "num_stages": split.num_stages}
    qg.launch_int8(x, w, scale, y, kernel=qg.int8_gemv_kernel, **meta)  # eager: compiles
    dirty = torch.cuda.CUDAGraph()
    with torch.cuda.graph(dirty):
        junk = torch.full((split_k.COUNTER_SLOTS,), 7, dtype=torch.int32, device="cuda")
    dirty.replay()
    torch.cuda.synchronize()
    del junk
    first = torch.cuda.CUDAGraph()
    with torch.cuda.graph(first, pool=dirty.pool()):
        qg.launch_int8(x, w, scale, y, kernel=qg.int8_gemv_kernel, **meta)
    second = torch.cuda.CUDAGraph()
    with torch.cuda.graph(second, pool=dirty.pool()):
        qg.launch_int8(x, w, scale, y, kernel=qg.int8_gemv_kernel, **meta)
    y.zero_()
    second.replay()
    torch.cuda.synchronize()
    tol = registry.catalogue["matmul.int8_weight_only"].tolerance("bfloat16")
    torch.testing.assert_close(y, reference.matmul_int8_weight_only(x, w, scale), atol=tol.atol, rtol=tol.rtol)
