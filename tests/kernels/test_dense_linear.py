"""`tessera.kernels.dense.linear`: F.linear everywhere but decode-shaped CUDA calls, which take the
faster of cuBLAS and the GEMV kernel for their shape, chosen once per shape and never during a capture."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tessera.kernels import dense, registry


@pytest.mark.parametrize("shape", [(1, 64), (3, 5, 64), (40, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_calls_are_f_linear_exactly(shape: tuple[int, ...], bias: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen).to(torch.bfloat16)
    w = torch.randn(24, 64, generator=gen).to(torch.bfloat16)
    b = torch.randn(24, generator=gen).to(torch.bfloat16) if bias else None
    with torch.inference_mode():
        assert torch.equal(dense.linear(x, w, b), F.linear(x, w, b))
    assert not dense._choice  # nothing timed or remembered off the GPU


def test_autograd_is_untouched() -> None:
    w = torch.randn(8, 16, requires_grad=True)
    x = torch.randn(2, 16, requires_grad=True)
    dense.linear(x, w).sum().backward()
    assert torch.allclose(w.grad, x.detach().sum(0).expand(8, 16))


def test_decode_shaped_needs_cuda_half_no_grad_and_few_rows() -> None:
    w = torch.zeros(8, 16, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert not dense._decode_shaped(torch.zeros(1, 16, dtype=torch.bfloat16), w)  # CPU
    if torch.cuda.is_available():
        wc = w.cuda()
        with torch.inference_mode():
            assert dense._decode_shaped(torch.zeros(16, 16, dtype=torch.bfloat16, device="cuda"), wc)
            assert not dense._decode_shaped(torch.zeros(17, 16, dtype=torch.bfloat16, device="cuda"), wc)
            assert not dense._decode_shaped(torch.zeros(1, 16, device="cuda"), wc.float())
        assert not dense._decode_shaped(torch.zeros(1, 16, dtype=torch.bfloat16, device="cuda"), wc)  # grad on


@pytest.mark.gpu
@pytest.mark.parametrize(("m", "k", "n"), [(1, 2048, 1024), (1, 1024, 4096), (4, 3072, 1024), (16, 1024, 6144)])
def test_gpu_decode_calls_match_f_linear_and_remember_a_choice(m: int, k: int, n: int) -> None:
    gen = torch.Generator().manual_seed(m * n)
    x = torch.randn(1, m, k, generator=gen).to("cuda", torch.bfloat16)
    w = (torch.randn(n, k, generator=gen) * k**-0.5).to("cuda", torch.bfloat16)
    b = torch.randn(n, generator=gen).to("cuda", torch.bfloat16)
    tol = registry.catalogue["matmul.dense"].tolerance("bfloat16")
    with torch.inference_mode():
        got = dense.linear(x, w, b)
        torch.testing.assert_close(got, F.linear(x, w, b), atol=tol.atol, rtol=tol.rtol)
    key = (dense.bucket(m), n, k, torch.bfloat16, x.device)
    assert key in dense._choice and set(dense.timings[key]) == {"cublas_us", "gemv_us"}


@pytest.mark.gpu
def test_gpu_first_call_inside_a_capture_stays_on_cublas_and_chooses_nothing() -> None:
    x = torch.randn(1, 1000, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1000, 1000, device="cuda", dtype=torch.bfloat16) * 0.03
    key = (1, 1000, 1000, torch.bfloat16, x.device)
    dense._choice.pop(key, None)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode():
        F.linear(x, w)  # cuBLAS initialised outside the capture
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            y = dense.linear(x, w)
        graph.replay()
        torch.cuda.synchronize()
        assert key not in dense._choice
        torch.testing.assert_close(y, F.linear(x, w))


@pytest.mark.parametrize("shape", [(1, 128), (3, 5, 128)])
def test_gated_linear_off_the_gpu_is_silu_mul_then_f_linear(shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(1)
    gu = torch.randn(*shape, generator=gen).to(torch.bfloat16)
    w = torch.randn(24, 64, generator=gen).to(torch.bfloat16)
    b = torch.randn(24, generator=gen).to(torch.bfloat16)
    with torch.inference_mode():
        want = F.linear(F.silu(gu[..., :64]) * gu[..., 64:], w, b)
        assert torch.equal(dense.gated_linear(gu, w, b), want)
    assert not dense._gated_choice
    with pytest.raises(ValueError, match=r"gu.shape=\(1, 128\) is not \[..., 2 \* K\]"):
        dense.gated_linear(gu.reshape(-1, 128)[:1], w[:, :32])


@pytest.mark.gpu
@pytest.mark.parametrize(("m", "k", "n"), [(1, 3072, 1024), (1, 8192, 2048), (8, 3072, 1024)])
def test_gpu_gated_linear_matches_silu_mul_then_f_linear_and_remembers_a_choice(m: int, k: int, n: int) -> None:
    gen = torch.Generator().manual_seed(m * n + 1)
    gu = torch.randn(m, 2 * k, generator=gen).to("cuda", torch.bfloat16)
    w = (torch.randn(n, k, generator=gen) * k**-0.5).to("cuda", torch.bfloat16)
    tol = registry.catalogue["matmul.dense_gated"].tolerance("bfloat16")
    with torch.inference_mode():
        got = dense.gated_linear(gu, w)
        gated = registry.get("matmul.dense_gated", gu, w, backend="triton")(gu, w)
        want = F.linear(F.silu(gu[:, :k]) * gu[:, k:], w)
    torch.testing.assert_close(got, want, atol=tol.atol, rtol=tol.rtol)
    torch.testing.assert_close(gated, want, atol=tol.atol, rtol=tol.rtol)
    key = (dense.bucket(m), n, k, torch.bfloat16, gu.device)
    assert key in dense._gated_choice and set(dense.gated_timings[key]) == {"unfused_us", "gated_us"}
    assert f"M<={dense.bucket(m)} N={n} K={k} bfloat16 gated" in dense.choices()


def test_choosing_a_gated_shape_may_choose_its_plain_shape_inside(monkeypatch: pytest.MonkeyPatch) -> None:
    """Timing the gated GEMV against silu_mul + `linear` calls `linear`, which chooses its own shape under
    the same lock: both get remembered, without a deadlock (the timings are stubbed: no GPU here)."""
    import threading

    from tessera.kernels.triton import tuning

    class Op:
        def __init__(self, fn) -> None:
            self.fn = fn

        def __call__(self, *args):
            return self.fn(*args)

    real_get = registry.get

    def get(op, *args, **kwargs):
        if op == "matmul.dense":
            return Op(F.linear)
        if op == "matmul.dense_gated":
            return Op(lambda gu, w: F.linear(F.silu(gu[:, :w.shape[1]]) * gu[:, w.shape[1]:], w))
        return real_get(op, *args, **kwargs)

    monkeypatch.setattr(dense, "_decode_shaped", lambda x, w: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(dense, "_choice", {})
    monkeypatch.setattr(dense, "_gated_choice", {})
    monkeypatch.setattr(registry, "get", get)
    timings = iter([2.0, 1.0, 3.0, 1.0])  # linear: cuBLAS 2, GEMV 1; gated shape: unfused 3, gated 1 (ms)
    monkeypatch.setattr(tuning, "graph_bench", lambda fn: (fn(), next(timings))[1])
    gu, w = torch.randn(1, 64), torch.randn(8, 32)
    result = []
    worker = threading.Thread(target=lambda: result.append(dense.gated_linear(gu, w)), daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "gated_linear deadlocked choosing its shapes"
    torch.testing.assert_close(result[0], F.linear(F.silu(gu[:, :32]) * gu[:, 32:], w))
    key = (1, 8, 32, torch.float32, gu.device)
    assert dense._choice[key] is F.linear and dense._gated_choice[key] is not None
    assert dense.choices()["M<=1 N=8 K=32 float32 gated"]["backend"] == "gated"


def test_the_always_fusion_policy_runs_a_gated_gemv_that_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    """A gated shape whose GEMV lost to silu_mul + `linear` runs unfused under the "timed" policy and gated under
    "always" (TESSERA_DECODE_FUSION), which times nothing again; the reported choice stays the measured one."""
    from tessera.kernels import shape_choice
    from tessera.kernels.triton import tuning

    class Op:
        def __init__(self, fn) -> None:
            self.fn = fn

        def __call__(self, *args):
            return self.fn(*args)

    calls = []

    def gated(gu, w):
        calls.append("gated")
        return F.linear(F.silu(gu[:, :w.shape[1]]) * gu[:, w.shape[1]:], w)

    real_get = registry.get
    monkeypatch.setattr(registry, "get", lambda op, *a, **kw: Op(F.linear) if op == "matmul.dense" else Op(gated)
                        if op == "matmul.dense_gated" else real_get(op, *a, **kw))
    monkeypatch.setattr(dense, "_decode_shaped", lambda x, w: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    for table in ("_choice", "_gated_choice", "gated_timings"):
        monkeypatch.setattr(dense, table, {})
    timings = iter([2.0, 1.0, 1.0, 3.0])  # linear: cuBLAS 2, GEMV 1; gated shape: unfused 1, gated 3 (ms)
    monkeypatch.setattr(tuning, "graph_bench", lambda fn: (fn(), next(timings))[1])
    gu, w = torch.randn(1, 64), torch.randn(8, 32)
    want = F.linear(F.silu(gu[:, :32]) * gu[:, 32:], w)
    torch.testing.assert_close(dense.gated_linear(gu, w), want)
    calls.clear()
    torch.testing.assert_close(dense.gated_linear(gu, w), want)
    assert not calls  # "timed": the faster unfused pair
    monkeypatch.setattr(shape_choice, "DECODE_FUSION", "always")
    torch.testing.assert_close(dense.gated_linear(gu, w), want)
    assert calls == ["gated"]
    assert dense.choices()["M<=1 N=8 K=32 float32 gated"]["backend"] == "unfused"


@pytest.mark.parametrize("k", [2048, 100, 31])
@pytest.mark.parametrize("bias", [False, True])
def test_float32_sum_blocks_are_closer_to_float64(k: int, bias: bool) -> None:
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(2, 64, k, generator=gen)
    w = torch.randn(96, k, generator=gen) * k**-0.5
    b = torch.randn(96, generator=gen) if bias else None
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    with dense.float32_sum_blocks(8):
        blocked = dense.linear(x, w, b)
    assert blocked.dtype == torch.float32 and blocked.shape == (2, 64, 96)
    torch.testing.assert_close(blocked.double(), exact, rtol=0, atol=1e-5)
    if k >= 2048:  # long sums: the BLAS's running sums err more than the blocks' pairwise tree
        assert (blocked.double() - exact).abs().max() < (F.linear(x, w, b).double() - exact).abs().max()


def test_float32_sum_blocks_sum_each_block_then_pairwise() -> None:
    # Integers (exact in float32 up to 2**24) sum without rounding in any order, so the blocked result must
    # equal F.linear exactly; a block left out or counted twice would not.
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(-4, 5, (5, 77), generator=gen).float()
    w = torch.randint(-4, 5, (13, 77), generator=gen).float()
    for block in (1, 2, 7, 32, 77, 200):
        assert torch.equal(dense.blocked_linear(x, w, block=block), F.linear(x, w)), block
    # and a sum whose rounding shows the tree: 1 and four e = 2**-24 (half an ulp of 1), one per block.
    # Halves of five blocks: ((1 + e) + e) + (e + e) = 1 + 2e; one running sum would give 1, the exact 1 + 4e.
    x = torch.tensor([[1.0, 2.0**-24, 2.0**-24, 2.0**-24, 2.0**-24]])
    assert dense.blocked_linear(x, torch.ones(1, 5), block=1).item() == 1.0 + 2.0**-23


def test_float32_sum_blocks_scope_dtype_grad_and_errors() -> None:
    x = torch.randn(3, 40, requires_grad=True)
    w = torch.randn(6, 40, requires_grad=True)
    assert dense.float32_sum_block() is None
    with dense.float32_sum_blocks(16):
        assert dense.float32_sum_block() == 16
        with dense.float32_sum_blocks(4):
            assert dense.float32_sum_block() == 4
        assert dense.float32_sum_block() == 16
        y = dense.linear(x, w)
        half = dense.linear(x.detach().bfloat16(), w.detach().bfloat16())  # half dtypes untouched
    assert dense.float32_sum_block() is None
    assert torch.equal(half, F.linear(x.detach().bfloat16(), w.detach().bfloat16()))
    y.square().sum().backward()
    gx, gw = torch.autograd.grad(F.linear(x, w).square().sum(), (x, w))
    torch.testing.assert_close(x.grad, gx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, gw, rtol=1e-5, atol=1e-5)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="block="):
            with dense.float32_sum_blocks(bad):
                pass
    with pytest.raises(ValueError, match=r"x\.shape=.*w\.shape="):
        dense.blocked_linear(torch.randn(2, 5), torch.randn(3, 4))


def test_float32_sum_blocks_walk_n_in_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dense, "_PARTIALS_BYTES", 4 * 3 * 8 * 5)  # five output columns a slice
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(8, 24, generator=gen), torch.randn(23, 24, generator=gen)
    torch.testing.assert_close(dense.blocked_linear(x, w, block=8), F.linear(x, w), rtol=1e-6, atol=1e-6)
