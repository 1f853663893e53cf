"""`persistent_decode.decode_layers_kernel` through ptxas for sm_90 at the two serving shapes, with float, int8
and int4 weights, one or two weight tiles in flight: the grid barrier arrives with acquire-release and polls
with acquire at GPU scope (one thread's load, or with POLL 1 every thread's), the per-head merge counter resets, the
activations are read past L1, and with L2_AHEAD the weights ahead are asked of the L2 (the byte ranges
checked under the interpreter by prefetch_plan_check.py). (Its arithmetic is checked against the model's per-op path in
tests/model/test_persistent.py.)"""

from __future__ import annotations

import re

import pytest

triton = pytest.importorskip("triton")


PTRS = {"X": "fp32", "PTRS": "i64", "A": "bf16", "O": "bf16", "GU": "bf16", "PART": "fp32", "HCNT": "i32",
        "HREADY": "i32", "CNT": "i32", "FLAG": "i32", "COS": "bf16", "SIN": "bf16", "SLOT": "i64", "TABLE": "i32",
        "CTX": "i32", "TIMES": "i64"}


def _ptx(compile_sm90, d: int, hkv: int, g: int, hd: int, di: int, **consts) -> str:
    """The kernel's PTX over 132 programs (the H200's SMs) at 8 warps, 28 layers, the model's tile heights."""
    from tessera.kernels.triton import persistent_decode as pd

    p, nqkv, do, di_p = 132, (hkv * g + 2 * hkv) * hd, hkv * g * hd, triton.next_power_of_2(di)
    pk = 2 if consts.get("QUANT", 0) == 2 else 1  # int4 tiles hold two weights a byte
    meta = {"SCALE": hd ** -0.5, "L": 28, "D": d, "HKV": hkv, "G": g, "HD": hd, "DI": di, "DI_P": di_p, "BS": 16,
            "S": 16, "SP": 16, "BT": 32, "BN_QKV": pd.tile_rows(nqkv, d // pk, p),
            "BN_O": pd.tile_rows(d, do // pk, p), "BN_GU": pd.tile_rows(2 * di, d // pk, p),
            "BN_D": pd.tile_rows(d, di_p // pk, p), "QK_NORM": True, "PREFETCH": True, "SPIN_LIMIT": 1 << 16,
            "GS": 128, **consts}
    return compile_sm90(pd.decode_layers_kernel, PTRS, meta, {}, 8, 1).asm["ptx"]


@pytest.mark.parametrize("depth", [1, 2], ids=["depth1", "depth2"])
@pytest.mark.parametrize("quant", [0, 1, 2], ids=["float", "int8", "int4"])
@pytest.mark.parametrize(("d", "hkv", "g", "hd", "di"), [(1024, 8, 2, 128, 3072), (2048, 8, 4, 64, 8192)],
                         ids=["qwen3-0.6b", "llama-3.2-1b"])
def test_decode_layers_kernel_compiles_for_sm90(d: int, hkv: int, g: int, hd: int, di: int, quant: int, depth: int,
                                                compile_sm90) -> None:
    ptx = _ptx(compile_sm90, d, hkv, g, hd, di, QUANT=quant, DEPTH=depth)
    # arrivals (and the merge counter) acquire and release in one atomic; polls acquire
    assert "atom.global.gpu.acq_rel.add" in ptx and "ld.global.gpu.acquire.b32" in ptx
    assert "atom.global.gpu.relaxed.exch" in ptx and "ld.global.cg" in ptx
    # weight tiles load 16 bytes a thread (the table's pointers are declared aligned), and int4 scales and
    # zeros once a group: element-by-element loads were 622 (float) and 259 (int4) before either
    scalar = len(re.findall(r"ld\.global\.b(?:8|16|32)\b", ptx))
    assert ptx.count("ld.global.v4.b32") >= 16 and scalar < 64, (ptx.count("ld.global.v4.b32"), scalar)
    assert "ld.acquire.gpu" not in ptx  # POLL 0 (the default): one thread's load, not the inline PTX of POLL 1
    assert "%clock64" not in ptx and "%globaltimer" not in ptx  # TIMED 0: no stamps
    assert "cp.async.bulk.prefetch" not in ptx  # L2_AHEAD 0: no prefetch
    if quant:  # int8 and int4 words become floats by PRMT and a subtraction: no I2F (224 to 448 of them before)
        assert not re.search(r"cvt\.rn\.f32\.[su](?:8|16|32)\b", ptx) and "prmt.b32" in ptx


@pytest.mark.parametrize("ready", [0, 1], ids=["barriers", "head-ready"])
def test_acquire_load_poll_and_stamps_compile_for_sm90(ready: int, compile_sm90) -> None:
    """POLL 1: the barrier polls with acquire loads in every thread, and no atomic or block-wide sync sits in
    its poll loop (POLL 0 broadcasts each poll's atomic through shared memory). TIMED 1: the clock stamps.
    HEAD_READY 1: one of a layer's barriers becomes attention's wait on its head's count, polled the same way."""
    ptx = _ptx(compile_sm90, 1024, 8, 2, 128, 3072, QUANT=0, DEPTH=1, POLL=1, TIMED=1, HEAD_READY=ready)
    assert "atom.global.gpu.acq_rel.add" in ptx  # the arrival
    loops = re.findall(r"Inner Loop Header(.*?)bra", ptx, flags=re.S)
    polls = [body for body in loops if "ld.acquire.gpu.global.b32" in body]
    assert len(polls) == 5, len(polls)  # the five barriers of a layer (four, and the wait on a head)
    assert not any("bar.sync" in body or "atom." in body for body in polls)
    assert ptx.count("%clock64") == 10 + 2 and ptx.count("%globaltimer") == 2  # a layer's 10 and the launch's


@pytest.mark.parametrize("ahead", [1, 2])
def test_l2_ahead_prefetches_at_each_projection(ahead: int, compile_sm90) -> None:
    """L2_AHEAD a: a bulk L2 prefetch where each of a layer's four projections is reached, and a more at the
    start (the projections after layer 0's q/k/v); int4 also asks for each projection's scales and zeros."""
    count = {q: _ptx(compile_sm90, 1024, 8, 2, 128, 3072, QUANT=q, L2_AHEAD=ahead).count(
        "cp.async.bulk.prefetch.L2.global") for q in (0, 2)}
    assert count[0] == 4 + ahead and count[2] == 3 * count[0], count


def test_l2_prefetch_asks_for_each_programs_own_tiles(run_check) -> None:
    run_check("prefetch_plan_check.py", "prefetch-plan-ok", seeded=False, interpret="always")


def test_poll_2_sleeps_between_atomic_polls(compile_sm90) -> None:
    """POLL 2: the five barriers of a layer poll with atomics, as POLL 0, and each poll loop holds a nanosleep."""
    ptx = _ptx(compile_sm90, 1024, 8, 2, 128, 3072, QUANT=0, DEPTH=1, POLL=2)
    loops = re.findall(r"Inner Loop Header(.*?)bra", ptx, flags=re.S)
    naps = [body for body in loops if "nanosleep.u32" in body]
    assert len(naps) == 5 and all("ld.global.gpu.acquire.b32" in body for body in naps), len(naps)
    assert "ld.acquire.gpu" not in ptx


def test_tile_rows_bounds_registers_and_spreads_tiles() -> None:
    from tessera.kernels.triton.persistent_decode import tile_rows

    assert tile_rows(4096, 1024, 132) == 16  # 16 x 1024 weights a tile, 256 tiles over 132 programs
    assert tile_rows(1024, 4096, 132) == 4
    assert tile_rows(8, 1024, 132) == 1  # fewer rows than programs: one row a tile
    assert tile_rows(1 << 20, 64, 1) == 256  # one program: the register bound alone
