"""Programmatic dependent launch: every PDL kernel (a GEMV after asking the L2 for its weights) waits before
it touches memory an earlier kernel may use; on the GPU a chain of them gives the same bits in every mode."""

from __future__ import annotations

import re

import pytest
import torch
import triton

from tessera.kernels import static_weights, weights_static
from tessera.kernels.triton import gemv, kv_cache, norm, pdl, rope, swiglu
from tessera.kernels.triton import paged_attention as pa
from tessera.kernels.triton import quant_gemv as qg

_BF16 = "bf16"
_GEMV_INTS = {"stride_xk": 1}
_CASES = {
    "rms_norm": (norm._rms_norm_kernel, {n: _BF16 for n in "XRWYH"}, {"HAS_RESIDUAL": True, "BLOCK": 1024}),
    "rope": (rope._rope_kernel, {n: _BF16 for n in ("Q", "K", "COS", "SIN", "QW", "KW", "QO", "KO")},
             {"HALF": 64, "BLOCK_H": 16, "BLOCK_D": 64, "NORM": True, "TRANSPOSE": False}),
    "kv_write": (kv_cache._write_kernel, {"K": _BF16, "V": _BF16, "KC": _BF16, "VC": _BF16, "SLOTS": "i64"},
                 {"BLOCK_H": 8, "BLOCK_D": 128}),
    "paged_decode": (pa._decode_kernel, {"Q": _BF16, "K": _BF16, "V": _BF16, "O": _BF16, "O_PART": "fp32",
                                          "ML_PART": "fp32", "TABLES": "i32", "CTX": "i32"},
                     {"N_REP": 2, "G": 16, "HEAD_DIM": 128, "PAGE": 16, "SPLITS": 4, "PREC": "tf32", "BLOCK_N": 64}),
    "paged_decode_write": (pa._decode_kernel, {"Q": _BF16, "K": _BF16, "V": _BF16, "O": _BF16, "O_PART": "fp32",
                                                "ML_PART": "fp32", "TABLES": "i32", "CTX": "i32", "K_NEW": _BF16,
                                                "V_NEW": _BF16, "SLOTS": "i64"},
                           {"N_REP": 2, "G": 16, "HEAD_DIM": 128, "PAGE": 16, "SPLITS": 4, "PREC": "tf32",
                            "BLOCK_N": 64, "WRITE": True}),
    "paged_decode_rope": (pa._decode_kernel, {"Q": _BF16, "K": _BF16, "V": _BF16, "O": _BF16, "O_PART": "fp32",
                                               "ML_PART": "fp32", "TABLES": "i32", "CTX": "i32", "K_NEW": _BF16,
                                               "V_NEW": _BF16, "SLOTS": "i64", "COS": _BF16, "SIN": _BF16,
                                               "QW": _BF16, "KW": _BF16},
                          {"N_REP": 2, "G": 16, "HEAD_DIM": 128, "PAGE": 16, "SPLITS": 4, "PREC": "tf32",
                           "BLOCK_N": 64, "WRITE": True, "ROPE": 2}),
    "merge": (pa._merge_kernel, {"O": _BF16, "O_PART": "fp32", "ML_PART": "fp32"},
              {"HEAD_DIM": 128, "SPLITS": 4, "S_BLOCK": 4}),
    "silu_mul": (swiglu._silu_mul_kernel, {"G": _BF16, "U": _BF16, "Y": _BF16}, {"BLOCK": 1024}),
    "dense_gemv": (gemv.dense_gemv_kernel, {"X": _BF16, "W": _BF16, "Y": _BF16, "WS": "fp32", "CNT": "i32"},
                   {**_GEMV_INTS, "PREC": "tf32", "BM": 1, "BN": 8, "BK": 256, "SPLIT_K": 2, "EVEN": True}),
    "int8_words": (qg.int8_gemv_kernel, {"X": _BF16, "W": "i8", "S": _BF16, "Y": _BF16, "WS": "fp32", "CNT": "i32"},
                   {**_GEMV_INTS, "PREC": "tf32", "BM": 1, "BN": 8, "BK": 512, "SPLIT_K": 1, "WORDS": True,
                    "ASM": True, "EVEN": True}),
    "int8_m16": (qg.int8_gemv_kernel, {"X": _BF16, "W": "i8", "S": _BF16, "Y": _BF16, "WS": "fp32", "CNT": "i32"},
                 {**_GEMV_INTS, "PREC": "tf32", "BM": 16, "BN": 32, "BK": 256, "SPLIT_K": 1, "EVEN": True}),
    "int4_words": (qg.int4_gemv_kernel, {"X": _BF16, "QW": "u8", "S": _BF16, "Z": _BF16, "Y": _BF16, "WS": "fp32",
                                          "CNT": "i32"},
                   {**_GEMV_INTS, "GROUP": 128, "PREC": "tf32", "BM": 1, "BN": 128, "BK": 128, "SPLIT_K": 4,
                    "WORDS": True, "ASM": True, "EVEN": True}),
}
# The same GEMVs reading silu_mul(gate, up) from a fused gate/up output (`GATED`): the up half is x too.
_CASES |= {f"{name}_gated": (fn, ptrs, {**consts, "GATED": True})
           for name, (fn, ptrs, consts) in list(_CASES.items()) if name in ("dense_gemv", "int8_words", "int4_words")}
# And normalising x + residual as they load x (`NORM`): the prologue reads x and the residual and stores h.
_CASES |= {f"{name}_normed": (fn, {**ptrs, "R": _BF16, "NW": _BF16, "H": _BF16}, {**consts, "NORM": True})
           for name, (fn, ptrs, consts) in list(_CASES.items()) if name in ("dense_gemv", "int8_words", "int4_words")}
# And with rope and the cache write in the int8 epilogue (`ROPE_D`): the tables, caches and slots after the wait.
_CASES |= {f"{name}_rope": (fn, {**ptrs, "COS": _BF16, "SIN": _BF16, "KC": _BF16, "VC": _BF16, "SLOTS": "i64"},
                            {**consts, "ROPE_D": 64})
           for name, (fn, ptrs, consts) in list(_CASES.items()) if name in ("int8_words", "int8_m16")}
_GEMVS = {"dense_gemv", "int8_words", "int8_m16", "int4_words", "dense_gemv_gated", "int8_words_gated",
          "int4_words_gated", "dense_gemv_normed", "int8_words_normed", "int4_words_normed", "int8_words_rope",
          "int8_m16_rope"}
#: The M = 16 GEMVs, whose tiles load nothing before the wait in any mode.
_M16 = {"int8_m16", "int8_m16_rope"}
# Any global memory access: a load, a store, an atomic, an async copy into shared memory.
_MEMORY = re.compile(r"^\s*(@%p\d+\s+)?(ld\.global|st\.global|atom\.|red\.|cp\.async\.(ca|cg))", re.M)


@pytest.mark.parametrize("name", sorted(_CASES))
def test_pdl_kernels_wait_before_touching_memory(name: str, compile_sm90) -> None:
    fn, ptrs, consts = _CASES[name]

    def ptx(mode: int) -> str:
        return compile_sm90(fn, ptrs, {**consts, "PDL": mode}).asm["ptx"]

    prefetching = ptx(pdl.PREFETCH)
    signal, wait = prefetching.find("griddepcontrol.launch_dependents"), prefetching.find("griddepcontrol.wait")
    first_access = _MEMORY.search(prefetching)
    assert 0 <= wait < signal, "wait first, then let dependents launch (no chain launching all at once)"
    assert first_access is not None and wait < first_access.start(), "no global access may precede the wait"
    prefetch = prefetching.find("cp.async.bulk.prefetch.L2.global")
    if name in _GEMVS:  # weights (which no kernel writes) are asked for before the wait
        assert 0 <= prefetch < wait
    else:
        assert prefetch < 0
    # Overlap only: the same wait and signal, no prefetch. Off: no grid-dependency control at all.
    overlap = ptx(pdl.OVERLAP)
    assert "griddepcontrol.wait" in overlap and "cp.async.bulk.prefetch" not in overlap
    assert "griddepcontrol" not in ptx(pdl.OFF)
    # Early weights: a GEMV's one-row paths load (never store) their first weight tile before the wait;
    # every other kernel, and the M = 16 GEMV, compiles as in overlap mode.
    early = ptx(pdl.EARLY)
    wait = early.find("griddepcontrol.wait")
    before = [m.group(0).strip() for m in _MEMORY.finditer(early[:wait])]
    if name in _GEMVS - _M16:
        assert before and all("ld.global" in a for a in before), before
        assert 0 <= wait < early.find("griddepcontrol.launch_dependents")
    else:
        assert not before
    # Whole share (mode 4): the same paths load up to four tiles (int4: with their scales and zeros) before
    # the wait, still nothing but loads; everything else compiles as in mode 3.
    whole = ptx(pdl.EARLY_ALL)
    wait = whole.find("griddepcontrol.wait")
    before_all = [m.group(0).strip() for m in _MEMORY.finditer(whole[:wait])]
    if name in _GEMVS - _M16:
        assert all("ld.global" in a for a in before_all), before_all
        assert len(before_all) >= 4 * len(before), (len(before_all), len(before))
        assert 0 <= wait < whole.find("griddepcontrol.launch_dependents")
    else:
        assert not before_all


def test_launch_options_off_the_gpu_and_when_disabled() -> None:
    assert pdl.launch_options(torch.device("cpu")) == {"PDL": pdl.OFF}
    previous = pdl.set_mode(pdl.OFF)
    try:
        assert pdl.mode() == pdl.OFF
        assert pdl.launch_options(torch.device("cuda", 0)) == {"PDL": pdl.OFF}
        with pytest.raises(ValueError, match="mode=5"):
            pdl.set_mode(5)
        assert pdl.mode() == pdl.OFF
    finally:
        pdl.set_mode(previous)
    assert pdl.mode() == previous


def test_early_weights_only_for_gemvs_under_static_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mode 3 reaches a GEMV launch only inside `static_weights()`, on the thread that entered it; every
    other launch, and a GEMV outside the block, gets mode 1 (its weights might be the previous kernel's
    output)."""
    import threading

    monkeypatch.setattr(pdl, "triton_interpreting", lambda: False)
    monkeypatch.setattr(pdl, "_capable", lambda index: True)
    cuda = torch.device("cuda", 0)
    previous = pdl.set_mode(pdl.EARLY)
    try:
        assert pdl.launch_options(cuda, gemv=True) == {"PDL": pdl.OVERLAP, "launch_pdl": True}
        seen = []
        with static_weights():
            assert weights_static()
            assert pdl.launch_options(cuda, gemv=True) == {"PDL": pdl.EARLY, "launch_pdl": True}
            assert pdl.launch_options(cuda) == {"PDL": pdl.OVERLAP, "launch_pdl": True}
            with static_weights():  # nests
                pass
            assert weights_static()
            other = threading.Thread(target=lambda: seen.append(pdl.launch_options(cuda, gemv=True)["PDL"]))
            other.start()
            other.join()
        assert seen == [pdl.OVERLAP] and not weights_static()
        assert pdl.launch_options(cuda, gemv=True)["PDL"] == pdl.OVERLAP
        pdl.set_mode(pdl.EARLY_ALL)  # the whole-share mode is scoped the same way
        assert pdl.launch_options(cuda, gemv=True)["PDL"] == pdl.OVERLAP
        with static_weights():
            assert pdl.launch_options(cuda, gemv=True)["PDL"] == pdl.EARLY_ALL
            assert pdl.launch_options(cuda)["PDL"] == pdl.OVERLAP
        for mode in (pdl.OVERLAP, pdl.PREFETCH):  # the other modes ignore the declaration
            pdl.set_mode(mode)
            with static_weights():
                assert pdl.launch_options(cuda, gemv=True)["PDL"] == mode
    finally:
        pdl.set_mode(previous)


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True], ids=["rope-write-decode", "decode-paged-rope"])
def test_decode_chain_same_bits_with_and_without_pdl(fused: bool) -> None:
    """A decode-step-like chain (norm, int8/int4/dense GEMVs, silu_mul, rope, KV write, paged decode; or rope,
    write and decode as the one fused launch), replayed from CUDA graphs captured in each PDL mode, back to
    back so that each kernel overlaps the previous one's tail: identical outputs, and equal to eager
    launches."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs compute capability 9.0")
    torch.manual_seed(0)
    dev, bf = torch.device("cuda"), torch.bfloat16
    d, f, hq, hkv, hd, page, ctx = 2048, 8192, 16, 8, 128, 16, 300
    x = torch.randn(1, d, device=dev, dtype=bf)
    nw = torch.rand(d, device=dev, dtype=bf) + 0.5
    w8 = torch.randint(-127, 128, (2 * f, d), device=dev, dtype=torch.int8)
    s8 = torch.rand(2 * f, device=dev, dtype=bf) / 127
    qkv = torch.randn((hq + 2 * hkv) * hd, d, device=dev, dtype=bf) / d**0.5
    q4 = torch.randint(0, 256, (d, f // 2), device=dev, dtype=torch.uint8)
    s4 = torch.rand(d, f // 128, device=dev, dtype=bf) / 8
    z4 = torch.randint(0, 16, (d, f // 128), device=dev).to(bf)
    blocks = triton.cdiv(ctx + 1, page)
    k_cache = torch.randn(blocks + 1, page, hkv, hd, device=dev, dtype=bf)
    v_cache = torch.randn_like(k_cache)
    tables = torch.arange(1, blocks + 1, device=dev, dtype=torch.int32)[None]
    lens = torch.tensor([ctx + 1], device=dev, dtype=torch.int32)
    slot = torch.tensor([page + ctx], device=dev, dtype=torch.int64)
    cos, sin = torch.rand(1, hd, device=dev, dtype=bf), torch.rand(1, hd, device=dev, dtype=bf)

    def step() -> torch.Tensor:
        h = norm.rms_norm(x, nw, 1e-6)
        proj = gemv.matmul_dense(h, qkv)
        q, k = proj[:, : hq * hd].view(1, hq, hd), proj[:, hq * hd:(hq + hkv) * hd].view(1, hkv, hd)
        v = proj[:, (hq + hkv) * hd:].view(1, hkv, hd)
        if fused:
            att = pa.attention_decode_paged_rope(q, k, v, cos, sin, k_cache, v_cache, slot, tables, lens)
        else:
            q, k = rope.rope(q, k, cos, sin)
            kv_cache.kv_cache_write(k, v, k_cache, v_cache, slot)
            att = pa.attention_decode_paged(q, k_cache, v_cache, tables, lens, hd**-0.5)
        gu = torch.empty(1, 2 * f, device=dev, dtype=bf)
        qg.launch_int8(att.reshape(1, d), w8, s8, gu)
        a = swiglu.silu_mul(gu[:, :f], gu[:, f:])
        y = torch.empty(1, d, device=dev, dtype=bf)
        qg.launch_int4(a, q4, s4, z4, 128, y)
        return y

    outs = {}
    for mode in (pdl.OFF, pdl.OVERLAP, pdl.PREFETCH, pdl.EARLY, pdl.EARLY_ALL):
        previous = pdl.set_mode(mode)
        try:
            with static_weights():  # every GEMV weight here is a fixed tensor: modes 3, 4 load it early
                eager = step()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = step()
                    for _ in range(7):  # later copies overlap the earlier ones' tails
                        out = step()
            graph.replay()
            torch.cuda.synchronize()
            outs[mode] = (eager.clone(), out.clone())
        finally:
            pdl.set_mode(previous)
    for mode in (pdl.OVERLAP, pdl.PREFETCH, pdl.EARLY, pdl.EARLY_ALL):
        assert torch.equal(outs[mode][0], outs[pdl.OFF][0]) and torch.equal(outs[mode][1], outs[pdl.OFF][1])
    assert torch.equal(outs[pdl.OFF][0], outs[pdl.OFF][1])
