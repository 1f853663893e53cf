"""The CUDA tensor-core AWQ int4 decode GEMV (`tessera.kernels.cuda.int4_gemv`): every launch config, PDL
mode, token count and dtype against the reference on the GPU, float zero points included; the Triton op's
per-shape choice between it and the Triton GEMV; and its input checks, on any machine."""

from __future__ import annotations

import pytest
import torch

from tessera.kernels import cuda, reference

#: (M, N, K): one token and several, a partial token tile (3, 9), a partial row tile (N = 40, 1000), one
#: group, group counts that do not divide among the warps (17, 9), and Llama-3.2-1B's o and down shapes.
GPU_SHAPES = [(1, 40, 128), (1, 2048, 2048), (1, 2048, 8192), (3, 1000, 2176), (8, 256, 1152), (9, 40, 1024),
              (16, 2048, 2048), (16, 96, 384)]


def _inputs(m: int, n: int, k: int, dtype: torch.dtype, device: str, seed: int) -> tuple:
    gen = torch.Generator(device=device).manual_seed(seed)
    x = (torch.randn(m, k, device=device, generator=gen) * 2).to(dtype)
    qweight = reference.pack_int4(torch.randint(0, 16, (n, k), device=device, generator=gen))
    scales = (torch.rand(n, k // 128, device=device, generator=gen) + 0.2) * k**-0.5 / 8
    zeros = torch.rand(n, k // 128, device=device, generator=gen) * 15  # float zero points, not only integers
    return x, qweight, scales, zeros


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("m", "n", "k"), GPU_SHAPES)
def test_every_config_and_pdl_mode_matches_the_reference(m: int, n: int, k: int, dtype: torch.dtype) -> None:
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the extension is built for sm_90a")
    x, qweight, scales, zeros = _inputs(m, n, k, dtype, "cuda", m * n + k)
    want = reference.matmul_int4_awq(x, qweight, scales, zeros, 128)
    exact = (x.double() @ reference.dequantize_int4(qweight, scales, zeros, 128).double().T)
    tol = {torch.bfloat16: 3e-2, torch.float16: 1e-2}[dtype]
    for config in cuda.int4_gemv_configs(m, k):
        for pdl in (0, 1, 3):
            y = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
            cuda.int4_gemv(x, qweight, scales, zeros, y, *config, pdl=pdl)
            torch.cuda.synchronize()
            torch.testing.assert_close(y, want, atol=tol, rtol=tol, msg=lambda s, c=config, p=pdl: f"{c} pdl {p}: {s}")
            # within one rounding of the output dtype of the exact product, as the float32 reference is
            err = ((y.double() - exact).abs() / (exact.abs() + 1e-3)).max().item()
            ref_err = ((want.double() - exact).abs() / (exact.abs() + 1e-3)).max().item()
            assert err <= 2 * ref_err + 1e-6, (config, pdl, err, ref_err)


@pytest.mark.gpu
def test_the_triton_op_times_the_cuda_gemv_and_keeps_the_faster() -> None:
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the extension is built for sm_90a")
    from tessera.kernels.triton import quant_matmul as qm

    m, n, k = 1, 3072, 2048
    x, qweight, scales, zeros = _inputs(m, n, k, torch.bfloat16, "cuda", 7)
    with torch.no_grad():
        y = qm.matmul_int4_awq(x, qweight, scales, zeros, 128)
        again = qm.matmul_int4_awq(x, qweight, scales, zeros, 128)
    torch.cuda.synchronize()
    torch.testing.assert_close(y, reference.matmul_int4_awq(x, qweight, scales, zeros, 128), atol=3e-2, rtol=3e-2)
    assert torch.equal(y, again)
    choice = qm.int4_cuda_choices()[f"int4 M<=1 N={n} K={k} g=128 bfloat16"]
    assert choice["backend"] in ("cuda", "triton") and choice["triton_us"] > 0 and choice["cuda_us"] > 0, choice


def test_inputs_it_cannot_take_are_named() -> None:
    x, qweight, scales, zeros = _inputs(2, 8, 256, torch.bfloat16, "cpu", 0)
    assert any("needs cuda" in r for r in cuda.int4_gemv_reasons(x, qweight, scales, zeros, 128))
    assert any("group_size=64" in r for r in cuda.int4_gemv_reasons(x, qweight, scales, zeros, 64))
    assert any("x.dtype=torch.float32" in r for r in cuda.int4_gemv_reasons(x.float(), qweight, scales, zeros, 128))
    many = torch.zeros(17, 256, dtype=torch.bfloat16)
    assert any("1 <= M <= 16" in r for r in cuda.int4_gemv_reasons(many, qweight, scales, zeros, 128))
    assert any("scales" in r and "float32" in r
               for r in cuda.int4_gemv_reasons(x, qweight, scales.to(torch.bfloat16), zeros, 128))
    odd = torch.zeros(2, 257, dtype=torch.bfloat16)[:, 1:]  # rows 2-byte aligned only
    assert any("x rows" in r for r in cuda.int4_gemv_reasons(odd, qweight, scales, zeros, 128))


def test_bad_launch_arguments_raise_before_the_extension_loads() -> None:
    x, qweight, scales, zeros = _inputs(9, 8, 256, torch.bfloat16, "cpu", 0)
    y = torch.empty(9, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"\(rows_per_block, warps, loop\)=\(16, 16, False\)"):
        cuda.int4_gemv(x, qweight, scales, zeros, y, 16, 16)  # 16 warps only up to 8 tokens
    with pytest.raises(ValueError, match=r"=\(16, 4, True\)"):
        cuda.int4_gemv(x, qweight, scales, zeros, y, 16, 4, loop=True)  # K = 256: 2 groups for 4 warps
    with pytest.raises(ValueError, match="pdl=2"):
        cuda.int4_gemv(x, qweight, scales, zeros, y, 16, 8, pdl=2)


def test_the_choice_takes_the_cuda_gemv_only_when_faster_and_in_agreement(monkeypatch) -> None:
    """`quant_matmul._choose_int4_cuda` with both kernels and the timer replaced: the fastest CUDA config is
    taken when it beats the Triton GEMV and agrees with it; a slower one, or a faster one that disagrees,
    is not."""
    from tessera.kernels.triton import quant_gemv, tuning
    from tessera.kernels.triton import quant_matmul as qm

    x, qweight, scales, zeros = _inputs(1, 8, 256, torch.bfloat16, "cpu", 0)
    y = torch.empty(1, 8, dtype=torch.bfloat16)
    state = {"cuda_value": 1.0, "last": None}
    cost = {"triton": 5.0, **{c: 9.0 for c in cuda.int4_gemv_configs(1, 256)}, (16, 4, False): 4.0,
            (32, 4, False): 3.0}

    def fake_cuda(x, qweight, scales, zeros, y, rows, warps, loop, pdl=0):
        y.fill_(state["cuda_value"])
        state["last"] = (rows, warps, loop)

    def fake_triton(x, qweight, scales, zeros, group_size, y):
        y.fill_(1.0)
        state["last"] = "triton"

    def fake_bench(fn):
        fn()
        return cost[state["last"]] * 1e-3

    monkeypatch.setattr(qm, "_cuda_pdl", lambda device: 1)
    monkeypatch.setattr(cuda, "load", lambda: None)
    monkeypatch.setattr(cuda, "int4_gemv", fake_cuda)
    monkeypatch.setattr(quant_gemv, "launch_int4", fake_triton)
    monkeypatch.setattr(tuning, "graph_bench", fake_bench)
    key = ("int4", "M<=1", "N=8", "K=256", torch.bfloat16)
    assert qm._choose_int4_cuda(key, x, qweight, scales, zeros, 128, y) == (32, 4, False)
    assert qm.int4_cuda_timings[key] == {"triton_us": 5.0, "cuda_us": 3.0, "cuda_config": [32, 4, False]}
    state["cuda_value"] = 1.5  # as fast, but wrong: never taken
    assert qm._choose_int4_cuda(key, x, qweight, scales, zeros, 128, y) is None
    state["cuda_value"] = 1.0
    cost.update({(32, 4, False): 5.5, (16, 4, False): 6.0})  # slower than Triton everywhere
    assert qm._choose_int4_cuda(key, x, qweight, scales, zeros, 128, y) is None
