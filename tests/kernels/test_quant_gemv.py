"""The decode-shape (M <= 16) quantized matmuls: correct at every M path and split-K under the interpreter,
and an autotune space that never lets a tile split an int4 group (a tile lies in one group or holds whole
groups), never splits where the workspace was not sized for it, and keeps several candidates for every
Llama-3.2-1B projection."""

from __future__ import annotations

import pytest
import torch
import triton

from tessera.kernels.triton import gemv, split_k
from tessera.kernels.triton import quant_gemv as qg
from tessera.kernels.triton.tuning import bucket

#: (K, N) of every Llama-3.2-1B projection and the square benchmark shapes.
SHAPES = [(2048, 2048), (2048, 512), (2048, 8192), (8192, 2048), (2048, 128256), (4096, 4096), (8192, 8192),
          (200, 37)]


def test_kernels_match_reference_at_every_path_and_split(run_check) -> None:
    run_check("gemv_check.py", "gemv-ok", interpret="always")


def test_early_weights_prologues_give_the_plain_loops_bits(run_check) -> None:
    run_check("early_weights_check.py", "early-ok", interpret="always")


def test_gated_gemvs_give_the_bits_of_silu_mul_then_the_gemv(run_check) -> None:
    run_check("gated_gemv_check.py", "gated-ok", interpret="always")


def test_int8_rope_gemv_gives_the_bits_of_the_gemv_rope_and_cache_write(run_check) -> None:
    run_check("rope_gemv_check.py", "rope-ok", interpret="always")


def test_normed_gemvs_match_rms_norm_residual_then_the_gemv(run_check) -> None:
    run_check("normed_gemv_check.py", "normed-ok", interpret="always")


def _named(m: int, k: int, n: int, group: int | None = None) -> dict:
    args = {"M_BUCKET": bucket(m), "N": n, "K": k}
    return args if group is None else {**args, "GROUP": group}


def _check_space(kernel: object, kept: list[triton.Config], m: int, k: int, n: int) -> None:
    assert kept and len(set(kept)) == len(kept), kept
    if k >= 2048:  # several candidates for every real size class
        assert len(kept) >= 3, (m, k, n, kept)
    for c in kept:
        bn, bk, split = c.kwargs["BN"], c.kwargs["BK"], c.kwargs["SPLIT_K"]
        assert split == 1 or n <= split_k.SPLIT_MAX_N, (n, c)
        assert split <= split_k.max_split(kernel, n), (n, c)  # the workspace holds every split
        assert bn & (bn - 1) == 0 and bk & (bk - 1) == 0, c
        if m > 1:  # the tl.dot path needs tensor-core-sized operands
            assert bn >= 16 and bk >= 32, c
        if split > 1:
            assert triton.cdiv(k, bk) >= 2 * split, (k, c)


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize(("k", "n"), SHAPES)
def test_int8_search_space(m: int, k: int, n: int) -> None:
    _check_space(qg._int8_tuned, qg._prune_int8(qg._int8_tuned.configs, _named(m, k, n)), m, k, n)


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize(("k", "n"), [*SHAPES, (1024, 4096), (3072, 1024), (1024, 151936)])
def test_dense_search_space(m: int, k: int, n: int) -> None:
    _check_space(gemv._tuned, gemv._prune(gemv._tuned.configs, _named(m, k, n)), m, k, n)


def test_int8_m1_dot_path_only_on_large_matrices() -> None:
    every = qg._INT8_M1 + qg._INT8_MX
    dot = [bool(c.kwargs.get("M1_DOT")) for c in qg._prune_int8(every, _named(1, 8192, 8192))]
    assert any(dot) and not all(dot)  # both M == 1 paths compete on a large matrix
    assert not any(c.kwargs.get("M1_DOT") for c in qg._prune_int8(every, _named(1, 4096, 4096)))
    assert not any(c.kwargs.get("M1_DOT") for c in qg._prune_int8(every, _named(16, 8192, 8192)))


def test_word_path_competes_only_where_it_reads_whole_words() -> None:
    def words(kept: list[triton.Config]) -> list[triton.Config]:
        return [c for c in kept if c.kwargs.get("WORDS")]

    every = qg._INT8_M1 + qg._INT8_MX
    kept = qg._prune_int8(every, _named(1, 2048, 2048))
    assert words(kept) and all(c.kwargs.get("WORDS") or c.kwargs.get("M1_DOT") for c in kept)  # bytes replaced
    assert not any(c.kwargs.get("WORDS") for c in qg._prune_int8(every, _named(1, 2050, 2048))) and \
        qg._prune_int8(every, _named(1, 2050, 2048))  # the byte path serves rows of K % 4 != 0 bytes
    assert not words(qg._prune_int8(every, _named(1, 2050, 2048)))  # rows of K % 4 != 0 bytes
    assert not words(qg._prune_int8(every, _named(16, 2048, 2048)))  # M == 1 only
    kept = words(qg._prune_int4(qg._int4_tuned.configs, _named(1, 2048, 2048), GROUP=128))
    assert kept and all(c.kwargs["BK"] % 128 == 0 for c in kept)  # whole groups a tile, never re-tiled
    assert kept == qg._prune_int4(qg._int4_tuned.configs, _named(1, 2048, 2048), GROUP=128)  # bytes replaced
    assert not words(qg._prune_int4(qg._int4_tuned.configs, _named(1, 2016, 2048), GROUP=96))


def test_raw_word_launch_refuses_what_it_cannot_read() -> None:
    x, y = torch.zeros(1, 198), torch.zeros(1, 8)
    with pytest.raises(ValueError, match=r"K % 4 == 0, got K=198"):
        qg.launch_int8(x, torch.zeros(8, 198, dtype=torch.int8), torch.ones(8), y, kernel=qg.int8_gemv_kernel,
                       BN=8, BK=64, SPLIT_K=1, WORDS=True)
    x = torch.zeros(1, 256)
    with pytest.raises(ValueError, match=r"BK=64 group_size=128"):
        qg.launch_int4(x, torch.zeros(8, 128, dtype=torch.uint8), torch.ones(8, 2), torch.ones(8, 2), 128, y,
                       kernel=qg.int4_gemv_kernel, BN=8, BK=64, SPLIT_K=1, WORDS=True)


def _splits_no_group(bk: int, group: int) -> bool:
    """By enumeration: every BK tile (starting at a multiple of BK) lies inside one group, or every group it
    touches lies wholly inside it."""
    for start in range(0, 4 * max(bk, group), bk):
        touched = range(start // group, (start + bk - 1) // group + 1)
        if len(touched) > 1 and any(g * group < start or (g + 1) * group > start + bk for g in touched):
            return False
    return True


def test_tile_rule_matches_enumeration() -> None:
    for bk in (16, 32, 64, 128, 256, 512, 1024):
        for group in range(16, 1040, 16):
            assert qg._tile_fits_groups(bk, group) == _splits_no_group(bk, group), (bk, group)


@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("group", [32, 64, 128, 96])
@pytest.mark.parametrize(("k", "n"), SHAPES)
def test_int4_tiles_never_split_a_group(m: int, group: int, k: int, n: int) -> None:
    # As Triton's autotuner calls it: positional arguments in `named_args`, keyword ones (GROUP) apart.
    kept = qg._prune_int4(qg._int4_tuned.configs, _named(m, k, n), GROUP=group, PREC="ieee", BM=16)
    _check_space(qg._int4_tuned, kept, m, k, n)
    assert all(_splits_no_group(c.kwargs["BK"], group) for c in kept), (group, kept)
    if group & (group - 1):  # 96: tiles inside one group only
        assert all(group % c.kwargs["BK"] == 0 for c in kept), (group, kept)
    elif k >= 2048:  # a power-of-two group: tiles of several whole groups are candidates
        assert any(c.kwargs["BK"] >= 2 * group for c in kept), (group, kept)


def test_raw_int4_launch_refuses_a_tile_that_splits_groups() -> None:
    x, y = torch.zeros(1, 192), torch.zeros(1, 8)
    qweight = torch.zeros(8, 96, dtype=torch.uint8)
    scales = torch.ones(8, 2)
    with pytest.raises(ValueError, match=r"BK=64 .* group_size=96"):
        qg.launch_int4(x, qweight, scales, scales, 96, y, kernel=qg.int4_gemv_kernel, BN=8, BK=64, SPLIT_K=1)


def test_tuned_configs_name_each_shape_and_its_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """What benchmarks record beside their timings: one entry per tuned shape (as the launchers key it),
    with the config it launches; unset launch options are left out."""
    int8 = {(16, 4096, 4096, torch.bfloat16, torch.float32, False, False, 0): {
                "BN": 32, "BK": 256, "SPLIT_K": 1, "num_warps": 4, "num_stages": 4, "maxnreg": None},
            (1, 3072, 2048, torch.bfloat16, torch.float32, False, True, 0): {"BN": 8, "BK": 512, "SPLIT_K": 1},
            (1, 3072, 2048, torch.bfloat16, torch.float32, False, False, 64): {"BN": 16, "BK": 512, "SPLIT_K": 2}}
    int4 = {(1, 2048, 8192, 128, torch.bfloat16, torch.float32, torch.float32, True, False): {"BN": 8, "BK": 1024,
                                                                                             "SPLIT_K": 1,
                                                                                             "WORDS": True}}
    monkeypatch.setattr(qg._int8_launch, "_meta", int8)
    monkeypatch.setattr(qg._int4_launch, "_meta", int4)
    assert qg.tuned_configs() == {
        "int8 M<=16 N=4096 K=4096 x bfloat16 scale float32": {"BN": 32, "BK": 256, "SPLIT_K": 1, "num_warps": 4,
                                                               "num_stages": 4},
        "int8 M<=1 N=3072 K=2048 x bfloat16 scale float32 normed": {"BN": 8, "BK": 512, "SPLIT_K": 1},
        "int8 M<=1 N=3072 K=2048 x bfloat16 scale float32 rope d=64": {"BN": 16, "BK": 512, "SPLIT_K": 2},
        "int4 M<=1 N=2048 K=8192 g=128 x bfloat16 scales float32 zeros float32 gated": {"BN": 8, "BK": 1024,
                                                                                       "SPLIT_K": 1, "WORDS": True}}


def test_dispatch_on_m_and_group() -> None:
    assert qg.serves_int8(1) and qg.serves_int8(16) and not qg.serves_int8(17)
    assert qg.serves_int4(16, 128) and qg.serves_int4(1, 32) and qg.serves_int4(1, 96)
    assert not qg.serves_int4(17, 128) and not qg.serves_int4(1, 16) and not qg.serves_int4(1, 48)


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize(("op", "bk"), [("int8", 128), ("int8_dot", 128), ("int8_even", 128), ("int4", 128),
                                        ("int4", 512), ("int8_words", 512), ("int4_words", 256)])
def test_split_k_kernels_compile_for_sm90(op: str, bk: int, m: int, compile_sm90) -> None:
    """int8 on either M == 1 path (int8_dot: M1_DOT), with and without bounds masks (int8_even: EVEN);
    int4 at BK 128 (a tile inside a group of 128) and 512 (a tile of four whole groups); the word paths
    (M == 1 only; at M == 16 the flag is inert) with their PTX conversion."""
    k, n = 4096, 2048
    words = op.endswith("_words")
    ints = {"M": m, "N": n, "K": k, "K2": k // 2, "stride_xm": k, "stride_xk": 1, "stride_wn": k, "stride_qn": k // 2,
            "stride_sn": k // 128, "stride_zn": k // 128, "stride_ym": n, "M_BUCKET": m}
    meta = {"PREC": "tf32", "BM": 1 if m == 1 else qg.MAX_M, "GROUP": 128, "ASM": True,
            "EVEN": op == "int8_even" or words}
    split = split_k.config(32, bk, 4, 4, 3, m1_dot=op == "int8_dot", words=words)
    if op.startswith("int8"):
        ptrs = {"X": "bf16", "W": "i8", "S": "fp32", "Y": "bf16", "WS": "fp32", "CNT": "i32"}
        compiled = compile_sm90(qg.int8_gemv_kernel, ptrs, {**meta, **split.kwargs}, ints, split.num_warps,
                                split.num_stages)
    else:
        ptrs = {"X": "bf16", "QW": "u8", "S": "fp32", "Z": "fp32", "Y": "bf16", "WS": "fp32", "CNT": "i32"}
        compiled = compile_sm90(qg.int4_gemv_kernel, ptrs, {**meta, **split.kwargs}, ints, split.num_warps,
                                split.num_stages)
    ptx = compiled.asm["ptx"]
    # The combine publishes with release/acquire at GPU scope and reads partials past L1.
    assert "atom.global.gpu.acq_rel.add" in ptx and "ld.global.cg" in ptx
    assert "cvt.rn.f32.s32" not in ptx and "cvt.rn.f32.u32" not in ptx  # no I2F on the weights
    if words and m == 1:  # one PRMT a weight, and whole 16-byte weight vectors a load
        assert "prmt.b32" in ptx and "ld.global.v4.b32" in ptx
    assert compiled.asm["cubin"]


@pytest.mark.parametrize("m1_dot", [False, True])
@pytest.mark.parametrize("m", [1, 16])
def test_dense_gemv_compiles_for_sm90(m: int, m1_dot: bool, compile_sm90) -> None:
    """The dense GEMV's split-K launch (its K range and combine come from `split_k`) through ptxas."""
    k, n = 4096, 2048
    ints = {"M": m, "N": n, "K": k, "stride_xm": k, "stride_xk": 1, "stride_wn": k, "stride_ym": n, "M_BUCKET": m}
    split = split_k.config(32, 128, 4, 4, 3, m1_dot=m1_dot)
    meta = {"PREC": "tf32", "BM": 1 if m == 1 else qg.MAX_M, "EVEN": True, **split.kwargs}
    compiled = compile_sm90(gemv.dense_gemv_kernel, {"X": "bf16", "W": "bf16", "Y": "bf16", "WS": "fp32", "CNT": "i32"},
                            meta, ints, split.num_warps, split.num_stages)
    assert "atom.global.gpu.acq_rel.add" in compiled.asm["ptx"]


@pytest.mark.parametrize(("m1_dot", "words"), [(False, False), (True, False), (False, True)])
def test_unsplit_fallback_keeps_the_configs_path(m1_dot: bool, words: bool) -> None:
    """When no candidate may split a short K, the one kept unsplit still selects the kernel path it named."""
    only = split_k.config(16, 256, 8, 4, 2, m1_dot=m1_dot, words=words)
    kept = split_k.keep_splittable([only], 512, 256)
    assert [c.kwargs for c in kept] == [{"BN": 16, "BK": 256, "SPLIT_K": 1} | ({"M1_DOT": True} if m1_dot else {})
                                        | ({"WORDS": True} if words else {})]
    assert (kept[0].num_warps, kept[0].num_stages) == (4, 2)


def test_gated_quant_matmuls_keep_the_faster_of_gated_and_unfused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode shape's first call on a GPU times the gated GEMV against silu_mul + the plain GEMV and keeps
    the faster; off CUDA the gated one runs (the interpreter's tests); inside a capture an unchosen shape
    stays unfused and nothing is remembered (timings stubbed: no GPU here)."""
    from tessera.kernels.triton import quant_matmul as qm
    from tessera.kernels.triton import tuning

    monkeypatch.setattr(qm, "_gated_wins", {})
    monkeypatch.setattr(qm, "gated_timings", {})
    calls = []
    times = iter([0.004, 0.003, 0.002, 0.005])  # (unfused, gated) for the first key, then the second (ms)
    monkeypatch.setattr(tuning, "graph_bench", lambda fn: (fn(), next(times))[1])
    gated, unfused = (lambda: calls.append("g")), (lambda: calls.append("u"))
    cuda = torch.device("cuda", 0)

    def prefer(key: tuple, device: torch.device) -> bool:
        return qm._prefer_fused(qm._gated_wins, qm.gated_timings, "test", ("unfused", "gated"), key, device, gated,
                                unfused)

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not prefer(("int8", 1), cuda) and not qm._gated_wins and not calls
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert prefer(("int8", 1), cuda)
    assert not prefer(("int4", 2), cuda)
    assert calls == ["g", "u", "u", "g"] * 2  # each tuned once, then timed once
    assert prefer(("int8", 1), cuda) and len(calls) == 8  # remembered
    assert prefer(("int8", 3), torch.device("cpu")) and len(calls) == 8
    assert qm.gated_choices() == {"int8 1": {"backend": "gated", "unfused_us": 4.0, "gated_us": 3.0},
                                  "int4 2": {"backend": "unfused", "unfused_us": 2.0, "gated_us": 5.0}}


def test_the_always_fusion_policy_runs_a_fused_gemv_that_lost_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under TESSERA_DECODE_FUSION=always a shape whose fused GEMV lost its timing runs fused anyway, without timing
    again; the choice and its times stay as measured (the "timed" policy goes back to the winner), and a policy
    that is not one raises ValueError naming the variable and the value."""
    from tessera.kernels import shape_choice
    from tessera.kernels.triton import quant_matmul as qm
    from tessera.kernels.triton import tuning

    monkeypatch.setattr(qm, "_normed_wins", {})
    monkeypatch.setattr(qm, "normed_timings", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    times = iter([0.002, 0.003])  # unfused 2 us, normed 3 us
    monkeypatch.setattr(tuning, "graph_bench", lambda fn: (fn(), next(times))[1])
    calls = []
    normed, unfused = (lambda: calls.append("n")), (lambda: calls.append("u"))
    cuda = torch.device("cuda", 0)

    def prefer() -> bool:
        return qm._prefer_fused(qm._normed_wins, qm.normed_timings, "test", ("unfused", "normed"), ("int8", 1), cuda,
                                normed, unfused)

    assert shape_choice.DECODE_FUSION == "timed"
    assert not prefer() and calls == ["n", "u", "u", "n"]
    monkeypatch.setattr(shape_choice, "DECODE_FUSION", "always")
    assert prefer() and len(calls) == 4  # remembered: nothing timed again
    assert qm.normed_choices() == {"int8 1": {"backend": "unfused", "unfused_us": 2.0, "normed_us": 3.0}}
    monkeypatch.setattr(shape_choice, "DECODE_FUSION", "timed")
    assert not prefer()
    monkeypatch.setattr(shape_choice, "DECODE_FUSION", "sometimes")
    with pytest.raises(ValueError, match="TESSERA_DECODE_FUSION='sometimes'"):
        prefer()


def test_the_always_fusion_policy_takes_a_fused_cuda_gemv_only_where_it_agreed(monkeypatch: pytest.MonkeyPatch) -> None:
    """`shape_choice.take` (what the SwiGLU and rope GEMVs' remembered choices run): the config where the fused GEMV
    won; where it lost, None under "timed" and its config under "always"; None under both where it never agreed
    (a None choice); UNSET before the shape's choice."""
    from tessera.kernels import shape_choice

    table = {"won": shape_choice.Fusion((16, 8, False), True), "lost": shape_choice.Fusion((32, 4, True), False),
             "disagreed": None}
    for policy, lost in (("timed", None), ("always", (32, 4, True))):
        monkeypatch.setattr(shape_choice, "DECODE_FUSION", policy)
        assert shape_choice.take(table["won"]) == (16, 8, False)
        assert shape_choice.take(table["lost"]) == lost
        assert shape_choice.take(table["disagreed"]) is None
        assert shape_choice.take(table.get("new", shape_choice.UNSET)) is shape_choice.UNSET


@pytest.mark.gpu
@pytest.mark.parametrize("k, n", [(1024, 4096), (1024, 6144), (2048, 3072)])
def test_normed_ops_match_the_two_launches_at_decode_shapes_on_the_gpu(k: int, n: int) -> None:
    """At Qwen3-0.6B and Llama-3.2-1B q/k/v and gate/up shapes, bf16, the normalised GEMVs (autotuned, PDL as
    configured, weights declared static) give h bit for bit and y within the op's tolerance of
    rms_norm_residual followed by the plain op."""
    from tessera.kernels import reference, static_weights
    from tessera.kernels.triton import norm
    from tessera.kernels.triton import quant_matmul as qm

    gen = torch.Generator(device="cuda").manual_seed(k + n)
    dev, bf = "cuda", torch.bfloat16
    x, r = (torch.randn(1, k, device=dev, generator=gen, dtype=bf) * 3 for _ in range(2))
    nw = torch.rand(k, device=dev, generator=gen).to(bf) + 0.5
    w = (torch.randn(n, k, device=dev, generator=gen) * k**-0.5).to(bf)
    w_q = torch.randint(-127, 128, (n, k), device=dev, generator=gen, dtype=torch.int8)
    scale = ((torch.rand(n, device=dev, generator=gen) + 0.5) / 127 * k**-0.5).to(bf)
    qweight = reference.pack_int4(torch.randint(0, 16, (n, k), device=dev, generator=gen))
    scales = ((torch.rand(n, k // 128, device=dev, generator=gen) + 0.2) * k**-0.5 / 8).to(bf)
    zeros = torch.randint(0, 16, (n, k // 128), device=dev, generator=gen).to(bf)
    normed, h_ref = norm.rms_norm_residual(x, r, nw, 1e-6)
    cases = {"dense": (lambda: gemv.matmul_dense_normed(x, r, nw, w, 1e-6), lambda: gemv.matmul_dense(normed, w)),
             "int8": (lambda: _normed_launch(qg.launch_int8, x, (w_q, scale), n, (r, nw)),
                      lambda: qm.matmul_int8_weight_only(normed, w_q, scale)),
             "int4": (lambda: _normed_launch(qg.launch_int4, x, (qweight, scales, zeros, 128), n, (r, nw)),
                      lambda: qm.matmul_int4_awq(normed, qweight, scales, zeros, 128))}
    with torch.no_grad(), static_weights():
        for name, (fused, unfused) in cases.items():
            y, h = fused()
            want = unfused()
            torch.cuda.synchronize()
            assert torch.equal(h, h_ref), name
            torch.testing.assert_close(y, want, atol=3e-2, rtol=3e-2, msg=lambda m, name=name: f"{name}: {m}")


def _normed_launch(launch: object, x: torch.Tensor, weights: tuple, n: int, norm: tuple) -> tuple:
    """One normalised launch through `launch` (`launch_int8` or `launch_int4`): (y, h)."""
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    h = torch.empty_like(x)
    launch(x, *weights, y, norm=(*norm, h, 1e-6))
    return y, h


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16])
def test_int8_rope_gemv_every_config_gives_the_separate_launches_bits_on_the_gpu(m: int) -> None:
    """Every int8 config the autotuner may launch with rope at Llama-3.2-1B's q/k/v (32/8 heads of 64, K = 2048):
    y and both caches equal the plain GEMV at the same config followed by the Triton rope and cache write, bit for
    bit, and the slots not written (a padding lane's included) stay as they were."""
    from tessera.kernels import reference
    from tessera.kernels.triton import kv_cache, rope

    hq, hkv, d, k = 32, 8, 64, 2048
    n = (hq + 2 * hkv) * d
    gen = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
    w_q = torch.randint(-127, 128, (n, k), device="cuda", generator=gen, dtype=torch.int8)
    scale = ((torch.rand(n, device="cuda", generator=gen) + 0.5) / 127 * k**-0.5).bfloat16()
    angles = torch.rand(m, d // 2, device="cuda", generator=gen) * 6
    cos = torch.cat([angles.cos(), angles.cos()], 1).bfloat16()
    sin = torch.cat([angles.sin(), angles.sin()], 1).bfloat16()
    caches = torch.randn(2, 2 * m, 4, hkv, d, device="cuda", generator=gen).bfloat16()
    slots = torch.randperm(8 * m, device="cuda", generator=gen)[:m]
    slots[m // 2] = -1
    configs = [c for c in qg._prune_int8(qg._INT8_M1 + qg._INT8_MX, {"M_BUCKET": bucket(m), "N": n, "K": k},
                                         ROPE_D=d)]
    assert configs and all(c.kwargs["BN"] <= d for c in configs)
    for c in configs:
        meta = {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
        plain = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        qg.launch_int8(x, w_q, scale, plain, kernel=qg.int8_gemv_kernel, **meta)
        q, kk, v = reference.qkv_heads(plain, hq, hkv)
        q, kk = rope.rope(q, kk, cos, sin)
        want_k, want_v = caches[0].clone(), caches[1].clone()
        kv_cache.kv_cache_write(kk, v, want_k, want_v, slots)
        got = torch.empty_like(plain)
        got_k, got_v = caches[0].clone(), caches[1].clone()
        qg.launch_int8(x, w_q, scale, got, kernel=qg.int8_gemv_kernel, rope=(cos, sin, got_k, got_v, slots, hq, hkv),
                       **meta)
        torch.cuda.synchronize()
        assert torch.equal(got, torch.cat([q.reshape(m, -1), kk.reshape(m, -1), v.reshape(m, -1)], 1)), c
        assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v), c


def test_a_rope_launch_names_what_its_epilogue_cannot_take() -> None:
    """`launch_int8(..., rope=...)` refuses, before launching, a weight that is not q/k/v heads of a head_dim that
    is a multiple of 16, mismatched tables, caches or slots, a raw tile wider than a head, and a strided y."""
    m, hq, hkv, d, k = 2, 2, 1, 16, 64
    n = (hq + 2 * hkv) * d
    x, w_q, scale = torch.randn(m, k), torch.zeros(n, k, dtype=torch.int8), torch.ones(n)
    cos, sin = torch.ones(m, d), torch.zeros(m, d)
    caches = torch.zeros(2, 3, 4, hkv, d)
    slots = torch.tensor([0, 5])
    y = torch.empty(m, n)

    def refused(match: str, **changed: object) -> None:
        args = {"cos": cos, "sin": sin, "k_cache": caches[0], "v_cache": caches[1], "slots": slots, "hq": hq,
                "hkv": hkv} | changed
        rope = tuple(args.values())
        with pytest.raises(ValueError, match=match):
            qg.launch_int8(x, w_q, scale, y, rope=rope)

    refused(r"n_q_heads=3, n_kv_heads=1", hq=3)
    refused(r"cos \(2, 8\)", cos=cos[:, :8])
    refused(r"sin \(2, 16\)/torch.float16", sin=sin.half())
    refused(r"v_cache \(3, 4, 2, 8\)", v_cache=caches[1].view(3, 4, 2, 8))
    refused(r"slots \(2,\)/torch.int32", slots=slots.int())
    w8 = torch.zeros(4 * 8, k, dtype=torch.int8)
    with pytest.raises(ValueError, match="head_dim=8 is not a multiple of 16"):
        qg.launch_int8(x, w8, torch.ones(32), torch.empty(m, 32), rope=(torch.ones(m, 8), torch.zeros(m, 8),
                                                                          torch.zeros(3, 4, 1, 8),
                                                                          torch.zeros(3, 4, 1, 8), slots, 2, 1))
    rope = (cos, sin, caches[0], caches[1], slots, hq, hkv)
    with pytest.raises(ValueError, match="BN=32 is wider than head_dim=16"):
        qg.launch_int8(x, w_q, scale, y, kernel=qg.int8_gemv_kernel, rope=rope, BN=32, BK=64, SPLIT_K=1)
    with pytest.raises(ValueError, match=r"y .* is not contiguous"):
        qg.launch_int8(x, w_q, scale, torch.empty(n, m).T, rope=rope)
