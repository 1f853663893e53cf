"""The CUDA tensor-core weight-only decode GEMVs (`tessera.kernels.cuda.int4_gemv` for AWQ int4, `int8_gemv` for
int8): every launch config, PDL mode, token count and dtype against the reference on the GPU, float zero points
and the whole int8 range included; the Triton ops' per-shape choice between them and the Triton GEMVs; the
kernel's nibble decoding emulated bit for bit with its own constants; and the input checks, on any machine."""

from __future__ import annotations

import re
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch

from tessera.kernels import cuda, reference
from tessera.kernels.cuda import build

#: (M, N, K): one token and several, a partial token tile (3, 9), a partial row tile (N = 40, 1000), one
#: int4 group, group counts that do not divide among the warps (17, 9), and Llama-3.2-1B's o and down shapes.
GPU_SHAPES = [(1, 40, 128), (1, 2048, 2048), (1, 2048, 8192), (3, 1000, 2176), (8, 256, 1152), (9, 40, 1024),
              (16, 2048, 2048), (16, 96, 384)]
#: int8 also takes K a multiple of 64 only: one item (64), and item counts odd for every warp count (192, 1088).
INT8_SHAPES = [*GPU_SHAPES, (1, 24, 64), (5, 72, 192), (12, 130, 1088)]
TOL = {torch.bfloat16: 3e-2, torch.float16: 1e-2}


def _int4_inputs(m: int, n: int, k: int, dtype: torch.dtype, device: str, seed: int) -> tuple:
    gen = torch.Generator(device=device).manual_seed(seed)
    x = (torch.randn(m, k, device=device, generator=gen) * 2).to(dtype)
    qweight = reference.pack_int4(torch.randint(0, 16, (n, k), device=device, generator=gen))
    scales = (torch.rand(n, k // 128, device=device, generator=gen) + 0.2) * k**-0.5 / 8
    zeros = torch.rand(n, k // 128, device=device, generator=gen) * 15  # float zero points, not only integers
    return x, qweight, scales, zeros


def _int8_inputs(m: int, n: int, k: int, dtype: torch.dtype, device: str, seed: int) -> tuple:
    gen = torch.Generator(device=device).manual_seed(seed)
    x = (torch.randn(m, k, device=device, generator=gen) * 2).to(dtype)
    w_q = torch.randint(-128, 128, (n, k), device=device, generator=gen, dtype=torch.int8)  # -128 too
    scale = (torch.rand(n, device=device, generator=gen) + 0.2) * k**-0.5 / 64
    return x, w_q, scale


def _needs_sm90() -> None:
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the extension is built for sm_90a")


def _check_every_launch(run: Callable[[torch.Tensor, tuple, int], None], configs: tuple, want: torch.Tensor,
                        exact: torch.Tensor) -> None:
    """Every config and PDL mode: within the op's tolerance of the reference, and within 2x the float32
    reference's distance from the exact product (one rounding of the output dtype)."""
    tol = TOL[want.dtype]
    ref_err = ((want.double() - exact).abs() / (exact.abs() + 1e-3)).max().item()
    for config in configs:
        for pdl in (0, 1, 3):
            y = torch.full_like(want, float("nan"))
            run(y, config, pdl)
            torch.cuda.synchronize()
            torch.testing.assert_close(y, want, atol=tol, rtol=tol, msg=lambda s, c=config, p=pdl: f"{c} pdl {p}: {s}")
            err = ((y.double() - exact).abs() / (exact.abs() + 1e-3)).max().item()
            assert err <= 2 * ref_err + 1e-6, (config, pdl, err, ref_err)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("m", "n", "k"), GPU_SHAPES)
def test_int4_every_config_and_pdl_mode_matches_the_reference(m: int, n: int, k: int, dtype: torch.dtype) -> None:
    _needs_sm90()
    x, qweight, scales, zeros = _int4_inputs(m, n, k, dtype, "cuda", m * n + k)
    exact = x.double() @ reference.dequantize_int4(qweight, scales, zeros, 128).double().T
    _check_every_launch(lambda y, c, p: cuda.int4_gemv(x, qweight, scales, zeros, y, *c, pdl=p),
                        cuda.int4_gemv_configs(m, k), reference.matmul_int4_awq(x, qweight, scales, zeros, 128), exact)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("m", "n", "k"), INT8_SHAPES)
def test_int8_every_config_and_pdl_mode_matches_the_reference(m: int, n: int, k: int, dtype: torch.dtype) -> None:
    _needs_sm90()
    x, w_q, scale = _int8_inputs(m, n, k, dtype, "cuda", m * n + k)
    exact = x.double() @ (w_q.double() * scale.double()[:, None]).T
    _check_every_launch(lambda y, c, p: cuda.int8_gemv(x, w_q, scale, y, *c, pdl=p), cuda.int8_gemv_configs(m, k),
                        reference.matmul_int8_weight_only(x, w_q, scale), exact)


#: (N, K) of the gated int4 GEMV (one row): Llama-3.2-1B's down projection, a partial row tile and an odd group
#: count, one group, and the longest row it takes.
GATED_SHAPES = [(2048, 8192), (1000, 2176), (40, 128), (64, 16384)]
#: (N, K) of the normalised int4 GEMV (one row): q/k/v and gate/up of Llama-3.2-1B, a partial row tile, one
#: group, and the longest row it takes.
NORMED_SHAPES = [(3072, 2048), (16384, 2048), (1000, 2176), (40, 128), (64, 16384)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("n", "k"), GATED_SHAPES)
def test_int4_gated_every_config_and_pdl_mode_matches_the_reference(n: int, k: int, dtype: torch.dtype) -> None:
    """x formed as silu_mul of a fused gate/up output's halves while it loads: against
    `reference.matmul_int4_awq_gated`, and as close to the exact product of silu_mul's rounded values."""
    _needs_sm90()
    m = 1
    _, qweight, scales, zeros = _int4_inputs(m, n, k, dtype, "cuda", n + k)
    gu = (torch.randn(m, 2 * k, device="cuda", generator=torch.Generator("cuda").manual_seed(k)) * 2).to(dtype)
    exact = reference.gated_halves(gu).double() @ reference.dequantize_int4(qweight, scales, zeros, 128).double().T
    _check_every_launch(lambda y, c, p: cuda.int4_gemv(gu, qweight, scales, zeros, y, *c, pdl=p, gated=True),
                        cuda.int4_gemv_configs(m, k), reference.matmul_int4_awq_gated(gu, qweight, scales, zeros, 128),
                        exact)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("n", "k"), NORMED_SHAPES)
def test_int4_normed_every_config_and_pdl_mode_matches_the_reference(n: int, k: int, dtype: torch.dtype) -> None:
    """x formed as rms_norm_residual(x, residual, weight)'s output while it loads: y against
    `reference.matmul_int4_awq_normed` and the exact product of the normalised row, and h = x + residual
    written whole by every launch."""
    _needs_sm90()
    gen = torch.Generator("cuda").manual_seed(n + k)
    x, qweight, scales, zeros = _int4_inputs(1, n, k, dtype, "cuda", n + k)
    residual = (torch.randn(1, k, device="cuda", generator=gen) * 3).to(dtype)
    weight = (1 + 0.2 * torch.randn(k, device="cuda", generator=gen)).to(dtype)
    eps = 1e-5
    want, want_h = reference.matmul_int4_awq_normed(x, residual, weight, qweight, scales, zeros, 128, eps)
    normed, _ = reference.rms_norm_residual(x, residual, weight, eps)
    exact = normed.double() @ reference.dequantize_int4(qweight, scales, zeros, 128).double().T
    hs = []

    def run(y: torch.Tensor, config: tuple, pdl: int) -> None:
        h = torch.full_like(x, float("nan"))
        cuda.int4_gemv(x, qweight, scales, zeros, y, *config, pdl=pdl, norm=(residual, weight, h, eps))
        hs.append(h)

    _check_every_launch(run, cuda.int4_gemv_configs(1, k), want, exact)
    assert hs and all(torch.equal(h, want_h) for h in hs)


#: (M, N, K) of the SwiGLU int4 GEMV (N outputs of a fused gate/up weight of 2N rows): Llama-3.2-1B's and
#: Qwen3-0.6B's gate/up at one and 16 tokens, partial token and row tiles (N not a multiple of 8 or 16), one group.
SWIGLU_SHAPES = [(1, 8192, 2048), (16, 8192, 2048), (1, 3072, 1024), (3, 1000, 2176), (9, 20, 1024), (1, 4, 128),
                 (8, 256, 1152)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("m", "n", "k"), SWIGLU_SHAPES)
def test_int4_swiglu_every_config_and_pdl_mode_matches_the_reference(m: int, n: int, k: int,
                                                                     dtype: torch.dtype) -> None:
    """silu_mul stored by the GEMV of a fused gate/up weight: against `reference.matmul_int4_awq_swiglu`, and
    as close to silu(gate) * up of the exact products as it is. Gate and up rows differ (up is not gate)."""
    _needs_sm90()
    x, qweight, scales, zeros = _int4_inputs(m, 2 * n, k, dtype, "cuda", m * n + k)
    y_exact = x.double() @ reference.dequantize_int4(qweight, scales, zeros, 128).double().T
    exact = torch.nn.functional.silu(y_exact[:, :n]) * y_exact[:, n:]
    _check_every_launch(lambda y, c, p: cuda.int4_gemv(x, qweight, scales, zeros, y, *c, pdl=p, swiglu=True),
                        cuda.int4_gemv_configs(m, k), reference.matmul_int4_awq_swiglu(x, qweight, scales, zeros, 128),
                        exact)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16])
def test_the_swiglu_op_times_the_cuda_gemv_and_keeps_the_faster(m: int) -> None:
    """`matmul_int4_awq_swiglu` at a decode shape: the CUDA GEMV storing silu_mul or the plain op and silu_mul, by
    a timing of the shape (recorded under 'int4 swiglu'); the op agrees with the reference whichever it keeps."""
    _needs_sm90()
    from tessera.kernels.triton import quant_matmul as qm

    n2, k = 4096, 2048
    args = (*_int4_inputs(m, n2, k, torch.bfloat16, "cuda", 13), 128)
    with torch.no_grad():
        got, again = qm.matmul_int4_awq_swiglu(*args), qm.matmul_int4_awq_swiglu(*args)
    torch.cuda.synchronize()
    assert got.shape == (m, n2 // 2)
    torch.testing.assert_close(got, reference.matmul_int4_awq_swiglu(*args), atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(again, got, atol=0, rtol=0)
    choice = qm.cuda_gemv_choices()[f"int4 swiglu M<={m} N={n2} K={k} g=128 bfloat16"]
    assert choice["backend"] in ("cuda", "unfused") and choice["unfused_us"] > 0 and choice["cuda_us"] > 0, choice


@pytest.mark.gpu
def test_int8_strided_x_rows_and_weight_rows() -> None:
    """x and w_q as row slices of wider buffers (16-byte aligned row strides): the kernels use the strides."""
    _needs_sm90()
    x_full, w_full, scale = _int8_inputs(3, 200, 320, torch.bfloat16, "cuda", 3)
    x, w_q = x_full[:, :256], w_full[:, 64:]
    y = torch.empty(3, 200, dtype=torch.bfloat16, device="cuda")
    cuda.int8_gemv(x, w_q, scale, y, 16, 4)
    torch.testing.assert_close(y, reference.matmul_int8_weight_only(x, w_q, scale), atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["gated", "normed"])
def test_the_fused_int4_ops_time_the_cuda_gemv_and_keep_the_faster(op: str) -> None:
    """`matmul_int4_awq_gated` and `_normed` at a decode shape: their fused GEMV is the Triton or the CUDA one by
    a timing of the shape (recorded under 'int4 gated' / 'int4 normed'), and the op agrees with the reference
    whichever of fused and unfused it keeps."""
    _needs_sm90()
    from tessera.kernels.triton import quant_matmul as qm

    n, k = 2048, 2048
    x, qweight, scales, zeros = _int4_inputs(1, n, k, torch.bfloat16, "cuda", 11)
    if op == "gated":
        gu = torch.randn(1, 2 * k, device="cuda").to(torch.bfloat16)
        args = (gu, qweight, scales, zeros, 128)
        fn, ref = qm.matmul_int4_awq_gated, reference.matmul_int4_awq_gated
    else:
        residual, weight = torch.randn_like(x), (1 + 0.1 * torch.randn(k, device="cuda")).to(torch.bfloat16)
        args = (x, residual, weight, qweight, scales, zeros, 128, 1e-6)
        fn, ref = qm.matmul_int4_awq_normed, reference.matmul_int4_awq_normed
    with torch.no_grad():
        got, again = fn(*args), fn(*args)
    torch.cuda.synchronize()
    torch.testing.assert_close(got, ref(*args), atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(again, got, atol=0, rtol=0)
    choice = qm.cuda_gemv_choices()[f"int4 {op} M<=1 N={n} K={k} g=128 bfloat16"]
    assert choice["backend"] in ("cuda", "triton") and choice["triton_us"] > 0 and choice["cuda_us"] > 0, choice


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["int8", "int4"])
def test_the_triton_op_times_the_cuda_gemv_and_keeps_the_faster(op: str) -> None:
    _needs_sm90()
    from tessera.kernels.triton import quant_matmul as qm

    m, n, k = 1, 3072, 2048
    if op == "int4":
        args = (*_int4_inputs(m, n, k, torch.bfloat16, "cuda", 7), 128)
        fn, ref, label = qm.matmul_int4_awq, reference.matmul_int4_awq, f"int4 M<=1 N={n} K={k} g=128 bfloat16"
    else:
        args = _int8_inputs(m, n, k, torch.bfloat16, "cuda", 7)
        fn, ref = qm.matmul_int8_weight_only, reference.matmul_int8_weight_only
        label = f"int8 M<=1 N={n} K={k} bfloat16"
    with torch.no_grad():
        y = fn(*args)
        again = fn(*args)
    torch.cuda.synchronize()
    torch.testing.assert_close(y, ref(*args), atol=3e-2, rtol=3e-2)
    assert torch.equal(y, again)
    choice = qm.cuda_gemv_choices()[label]
    assert choice["backend"] in ("cuda", "triton") and choice["triton_us"] > 0 and choice["cuda_us"] > 0, choice


def _kernel_constants() -> dict[str, int]:
    """The decoding constants of csrc/quant_gemv.cu: kMagic and kHigh of bf16 and fp16, and the LOP3 tables of
    the low (OR) and high (XOR) nibble paths."""
    src = (build.CSRC / "quant_gemv.cu").read_text()
    out = {}
    for dtype in ("__nv_bfloat16", "__half"):
        body = re.search(r"struct Half16<" + dtype + r"> \{(.*?)\};", src, re.S).group(1)
        for name in ("kMagic", "kHigh"):
            out[f"{dtype}.{name}"] = int(re.search(name + r" = (0x[0-9A-Fa-f]+)u", body).group(1), 16)
    luts = re.findall(r"lop3\.b32 %0, %1, %2, %3, (0x[0-9A-Fa-f]+)", src)
    out["lut_high"], out["lut_low"] = (int(v, 16) for v in luts)  # the HIGH branch comes first
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    out = 0
    for bit in range(32):
        index = ((a >> bit) & 1) << 2 | ((b >> bit) & 1) << 1 | ((c >> bit) & 1)
        out |= ((lut >> index) & 1) << bit
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_kernels_nibble_decoding_is_exact_for_every_byte(dtype: torch.dtype) -> None:
    """Emulates `nibbles<T, SHIFT, HIGH>` with the kernel's own constants: for every int8 byte, the low
    nibble decodes to lo in [0, 15] and the high one to 16 * hi, and lo + 16 * hi is the byte's value, in both
    16-bit float formats; the low path alone decodes every int4 code. The subtraction is exact in the 16-bit
    format (its result is representable), which a float32 subtraction rounded once reproduces."""
    k = _kernel_constants()
    name = "__nv_bfloat16" if dtype == torch.bfloat16 else "__half"
    magic, high = k[f"{name}.kMagic"], k[f"{name}.kHigh"]

    def decode(w: int, shift: int, is_high: bool) -> tuple[float, float]:
        bias = high if is_high else magic
        biased = _lop3(w >> shift, 0x000F000F, bias, k["lut_high"] if is_high else k["lut_low"])
        halves = torch.tensor([biased & 0xFFFF, biased >> 16, bias & 0xFFFF], dtype=torch.int32).to(torch.int16)
        v = halves.view(dtype).float()
        out = (v[:2] - v[2]).to(dtype)
        assert torch.equal(out.float(), v[:2] - v[2])  # representable: the 16-bit subtraction is exact
        return out[0].item(), out[1].item()

    for byte in range(256):
        signed = byte - 256 if byte >= 128 else byte
        other = (byte * 37 + 11) % 256  # the byte at bits 16-23 of the same word
        other_signed = other - 256 if other >= 128 else other
        for offset in (0, 8):  # bytes 0 and 2 (shift 0, 4), bytes 1 and 3 (shift 8, 12)
            w = (byte << offset) | (other << (16 + offset)) | (0xA5 << (8 - offset)) | (0x5A << (24 - offset))
            lo, lo2 = decode(w, offset, False)
            hi, hi2 = decode(w, offset + 4, True)
            assert (lo + hi, lo2 + hi2) == (signed, other_signed), (byte, offset, lo, hi)
            assert 0 <= lo <= 15 and hi % 16 == 0
    for code in range(16):  # int4: the low path is the code itself
        assert decode(code | (15 - code) << 16, 0, False) == (code, 15 - code)


def test_inputs_it_cannot_take_are_named() -> None:
    x, qweight, scales, zeros = _int4_inputs(2, 8, 256, torch.bfloat16, "cpu", 0)
    assert any("needs cuda" in r for r in cuda.int4_gemv_reasons(x, qweight, scales, zeros, 128))
    assert any("group_size=64" in r for r in cuda.int4_gemv_reasons(x, qweight, scales, zeros, 64))
    assert any("x.dtype=torch.float32" in r for r in cuda.int4_gemv_reasons(x.float(), qweight, scales, zeros, 128))
    many = torch.zeros(17, 256, dtype=torch.bfloat16)
    assert any("1 <= M <= 16" in r for r in cuda.int4_gemv_reasons(many, qweight, scales, zeros, 128))
    assert any("scales" in r and "float32" in r
               for r in cuda.int4_gemv_reasons(x, qweight, scales.to(torch.bfloat16), zeros, 128))
    odd = torch.zeros(2, 257, dtype=torch.bfloat16)[:, 1:]  # rows 2-byte aligned only
    assert any("x rows" in r for r in cuda.int4_gemv_reasons(odd, qweight, scales, zeros, 128))

    gu = torch.zeros(2, 512, dtype=torch.bfloat16)
    assert any("gated: x (2, 512)" in r and "one row" in r
               for r in cuda.int4_gemv_reasons(gu, qweight, scales, zeros, 128, gated=True))
    assert not any("qweight" in r or "gated" in r
                   for r in cuda.int4_gemv_reasons(gu[:1], qweight, scales, zeros, 128, gated=True))
    assert any("qweight" in r for r in cuda.int4_gemv_reasons(gu[:1, :256], qweight, scales, zeros, 128, gated=True))
    row = torch.zeros(1, 256, dtype=torch.bfloat16)
    norm = (torch.zeros_like(row), torch.ones(256, dtype=torch.bfloat16), torch.empty_like(row), 1e-6)
    assert not any("norm" in r for r in cuda.int4_gemv_reasons(row, qweight, scales, zeros, 128, norm=norm))
    assert any("one contiguous row" in r for r in cuda.int4_gemv_reasons(x, qweight, scales, zeros, 128, norm=norm))
    assert any("norm: weight" in r and "float32" in r
               for r in cuda.int4_gemv_reasons(row, qweight, scales, zeros, 128, norm=(*norm[:1], norm[1].float(),
                                                                                      *norm[2:])))
    assert any("norm: h" in r for r in cuda.int4_gemv_reasons(row, qweight, scales, zeros, 128,
                                                               norm=(*norm[:2], torch.empty(1, 128), 1e-6)))
    long_row = torch.zeros(1, 16512, dtype=torch.bfloat16)
    assert any("norm: K=16512 is more than 16384" in r
               for r in cuda.int4_gemv_reasons(long_row, qweight, scales, zeros, 128,
                                               norm=(long_row, long_row[0], long_row, 1e-6)))
    assert any("exclusive" in r for r in cuda.int4_gemv_reasons(row, qweight, scales, zeros, 128, True, norm))
    assert not cuda.int4_gemv_reasons(x, qweight, scales, zeros, 128, swiglu=True)[1:]  # only "needs cuda"
    assert any("swiglu: qweight.shape=(7, 128)" in r
               for r in cuda.int4_gemv_reasons(x, qweight[:7], scales[:7], zeros[:7], 128, swiglu=True))
    assert any("swiglu takes a plain x" in r
               for r in cuda.int4_gemv_reasons(gu[:1], qweight, scales, zeros, 128, gated=True, swiglu=True))

    x, w_q, scale = _int8_inputs(2, 8, 256, torch.bfloat16, "cpu", 0)
    assert any("needs cuda" in r for r in cuda.int8_gemv_reasons(x, w_q, scale))
    assert any("1 <= M <= 16" in r for r in cuda.int8_gemv_reasons(many, w_q, scale))
    assert any("K=96" in r for r in cuda.int8_gemv_reasons(x[:, :96], w_q[:, :96], scale))
    assert any("w_q" in r and "int8" in r for r in cuda.int8_gemv_reasons(x, w_q.to(torch.uint8), scale))
    assert any("scale" in r and "float32" in r for r in cuda.int8_gemv_reasons(x, w_q, scale.half()))
    assert any("scale" in r for r in cuda.int8_gemv_reasons(x, w_q, scale[:4]))
    assert any("w_q rows" in r for r in cuda.int8_gemv_reasons(x[:, :128], w_q[:, 1:129], scale))


def test_bad_launch_arguments_raise_before_the_extension_loads() -> None:
    x, qweight, scales, zeros = _int4_inputs(9, 8, 256, torch.bfloat16, "cpu", 0)
    y = torch.empty(9, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"\(rows_per_block, warps, loop\)=\(16, 16, False\)"):
        cuda.int4_gemv(x, qweight, scales, zeros, y, 16, 16)  # 16 warps only up to 8 tokens
    with pytest.raises(ValueError, match=r"=\(16, 4, True\)"):
        cuda.int4_gemv(x, qweight, scales, zeros, y, 16, 4, loop=True)  # K = 256: 2 groups for 4 warps
    with pytest.raises(ValueError, match="pdl=2"):
        cuda.int4_gemv(x, qweight, scales, zeros, y, 16, 8, pdl=2)
    with pytest.raises(ValueError, match=r"gated: x \(9, 256\) .* is not one row"):
        cuda.int4_gemv(x, qweight, scales, zeros, y, 16, 8, gated=True)
    row = x[:1]
    with pytest.raises(ValueError, match="norm: weight"):
        cuda.int4_gemv(row, qweight, scales, zeros, y[:1], 16, 8, norm=(row, torch.ones(256), torch.empty_like(row), 0))
    with pytest.raises(ValueError, match=r"norm: x \(9, 256\)"):
        cuda.int4_gemv(x, qweight, scales, zeros, y, 16, 8, norm=(x, x[0], x, 1e-6))
    with pytest.raises(ValueError, match=r"swiglu: qweight.shape=\(7, 128\)"):
        cuda.int4_gemv(x, qweight[:7], scales[:7], zeros[:7], y[:, :3], 16, 8, swiglu=True)
    with pytest.raises(ValueError, match="swiglu takes a plain x"):
        cuda.int4_gemv(row, qweight, scales, zeros, y[:1, :4], 16, 8, norm=(row, row[0], row, 1e-6), swiglu=True)
    x, w_q, scale = _int8_inputs(9, 8, 192, torch.bfloat16, "cpu", 0)
    with pytest.raises(ValueError, match=r"=\(16, 4, True\)"):
        cuda.int8_gemv(x, w_q, scale, y, 16, 4, loop=True)  # K = 192: 3 items for 4 warps
    with pytest.raises(ValueError, match=r"=\(16, 16, False\)"):
        cuda.int8_gemv(x, w_q, scale, y, 16, 16)
    with pytest.raises(ValueError, match="pdl=5"):
        cuda.int8_gemv(x, w_q, scale, y, 16, 8, pdl=5)
    assert (16, 8, True) not in cuda.int8_gemv_configs(1, 192) and (16, 4, True) in cuda.int8_gemv_configs(1, 256)


def test_the_choice_takes_the_cuda_gemv_only_when_faster_and_in_agreement(monkeypatch) -> None:
    """`quant_matmul._choose_cuda_gemv` with both kernels and the timer replaced: the fastest CUDA config is
    taken when it beats the Triton GEMV and agrees with it; a slower one, or a faster one that disagrees,
    is not. Through `_int8_gemv`, the op's path, the pick is remembered per shape and used."""
    from tessera.kernels.triton import quant_gemv, tuning
    from tessera.kernels.triton import quant_matmul as qm

    x, w_q, scale = _int8_inputs(1, 8, 256, torch.bfloat16, "cpu", 0)
    y = torch.empty(1, 8, dtype=torch.bfloat16)
    state = {"cuda_value": 1.0, "last": None, "calls": []}
    configs = cuda.int8_gemv_configs(1, 256)
    cost = {"triton": 5.0, **{c: 9.0 for c in configs}, (16, 4, False): 4.0, (32, 4, False): 3.0}

    def fake_cuda(out, config, mode):
        out.fill_(state["cuda_value"])
        state["last"] = config
        state["calls"].append(("cuda", config, mode))

    def fake_triton(out):
        out.fill_(1.0)
        state["last"] = "triton"
        state["calls"].append("triton")

    def fake_bench(fn):
        fn()
        return cost[state["last"]] * 1e-3

    monkeypatch.setattr(qm, "_cuda_pdl", lambda device: 1)
    monkeypatch.setattr(cuda, "load", lambda: None)
    monkeypatch.setattr(tuning, "graph_bench", fake_bench)
    key = ("int8", "M<=1", "N=8", "K=256", torch.bfloat16)
    baseline = qm._filling(fake_triton, y)
    assert qm._choose_cuda_gemv(key, x, configs, baseline, fake_cuda, y) == (32, 4, False)
    assert qm.cuda_gemv_timings[key] == {"triton_us": 5.0, "cuda_us": 3.0, "cuda_config": [32, 4, False]}
    state["cuda_value"] = 1.5  # as fast, but wrong: never taken
    assert qm._choose_cuda_gemv(key, x, configs, baseline, fake_cuda, y) is None
    state["cuda_value"] = 1.0
    cost.update({(32, 4, False): 5.5, (16, 4, False): 6.0})  # slower than Triton everywhere
    assert qm._choose_cuda_gemv(key, x, configs, baseline, fake_cuda, y) is None

    # the op's path: only x on a GPU lets it consider the CUDA kernel; here a stand-in claims to be one
    cost.update({(32, 4, False): 3.0})
    gpu_x = SimpleNamespace(shape=x.shape, dtype=x.dtype, device=x.device, is_cuda=True)
    monkeypatch.setattr(qm, "triton_interpreting", lambda: False)
    monkeypatch.setattr(cuda, "int8_gemv_reasons", lambda *a: [])
    monkeypatch.setattr(cuda, "int8_gemv", lambda x, w_q, scale, out, *config, pdl: fake_cuda(out, config, pdl))
    monkeypatch.setattr(quant_gemv, "launch_int8", lambda x, w_q, scale, out: fake_triton(out))
    monkeypatch.setattr(qm, "_cuda_gemv", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # CPU builds cannot ask
    state["calls"].clear()
    qm._int8_gemv(gpu_x, w_q, scale, y)  # times, then runs the pick
    assert state["calls"][-1] == ("cuda", (32, 4, False), 1)
    state["calls"].clear()
    qm._int8_gemv(gpu_x, w_q, scale, y)  # remembered: one launch, no timing
    assert state["calls"] == [("cuda", (32, 4, False), 1)]
    qm._int8_gemv(x, w_q, scale, y)  # a CPU x never reaches the CUDA kernel
    assert state["calls"][-1] == "triton"
    assert qm.cuda_gemv_choices()["int8 M<=1 N=8 K=256 bfloat16"]["backend"] == "cuda"


@pytest.mark.parametrize("gated", [True, False])
def test_the_formed_int4_gemv_routes_its_x_and_keys_its_choice_by_the_products_k(monkeypatch, gated: bool) -> None:
    """`quant_matmul._int4_gemv` forming x, with both launchers replaced: the CUDA and Triton launches receive the gated
    flag or the norm as given, the configs and the choice's key use the product's K (half a gated x's width), and
    the choice is remembered under 'int4 gated' / 'int4 normed', apart from the plain GEMV's."""
    from tessera.kernels.triton import quant_gemv, tuning
    from tessera.kernels.triton import quant_matmul as qm

    n, k = 8, 256
    x, qweight, scales, zeros = _int4_inputs(1, n, k, torch.bfloat16, "cpu", 0)
    xin = torch.zeros(1, 2 * k, dtype=torch.bfloat16) if gated else x
    norm = None if gated else (torch.zeros_like(x), torch.ones(k, dtype=torch.bfloat16), torch.empty_like(x), 1e-6)
    y = torch.empty(1, n, dtype=torch.bfloat16)
    seen = {"cuda": [], "triton": [], "configs": [], "last": None}

    def fake_cuda(x_, qw, s, z, out, *config, pdl, gated, norm):
        assert x_ is gpu_x and not (gated and norm is not None)
        seen["cuda"].append((config, gated, norm))
        seen["last"] = config
        out.fill_(1.0)

    def fake_triton(x_, qw, s, z, group, out, gated, norm):
        seen["triton"].append((gated, norm))
        seen["last"] = "triton"
        out.fill_(1.0)

    real_configs = cuda.int4_gemv_configs

    def fake_configs(m, k_):
        seen["configs"].append(k_)
        return real_configs(m, k_)

    cost = {"triton": 5.0}

    def fake_bench(fn):
        fn()
        return cost.get(seen["last"], 2.0) * 1e-3

    gpu_x = SimpleNamespace(shape=xin.shape, dtype=xin.dtype, device=xin.device, is_cuda=True)
    monkeypatch.setattr(qm, "_cuda_pdl", lambda device: 3)
    monkeypatch.setattr(qm, "triton_interpreting", lambda: False)
    monkeypatch.setattr(qm, "_cuda_gemv", {})
    monkeypatch.setattr(cuda, "load", lambda: None)
    monkeypatch.setattr(cuda, "int4_gemv_reasons", lambda *a: [])
    monkeypatch.setattr(cuda, "int4_gemv_configs", fake_configs)
    monkeypatch.setattr(cuda, "int4_gemv", fake_cuda)
    monkeypatch.setattr(quant_gemv, "launch_int4", fake_triton)
    monkeypatch.setattr(tuning, "graph_bench", fake_bench)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # CPU builds cannot ask
    qm._int4_gemv(gpu_x, qweight, scales, zeros, 128, y, gated=gated, norm=norm)
    assert set(seen["configs"]) == {k}
    assert seen["triton"] and all(t == (gated, norm) for t in seen["triton"])
    assert seen["cuda"] and all(c[1:] == (gated, norm) for c in seen["cuda"])
    label = f"int4 {'gated' if gated else 'normed'} M<=1 N={n} K={k} g=128 bfloat16"
    assert qm.cuda_gemv_choices()[label]["backend"] == "cuda"
    assert not any(key.startswith("int4 M<=1 ") for key in qm.cuda_gemv_choices())


@pytest.mark.parametrize("faster", ["cuda", "unfused"])
def test_the_swiglu_op_routes_its_weight_and_keeps_its_choice(monkeypatch, faster: str) -> None:
    """`quant_matmul._int4_swiglu` with the CUDA launcher, the plain op and the timer replaced: the CUDA GEMV gets
    swiglu=True, the whole fused weight and an output of half its rows; the configs come from x's shape; the
    choice (the faster of the two) is remembered under 'int4 swiglu' with the weight's row count, a second call
    launches it without timing, and where the two launches are faster the op returns silu_mul of the plain op."""
    from tessera.kernels.triton import quant_gemv, tuning
    from tessera.kernels.triton import quant_matmul as qm

    n2, k = 16, 256
    x, qweight, scales, zeros = _int4_inputs(1, n2, k, torch.bfloat16, "cpu", 0)
    plain = torch.arange(n2, dtype=torch.bfloat16).view(1, n2) / 8  # what the replaced plain op returns
    want = reference.gated_halves(plain)
    seen = {"cuda": [], "plain": 0, "configs": [], "last": None}

    def fake_cuda(x_, qw, s, z, out, *config, pdl, swiglu):
        assert x_ is gpu_x and qw is qweight and swiglu and out.shape == (1, n2 // 2) and pdl == 3
        seen["cuda"].append(config)
        seen["last"] = "cuda"
        out.copy_(want)

    def fake_plain(x_, qw, s, z, group):
        seen["plain"] += 1
        seen["last"] = "unfused"
        return plain.clone()

    real_configs = cuda.int4_gemv_configs

    def fake_configs(m, k_):
        seen["configs"].append((m, k_))
        return real_configs(m, k_)

    def fake_bench(fn):
        fn()
        return (1.0 if seen["last"] == faster else 4.0) * 1e-3

    gpu_x = SimpleNamespace(shape=x.shape, dtype=x.dtype, device=x.device, is_cuda=True)
    monkeypatch.setattr(qm, "_cuda_pdl", lambda device: 3)
    monkeypatch.setattr(qm, "triton_interpreting", lambda: False)
    monkeypatch.setattr(qm, "_swiglu_gemv", {})
    monkeypatch.setattr(qm, "_int4", fake_plain)
    monkeypatch.setattr(qm, "_halves", reference.gated_halves)  # the Triton silu_mul needs a GPU or the interpreter
    monkeypatch.setattr(quant_gemv, "serves_int4", lambda m, group: True)
    monkeypatch.setattr(cuda, "load", lambda: None)
    monkeypatch.setattr(cuda, "int4_gemv_reasons", lambda *a, **kw: [])
    monkeypatch.setattr(cuda, "int4_gemv_configs", fake_configs)
    monkeypatch.setattr(cuda, "int4_gemv", fake_cuda)
    monkeypatch.setattr(tuning, "graph_bench", fake_bench)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # CPU builds cannot ask
    got = qm._int4_swiglu(gpu_x, qweight, scales, zeros, 128)
    assert torch.equal(got, want) and set(seen["configs"]) == {(1, k)}
    choice = qm.cuda_gemv_choices()[f"int4 swiglu M<=1 N={n2} K={k} g=128 bfloat16"]
    assert choice["backend"] == faster and choice["cuda_us"] == (1.0 if faster == "cuda" else 4.0)
    seen["cuda"].clear()
    seen["plain"] = 0
    assert torch.equal(qm._int4_swiglu(gpu_x, qweight, scales, zeros, 128), want)  # remembered: no timing
    assert (len(seen["cuda"]), seen["plain"]) == ((1, 0) if faster == "cuda" else (0, 1))
    with pytest.raises(ValueError, match=r"qweight.shape=\(15, 128\)"):
        qm._int4_swiglu(gpu_x, qweight[:15], scales[:15], zeros[:15], 128)


#: (M, Hq, Hkv, D, K) of the q/k/v GEMV with rope and the cache write: Llama-3.2-1B (32/8 heads of 64) and
#: Qwen3-0.6B-like (16/8 of 128) at one token and 16, GQA 4/2 of 16 with a partial token tile, and no q heads.
ROPE_SHAPES = [(1, 32, 8, 64, 2048), (16, 32, 8, 64, 2048), (1, 16, 8, 128, 1024), (3, 4, 2, 16, 256),
               (9, 0, 1, 32, 128)]


def _rope_inputs(m: int, hq: int, hkv: int, d: int, k: int, dtype: torch.dtype, device: str, seed: int) -> tuple:
    n = (hq + 2 * hkv) * d
    x, qweight, scales, zeros = _int4_inputs(m, n, k, dtype, device, seed)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    angles = torch.rand(m, d // 2, device=device, generator=gen) * 100
    cos = torch.cat((angles.cos(), angles.cos()), dim=1).to(dtype)
    sin = torch.cat((angles.sin(), angles.sin()), dim=1).to(dtype)
    blocks, block = 6, 4
    k_cache = torch.zeros(blocks, block, hkv, d, dtype=dtype, device=device)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(blocks * block, device=device, generator=gen)[:m]
    if m > 1:
        slots[1] = -1  # a padding lane: nothing stored
    return x, qweight, scales, zeros, cos, sin, k_cache, v_cache, slots


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("m", "hq", "hkv", "d", "k"), ROPE_SHAPES)
def test_int4_rope_every_config_and_pdl_mode_matches_the_reference(m: int, hq: int, hkv: int, d: int, k: int,
                                                                   dtype: torch.dtype) -> None:
    """q/k/v with rope and the cache write in the GEMV's epilogue: y against `reference.matmul_int4_awq_qkv_rope`
    and within twice its distance from the exact rotated product; the caches equal the reference's caches at the
    written slots to the same tolerance, untouched elsewhere (the padding lane's slot included)."""
    _needs_sm90()
    x, qweight, scales, zeros, cos, sin, k_cache, v_cache, slots = _rope_inputs(m, hq, hkv, d, k, dtype, "cuda",
                                                                                m + hq + d + k)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    q = reference.matmul_int4_awq_qkv_rope(x, qweight, scales, zeros, 128, cos, sin, want_k, want_v, slots, hq, hkv)
    _, k_plain, v = reference.qkv_heads(reference.matmul_int4_awq(x, qweight, scales, zeros, 128), hq, hkv)
    want = torch.cat((q, reference.rope(q, k_plain, cos, sin)[1], v), dim=1).view(m, -1)
    heads = hq + 2 * hkv
    y_exact = (x.double() @ reference.dequantize_int4(qweight, scales, zeros, 128).double().T).view(m, heads, d)
    c, s_ = cos.double()[:, None], sin.double()[:, None]
    rotated = y_exact * c + torch.cat((-y_exact[..., d // 2:], y_exact[..., : d // 2]), dim=-1) * s_
    exact = torch.cat((rotated[:, : hq + hkv], y_exact[:, hq + hkv:]), dim=1).reshape(m, heads * d)
    caches = []

    def run(y: torch.Tensor, config: tuple, pdl: int) -> None:
        kc, vc = k_cache.clone(), v_cache.clone()
        cuda.int4_gemv_rope(x, qweight, scales, zeros, y, cos, sin, kc, vc, slots, hq, hkv, *config, pdl=pdl)
        caches.append((kc, vc))

    _check_every_launch(run, cuda.int4_gemv_configs(m, k), want, exact)
    tol = TOL[dtype]
    for kc, vc in caches:
        torch.testing.assert_close(kc, want_k, atol=tol, rtol=tol)
        torch.testing.assert_close(vc, want_v, atol=tol, rtol=tol)
        unwritten = torch.ones(kc.shape[0] * kc.shape[1], dtype=torch.bool, device="cuda")
        unwritten[slots[slots >= 0]] = False
        assert not kc.view(-1, hkv, d)[unwritten].any() and not vc.view(-1, hkv, d)[unwritten].any()


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16])
def test_the_qkv_rope_op_times_the_cuda_gemv_and_keeps_the_faster(m: int) -> None:
    """`matmul_int4_awq_qkv_rope` at Llama-3.2-1B's decode shape: the CUDA GEMV with rope and the cache write in
    its epilogue, or the plain op, the Triton rope and the Triton write, by a timing of the shape (recorded under
    'int4 qkv rope'); q and both caches agree with the reference whichever it keeps, and a repeat gives the same."""
    _needs_sm90()
    from tessera.kernels.triton import quant_matmul as qm

    x, qweight, scales, zeros, cos, sin, k_cache, v_cache, slots = _rope_inputs(m, 32, 8, 64, 2048, torch.bfloat16,
                                                                                "cuda", 17)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want = reference.matmul_int4_awq_qkv_rope(x, qweight, scales, zeros, 128, cos, sin, want_k, want_v, slots, 32, 8)
    with torch.no_grad():
        got = qm.matmul_int4_awq_qkv_rope(x, qweight, scales, zeros, 128, cos, sin, k_cache, v_cache, slots, 32, 8)
        again = qm.matmul_int4_awq_qkv_rope(x, qweight, scales, zeros, 128, cos, sin, k_cache, v_cache, slots, 32, 8)
    torch.cuda.synchronize()
    assert got.shape == (m, 32, 64)
    for a, b in ((got, want), (k_cache, want_k), (v_cache, want_v)):
        torch.testing.assert_close(a, b, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(again, got, atol=0, rtol=0)
    choice = qm.cuda_gemv_choices()[f"int4 qkv rope M<={m} N=3072 K=2048 g=128 bfloat16"]
    assert choice["backend"] in ("cuda", "unfused") and choice["unfused_us"] > 0 and choice["cuda_us"] > 0, choice


def test_the_rope_gemvs_inputs_it_cannot_take_are_named() -> None:
    x, qweight, scales, zeros, cos, sin, k_cache, v_cache, slots = _rope_inputs(3, 4, 2, 16, 256, torch.bfloat16,
                                                                                "cpu", 0)
    reasons = cuda.int4_gemv_rope_reasons

    def names(*args: object) -> str:
        return " | ".join(reasons(*args))

    base = (x, qweight, scales, zeros, cos, sin, k_cache, v_cache, slots, 4, 2)
    assert "needs cuda" in names(*base) and "cos" not in names(*base) and "slots" not in names(*base)
    assert "n_q_heads=5, n_kv_heads=2" in names(*base[:9], 5, 2)
    assert "cos (3, 8)" in names(x, qweight, scales, zeros, cos[:, :8], *base[5:])
    assert "sin (3, 16)/torch.float32" in names(*base[:5], sin.float(), *base[6:])
    assert "v_cache (6, 4, 1, 32)" in names(*base[:7], v_cache.view(6, 4, 1, 32), *base[8:])
    assert "slots (3,)/torch.int32" in names(*base[:8], slots.int(), 4, 2)
    x8, q8, s8, z8, c8, n8, kc8, vc8, sl8 = _rope_inputs(1, 2, 1, 8, 128, torch.bfloat16, "cpu", 0)
    assert "head_dim=8 is not a multiple of 16" in names(x8, q8, s8, z8, c8, n8, kc8, vc8, sl8, 2, 1)


def test_the_qkv_rope_reference_is_rope_then_the_cache_write() -> None:
    """`reference.matmul_int4_awq_qkv_rope` is the plain product, `rope` of its q and k heads and `kv_cache_write`
    of k and v, returning q: checked against the three reference ops composed by hand."""
    x, qweight, scales, zeros, cos, sin, k_cache, v_cache, slots = _rope_inputs(3, 4, 2, 16, 256, torch.float32,
                                                                                "cpu", 1)
    kc, vc = k_cache.clone(), v_cache.clone()
    got = reference.matmul_int4_awq_qkv_rope(x, qweight, scales, zeros, 128, cos, sin, kc, vc, slots, 4, 2)
    plain = reference.matmul_int4_awq(x, qweight, scales, zeros, 128).view(3, 8, 16)
    q, k = reference.rope(plain[:, :4], plain[:, 4:6], cos, sin)
    assert torch.equal(got, q)
    reference.kv_cache_write(k, plain[:, 6:], k_cache, v_cache, slots)
    assert torch.equal(kc, k_cache) and torch.equal(vc, v_cache) and kc.view(-1, 2, 16)[slots[0]].any()
    with pytest.raises(ValueError, match=r"n_q_heads=3, n_kv_heads=2"):
        reference.matmul_int4_awq_qkv_rope(x, qweight, scales, zeros, 128, cos, sin, kc, vc, slots, 3, 2)


@pytest.mark.parametrize("kernel", ["right", "wrong slot", "slower"])
def test_the_qkv_rope_op_checks_the_cache_writes_before_it_takes_the_gemv(monkeypatch, kernel: str) -> None:
    """`quant_matmul._int4_qkv_rope` with the CUDA launcher, the plain op and the timer replaced: a GEMV whose writes
    and y agree with the separate ops and is faster is taken (remembered under 'int4 qkv rope' and launched without
    timing next time); one that writes a wrong slot is refused before any timing, whatever its speed; a slower one
    is not taken. Either way the op's q and caches are the separate ops'."""
    from tessera.kernels.triton import kv_cache, quant_gemv, rope, tuning
    from tessera.kernels.triton import quant_matmul as qm

    m, hq, hkv, d, k = 3, 4, 2, 16, 256
    x, qweight, scales, zeros, cos, sin, k_cache, v_cache, slots = _rope_inputs(m, hq, hkv, d, k, torch.bfloat16,
                                                                                "cpu", 2)
    plain = reference.matmul_int4_awq(x, qweight, scales, zeros, 128)
    seen = {"cuda": 0, "timed": 0, "last": None}

    def fake_cuda(x_, qw, s, z, out, cs, sn, kc, vc, sl, nq, nkv, *config, pdl):
        seen["cuda"] += 1
        seen["last"] = "cuda"
        q, k_, v = reference.qkv_heads(plain, nq, nkv)
        q, k_ = reference.rope(q, k_, cs, sn)
        reference.kv_cache_write(k_, v, kc, vc, sl + (1 if kernel == "wrong slot" else 0))
        out.copy_(torch.cat((q, k_, v), dim=1).view(out.shape))

    def fake_plain(*args):
        seen["last"] = "unfused"
        return plain.clone()

    def fake_bench(fn):
        seen["timed"] += 1
        fn()
        fast = "unfused" if kernel == "slower" else "cuda"
        return (1.0 if seen["last"] == fast else 3.0) * 1e-3

    gpu_x = SimpleNamespace(shape=x.shape, dtype=x.dtype, device=x.device, is_cuda=True)
    monkeypatch.setattr(qm, "_cuda_pdl", lambda device: 3)
    monkeypatch.setattr(qm, "triton_interpreting", lambda: False)
    monkeypatch.setattr(qm, "_rope_gemv", {})
    monkeypatch.setattr(qm, "cuda_gemv_timings", {})
    monkeypatch.setattr(qm, "_int4", fake_plain)
    monkeypatch.setattr(rope, "rope", reference.rope)  # the Triton kernels need a GPU or the interpreter
    monkeypatch.setattr(kv_cache, "kv_cache_write", reference.kv_cache_write)
    monkeypatch.setattr(quant_gemv, "serves_int4", lambda m, group: True)
    monkeypatch.setattr(cuda, "load", lambda: None)
    monkeypatch.setattr(cuda, "int4_gemv_rope_reasons", lambda *a: [])
    monkeypatch.setattr(cuda, "int4_gemv_rope", fake_cuda)
    monkeypatch.setattr(tuning, "graph_bench", fake_bench)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # CPU builds cannot ask
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want = reference.matmul_int4_awq_qkv_rope(x, qweight, scales, zeros, 128, cos, sin, want_k, want_v, slots, hq, hkv)
    for _ in range(2):
        kc, vc = k_cache.clone(), v_cache.clone()
        got = qm._int4_qkv_rope(gpu_x, qweight, scales, zeros, 128, cos, sin, kc, vc, slots, hq, hkv)
        assert torch.equal(got, want) and torch.equal(kc, want_k) and torch.equal(vc, want_v)
    label = f"int4 qkv rope M<=4 N={(hq + 2 * hkv) * d} K={k} g=128 bfloat16"  # M bucketed to a power of two
    if kernel == "wrong slot":
        assert seen["timed"] == 0 and qm.cuda_gemv_choices()[label] == {"backend": "unfused"}  # refused untimed
    else:
        assert qm.cuda_gemv_choices()[label]["backend"] == ("cuda" if kernel == "right" else "unfused")
        timed, launches = seen["timed"], seen["cuda"]
        qm._int4_qkv_rope(gpu_x, qweight, scales, zeros, 128, cos, sin, k_cache.clone(), v_cache.clone(), slots, hq,
                          hkv)
        assert seen["timed"] == timed and seen["cuda"] == launches + (kernel == "right")
