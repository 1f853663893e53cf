"""Decode-shape (M <= 16) weight-only quantized matmuls: int8 per-channel and AWQ int4, split along K.

At small M these matmuls only stream weights, so the kernels are built for bandwidth: each program
reads a [BN, BK] weight tile contiguously along K (int8 rows, or int4 bytes packed along K), and the
K range is split over SPLIT_K programs so that a small N still puts enough programs in flight.
M == 1 multiplies on the CUDA cores (broadcast-multiply, then a sum over K: no tensor-core tile is
wasted on padding rows); 1 < M <= 16 pads M to 16 and uses `tl.dot`. For int8 at M == 1 the autotuner
also weighs the padded `tl.dot` path (configs with M1_DOT) on matrices of at least 2**25 weights: its
loads are pipelined through shared memory, which wins there (8192 x 8192 on an H200: 21.3 us against 25.9).

At M == 1 the CUDA-core path is bound by its integer work, not by memory: unpacking byte by byte costs
about three integer ops a weight, and an H200 then runs int8 and int4 alike at about 4e12 weights/s, so
int4's half of the bytes buys little. The word path (WORDS configs, M == 1) reads the weights as int32
words and builds each weight's float bits with one PRMT (inline PTX; the same bits by shifts under the
interpreter), reads bf16 x as words split by bit ops, and loads the next tile while it multiplies this
one. On the H200 it beat the byte path at every Llama-3.2-1B decode shape: the int8 projections of one
step 547 -> 519 us, int4 666 -> 561 us (`benchmarks/probe_quant_gemv.py`, docs/kernels.md); int8's LM
head reads at the copy ceiling. Where it applies, its configs replace the byte path's at M == 1.

Split-K partials are combined inside the same launch, in split order (`split_k`, shared with the dense
GEMV), and the autotuned config is remembered per shape so a call skips the autotuner (`TunedLaunch`).

int8: the per-output-channel scale is applied once per program, before the partials are combined.
int4: a K tile never splits a group. Either it lies inside one group (BK divides the group size) or
it holds BK / GROUP whole groups (a power-of-two group; tiles start at multiples of BK, so on group
boundaries). Each group in a tile applies its scale and zero once: s_g * (sum_k q_k x_k - z_g * sum_k x_k),
with both sums taken per group. Multi-group tiles let a program read long row segments (BK / 2 bytes a
row per iteration) instead of stopping at the group's GROUP / 2 bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tessera.kernels.support import qkv_rope_epilogue_reasons, triton_interpreting
from tessera.kernels.triton import pdl
from tessera.kernels.triton.rope import rotate_pair
from tessera.kernels.triton.split_k import (
    MAX_M,
    combine,
    combine_and_store,
    config,
    even,
    fits_k,
    grid,
    k_range,
    keep_splittable,
    max_split,
    workspace,
)
from tessera.kernels.triton.tiles import divide, inv_sqrt, silu_mul_f32
from tessera.kernels.triton.tuned_launch import TunedLaunch
from tessera.kernels.triton.tuning import autotune, bucket, dot_precision, graph_bench


def _wcfg(bn: int, bk: int, split: int, warps: int) -> triton.Config:
    """An M == 1 config of the word paths (weights read as int32 words, converted by PRMT, the next tile
    loaded while this one is multiplied). Their loops hold no tl.dot, so Triton pipelines nothing: one stage."""
    return config(bn, bk, split, warps, 1, words=True)


# Weight bytes per program and iteration are BN * BK (int8) or BN * BK / 2 (int4); the lists span
# few-wide-rows (many programs, long contiguous reads) to many-rows, with and without split-K.
_INT8_M1 = [config(4, 1024, 1, 4, 2), config(8, 512, 1, 4, 3), config(8, 1024, 1, 4, 2), config(16, 256, 1, 4, 3),
            config(16, 512, 1, 4, 2), config(16, 1024, 1, 8, 2), config(32, 256, 1, 8, 2), config(8, 512, 2, 4, 3),
            config(8, 512, 4, 4, 3), config(16, 512, 4, 4, 2), config(16, 256, 8, 4, 3), config(32, 512, 4, 8, 2),
            config(8, 1024, 1, 4, 1), config(4, 2048, 1, 4, 1), config(8, 2048, 1, 8, 1),
            config(64, 128, 4, 4, 4, True), config(64, 256, 4, 4, 3, True), config(64, 128, 1, 4, 4, True),
            config(64, 256, 2, 4, 4, True), config(32, 256, 4, 4, 4, True),
            # Word path: every config that came within 3% of the best at some Llama-3.2-1B decode shape or
            # square of two H200 sweeps (`benchmarks/probe_quant_gemv.py`), and a wide spare.
            _wcfg(4, 1024, 1, 4), _wcfg(4, 2048, 1, 4), _wcfg(8, 512, 1, 4), _wcfg(8, 1024, 1, 4),
            _wcfg(32, 512, 1, 8), _wcfg(8, 512, 4, 4), _wcfg(16, 256, 8, 4), _wcfg(16, 512, 4, 4)]
# The tl.dot configs; the last five came out on top of H200 sweeps (CUDA-graph time, L2 cold) at
# K = N = 4096 and 8192 and the Llama-3.2-1B gate/up and down shapes (64 x 128 split 2: second at 8192^2,
# 0.7% behind 32 x 256, probe-int8-gemv-m16-wleft-nvidia-h200-2026-12-03.json).
_INT8_MX = [config(16, 256, 1, 4, 4), config(16, 512, 1, 4, 3), config(32, 256, 1, 4, 4), config(32, 512, 1, 4, 3),
            config(64, 128, 1, 4, 4), config(64, 256, 1, 4, 3), config(32, 1024, 1, 8, 2), config(16, 512, 2, 4, 3),
            config(16, 256, 4, 4, 4), config(32, 256, 4, 4, 4), config(64, 256, 4, 4, 3), config(32, 512, 8, 4, 3),
            config(64, 128, 4, 4, 4), config(64, 256, 2, 4, 4), config(32, 256, 2, 4, 4), config(64, 512, 1, 4, 4),
            config(64, 128, 2, 4, 4)]
# int4 tiles within one group (128 in practice, 64 bytes a row) take many rows; multi-group tiles (256 to
# 1024 wide with a power-of-two group) read 128 to 512 bytes a row, as the int8 tiles do, from fewer rows.
_INT4_M1 = [config(32, 128, 1, 4, 3), config(64, 128, 1, 4, 3), config(128, 128, 1, 4, 3), config(128, 128, 1, 8, 3),
            config(256, 128, 1, 8, 2), config(64, 256, 1, 4, 2), config(32, 128, 4, 4, 3), config(64, 128, 2, 4, 3),
            config(64, 128, 4, 4, 3), config(128, 128, 4, 8, 3), config(32, 128, 8, 4, 3), config(64, 128, 8, 4, 3),
            config(8, 512, 1, 4, 3), config(8, 1024, 1, 4, 2), config(16, 512, 1, 4, 2), config(16, 1024, 1, 8, 2),
            config(32, 256, 1, 4, 3), config(32, 512, 1, 8, 2), config(16, 512, 4, 4, 2), config(32, 256, 4, 4, 3),
            config(8, 512, 8, 4, 3),
            # Word path, as for int8: the near-best of two H200 sweeps. Most hold many rows a thread, so
            # each x word loaded serves more weights: x loads from L1, not the FMAs, bounded the narrow
            # tiles (0.6 loads a weight at 16 x 1024, 0.17 at 128 x 128).
            _wcfg(8, 1024, 1, 4), _wcfg(8, 512, 4, 4), _wcfg(16, 1024, 1, 8), _wcfg(16, 512, 1, 4),
            _wcfg(32, 256, 1, 4), _wcfg(128, 128, 1, 4), _wcfg(128, 128, 4, 4), _wcfg(128, 128, 8, 4),
            _wcfg(128, 256, 1, 8)]
_INT4_MX = [config(16, 256, 1, 4, 4), config(32, 256, 1, 4, 4), config(64, 128, 1, 4, 4), config(64, 256, 1, 4, 3),
            config(128, 128, 1, 8, 3), config(16, 512, 1, 4, 3), config(16, 256, 4, 4, 4), config(32, 256, 2, 4, 4),
            config(32, 256, 4, 4, 4), config(64, 128, 4, 4, 4), config(64, 256, 8, 4, 3), config(32, 128, 8, 4, 4),
            config(16, 1024, 1, 8, 2), config(32, 512, 1, 8, 3), config(16, 512, 4, 4, 3), config(32, 512, 2, 8, 3)]
#: Under the interpreter: one small config that still exercises the split-K combine.
_INTERPRET = config(16, 32, 2, 4, 1)


def _words_fit(bk: int, k: int, group: int | None = None) -> bool:
    """Whether a word-path tile can read this matrix: int8 rows of whole int32 words (K % 4 == 0); int4
    rows of whole words (K % 8 == 0) and tiles of whole groups (BK % group == 0)."""
    return k % 4 == 0 if group is None else k % 8 == 0 and bk % group == 0


#: Weight elements from which M == 1 also tries the padded tl.dot path. Below it the CUDA-core path won
#: every shape of an H200 sweep in CUDA-graph time (4096 x 4096: 7.9 us against 8.6), while the
#: autotuner's own timing loop, unlike a graph replay, preferred the dot path there.
M1_DOT_MIN_ELEMENTS = 1 << 25


def normed(named_args: dict, kwargs: dict) -> bool:
    """Whether an autotuned launch is a normalised one (NORM, passed by keyword like GROUP)."""
    return bool(kwargs["NORM"] if "NORM" in kwargs else named_args.get("NORM", False))


def _prune_int8(configs: list, named_args: dict, **kwargs: object) -> list:
    pool = _INT8_M1 if named_args["M_BUCKET"] == 1 else _INT8_MX
    # The tl.dot path pads rows and takes no NORM: a normalised launch leaves it out.
    small = named_args["N"] * named_args["K"] < M1_DOT_MIN_ELEMENTS or normed(named_args, kwargs)
    # Where the word path applies (whole int32 words a row) it replaces the byte path at M == 1: it won or
    # tied every shape of the H200 sweeps, and fewer candidates make a new shape's tuning shorter.
    words_ok = named_args["M_BUCKET"] == 1 and _words_fit(0, named_args["K"])
    mine = list(dict.fromkeys(c for c in configs if c in pool and not (small and c.kwargs.get("M1_DOT"))
                              and (c.kwargs.get("WORDS", False) == words_ok or c.kwargs.get("M1_DOT"))))
    rope_d = int(kwargs["ROPE_D"] if "ROPE_D" in kwargs else named_args.get("ROPE_D", 0))
    if rope_d:  # BN <= head_dim (both pools hold tiles of 16 rows or fewer, and rope takes head_dim % 16 == 0)
        mine = [c for c in mine if c.kwargs["BN"] <= rope_d]
    return keep_splittable(fits_k(mine, named_args["K"]), named_args["N"], named_args["K"])


def _rope_tile_reasons(meta: dict, n: int, rope: Rope) -> list[str]:
    """Why a raw launch's tile cannot hold rope pairs of one head (BN <= head_dim)."""
    heads = rope[5] + 2 * rope[6]
    if heads > 0 and n % heads == 0 and int(meta["BN"]) > n // heads:
        return [f"rope: BN={meta['BN']} is wider than head_dim={n // heads}"]
    return []


def _tile_fits_groups(bk: int, group: int) -> bool:
    """Whether a K tile of `bk` (starting at a multiple of `bk`) never splits a group: it lies inside
    one group (bk divides group), or holds whole groups of a power-of-two group (group divides bk)."""
    return group % bk == 0 or (group & (group - 1) == 0 and bk % group == 0)


def _group_tile(bk: int, group: int) -> int:
    """`bk` itself where it fits the groups, else the largest power-of-two tile dividing `group`."""
    return bk if _tile_fits_groups(bk, group) else min(bk, group & -group)


def _prune_int4(configs: list, named_args: dict, **kwargs: object) -> list:
    # GROUP is passed by keyword, and Triton's autotuner hands keyword arguments over separately.
    group = kwargs["GROUP"] if "GROUP" in kwargs else named_args["GROUP"]
    n, k = named_args["N"], named_args["K"]
    pool = _INT4_M1 if named_args["M_BUCKET"] == 1 else _INT4_MX
    seen, kept = set(), []
    for c in (c for c in configs if c in pool):
        words = c.kwargs.get("WORDS", False)
        if words and not _words_fit(c.kwargs["BK"], k, group):
            continue
        bk = c.kwargs["BK"] if words else _group_tile(c.kwargs["BK"], group)
        key = (c.kwargs["BN"], bk, c.kwargs["SPLIT_K"], c.num_warps, c.num_stages, False, words)
        if key not in seen:
            seen.add(key)
            kept.append(config(*key))
    if any(c.kwargs.get("WORDS") for c in kept):  # the word path applies: it replaces the byte path (as int8)
        kept = [c for c in kept if c.kwargs.get("WORDS")]
    return keep_splittable(fits_k(kept, k), n, k)


@triton.jit
def _exact_f32(v, OFFSET: tl.constexpr):
    """float32(v - OFFSET) for int32 v in [0, 2**23), exactly: v goes in the mantissa of 2**23, then one
    float subtraction. An integer op and a float add instead of I2F, which runs at 1/8 of the FMA rate
    and would bound the decode path."""
    return (v | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFFSET)


@triton.jit
def _s8_words(v, ASM: tl.constexpr):
    """int32 words of four int8 weights (byte b is k = 4j + b) -> four float32 tensors, exactly. With ASM one
    PRMT per weight builds the float bits 0x4B0000uu (2**23 + w + 128; the XOR that biases the bytes takes
    one op per word), then one subtraction: a third of the integer ops of unpacking byte by byte."""
    if ASM:
        u0, u1, u2, u3 = tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t, m;
            xor.b32 t, $4, 0x80808080;
            mov.b32 m, 0x4B000000;
            prmt.b32 $0, t, m, 0x7540;
            prmt.b32 $1, t, m, 0x7541;
            prmt.b32 $2, t, m, 0x7542;
            prmt.b32 $3, t, m, 0x7543;
            }""",
            constraints="=r,=r,=r,=r,r", args=[v], dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True,
            pack=1)
    else:  # the interpreter runs no PTX: the same bits, byte by byte
        t = v ^ -2139062144  # 0x80808080: each byte biased by 128
        u0 = (t & 0xFF) | 0x4B000000
        u1 = ((t >> 8) & 0xFF) | 0x4B000000
        u2 = ((t >> 16) & 0xFF) | 0x4B000000
        u3 = ((t >> 24) & 0xFF) | 0x4B000000
    return (u0.to(tl.float32, bitcast=True) - 8388736.0, u1.to(tl.float32, bitcast=True) - 8388736.0,
            u2.to(tl.float32, bitcast=True) - 8388736.0, u3.to(tl.float32, bitcast=True) - 8388736.0)


@triton.jit
def _u4_words(v, ASM: tl.constexpr):
    """int32 words of eight packed int4 codes (nibble i is k = 8j + i) -> eight float32 tensors 2**23 + q,
    exact; the caller subtracts 2**23. With ASM: two masks a word, then one PRMT a code."""
    if ASM:
        q0, q1, q2, q3, q4, q5, q6, q7 = tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 lo, hi, m;
            and.b32 lo, $8, 0x0F0F0F0F;
            shr.u32 hi, $8, 4;
            and.b32 hi, hi, 0x0F0F0F0F;
            mov.b32 m, 0x4B000000;
            prmt.b32 $0, lo, m, 0x7540;
            prmt.b32 $1, hi, m, 0x7540;
            prmt.b32 $2, lo, m, 0x7541;
            prmt.b32 $3, hi, m, 0x7541;
            prmt.b32 $4, lo, m, 0x7542;
            prmt.b32 $5, hi, m, 0x7542;
            prmt.b32 $6, lo, m, 0x7543;
            prmt.b32 $7, hi, m, 0x7543;
            }""",
            constraints="=r,=r,=r,=r,=r,=r,=r,=r,r", args=[v], dtype=(tl.int32,) * 8, is_pure=True, pack=1)
    else:
        q0 = (v & 0xF) | 0x4B000000
        q1 = ((v >> 4) & 0xF) | 0x4B000000
        q2 = ((v >> 8) & 0xF) | 0x4B000000
        q3 = ((v >> 12) & 0xF) | 0x4B000000
        q4 = ((v >> 16) & 0xF) | 0x4B000000
        q5 = ((v >> 20) & 0xF) | 0x4B000000
        q6 = ((v >> 24) & 0xF) | 0x4B000000
        q7 = ((v >> 28) & 0xF) | 0x4B000000
    return (q0.to(tl.float32, bitcast=True), q1.to(tl.float32, bitcast=True), q2.to(tl.float32, bitcast=True),
            q3.to(tl.float32, bitcast=True), q4.to(tl.float32, bitcast=True), q5.to(tl.float32, bitcast=True),
            q6.to(tl.float32, bitcast=True), q7.to(tl.float32, bitcast=True))


@triton.jit
def _load(ptrs, mask):
    """`ptrs` loaded whole (mask None: all in bounds, no predicates) or masked with zeros."""
    if mask is None:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=mask, other=0)


@triton.jit
def _xg(ptrs, mask, UP, GATED: tl.constexpr):
    """x at `ptrs` in x's dtype (mask None: all in bounds; masked lanes 0). GATED: x = silu_mul(gate, up), the
    gate at `ptrs` and up UP elements further (a fused gate/up output), rounded as the `silu_mul` op rounds,
    so the product is the unfused one's bit for bit."""
    if GATED:
        DT: tl.constexpr = ptrs.dtype.element_ty
        return silu_mul_f32(_load(ptrs, mask).to(tl.float32), _load(ptrs + UP, mask).to(tl.float32), DT).to(DT)
    else:
        return _load(ptrs, mask)


#: Elements of the row `norm_prologue` reads a step.
_NORM_BLOCK = tl.constexpr(1024)


@triton.jit
def norm_prologue(X, R, H, K, eps, NORM: tl.constexpr):
    """NORM: 1 / rms(h) of the row h = x + residual (x at X, the residual at R, both contiguous), h rounded to
    x's dtype and the statistics taken as `rms_norm_residual` takes them; every program reads the whole row,
    and the first program (0, 0) also stores h to H. Called after the PDL wait. Else 1.0."""
    if NORM:
        DT: tl.constexpr = X.dtype.element_ty
        PRECISE: tl.constexpr = DT == tl.float32
        first = (tl.program_id(0) == 0) & (tl.program_id(1) == 0)
        acc = tl.zeros((_NORM_BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, _NORM_BLOCK):
            offs = k0 + tl.arange(0, _NORM_BLOCK)
            ok = offs < K
            h = (tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
                 + tl.load(R + offs, mask=ok, other=0.0).to(tl.float32)).to(DT)
            tl.store(H + offs, h, mask=ok & first)
            hf = h.to(tl.float32)
            acc += hf * hf
        return inv_sqrt(divide(tl.sum(acc, axis=0), K, PRECISE) + eps, PRECISE)
    else:
        return 1.0


@triton.jit
def _normed(x, r, w, rstd, DT: tl.constexpr):
    """rms_norm_residual's output element from float32 x, residual, norm weight and 1 / rms, rounded as that
    op rounds it (h = x + r to DT, then h * rstd * w to DT), as float32."""
    h = (x + r).to(DT).to(tl.float32)
    return (h * rstd * w).to(DT).to(tl.float32)


@triton.jit
def _xr(X, koffs, mask, stride_xk, UP, GATED: tl.constexpr, R, NW, rstd, NORM: tl.constexpr):
    """x at k = `koffs` in x's dtype as `_xg` reads it; NORM: rms_norm_residual(x, residual, NW)'s output there
    instead (x, the residual R and the norm weight NW contiguous; `rstd` from `norm_prologue`)."""
    if NORM:
        DT: tl.constexpr = X.dtype.element_ty
        x = _load(X + koffs, mask).to(tl.float32)
        r = _load(R + koffs, mask).to(tl.float32)
        w = _load(NW + koffs, mask).to(tl.float32)
        return _normed(x, r, w, rstd, DT).to(DT)
    else:
        return _xg(X + koffs * stride_xk, mask, UP, GATED)


@triton.jit
def _x4(X, ks, mask, stride_xk, UP, GATED: tl.constexpr, R=None, NW=None, rstd=1.0, NORM: tl.constexpr = False):
    """`_x4_plain`, of silu_mul(gate, up) when GATED (the gate at X, up UP elements further), of
    rms_norm_residual(x, R, NW) when NORM (`_xr`)."""
    if NORM:
        DT: tl.constexpr = X.dtype.element_ty
        x0, x1, x2, x3 = _x4_plain(X, ks, mask, stride_xk)
        r0, r1, r2, r3 = _x4_plain(R, ks, mask, 1)
        w0, w1, w2, w3 = _x4_plain(NW, ks, mask, 1)
        return (_normed(x0, r0, w0, rstd, DT), _normed(x1, r1, w1, rstd, DT), _normed(x2, r2, w2, rstd, DT),
                _normed(x3, r3, w3, rstd, DT))
    elif GATED:
        DT: tl.constexpr = X.dtype.element_ty
        g0, g1, g2, g3 = _x4_plain(X, ks, mask, stride_xk)
        u0, u1, u2, u3 = _x4_plain(X + UP, ks, mask, stride_xk)
        return silu_mul_f32(g0, u0, DT), silu_mul_f32(g1, u1, DT), silu_mul_f32(g2, u2, DT), silu_mul_f32(g3, u3, DT)
    else:
        return _x4_plain(X, ks, mask, stride_xk)


@triton.jit
def _x4_plain(X, ks, mask, stride_xk):
    """x[ks + b] for b = 0..3 as float32 (ks: multiples of 4; mask None: all in bounds). bf16 x (contiguous,
    4-byte aligned: the launch makes it so) comes as two int32 words, split into halves by bit ops."""
    if X.dtype.element_ty == tl.bfloat16:
        X32 = X.to(tl.pointer_type(tl.int32), bitcast=True)
        a = _load(X32 + ks // 2, mask)
        b = _load(X32 + ks // 2 + 1, mask)
        return ((a << 16).to(tl.float32, bitcast=True), (a & -65536).to(tl.float32, bitcast=True),
                (b << 16).to(tl.float32, bitcast=True), (b & -65536).to(tl.float32, bitcast=True))
    else:
        return (_load(X + ks * stride_xk, mask).to(tl.float32), _load(X + (ks + 1) * stride_xk, mask).to(tl.float32),
                _load(X + (ks + 2) * stride_xk, mask).to(tl.float32),
                _load(X + (ks + 3) * stride_xk, mask).to(tl.float32))


@triton.jit
def _fma4(acc, w0, w1, w2, w3, x0, x1, x2, x3):
    """acc + w0 x0 + ... + w3 x3 as a chain of four FMAs (x broadcast along the rows)."""
    acc += w0 * x0[None, :]
    acc += w1 * x1[None, :]
    acc += w2 * x2[None, :]
    acc += w3 * x3[None, :]
    return acc


@triton.jit
def _int8_words_tile(acc2, X, v, t, t_end, last, offs_j, stride_xk, UP, BK: tl.constexpr, ASM: tl.constexpr,
                     GATED: tl.constexpr, R, NW, rstd, NORM: tl.constexpr):
    """acc2 plus tile t's products (its words `v`, loaded ahead), or acc2 itself when t >= t_end; x is read
    at the tile clamped to `last`, so in bounds either way."""
    ks = tl.minimum(t, last) * BK + 4 * offs_j
    x0, x1, x2, x3 = _x4(X, ks, None, stride_xk, UP, GATED, R, NW, rstd, NORM)
    w0, w1, w2, w3 = _s8_words(v, ASM)
    return tl.where(t < t_end, _fma4(acc2, w0, w1, w2, w3, x0, x1, x2, x3), acc2)


@triton.jit
def _int8_words_m1(X, W, N, K, stride_xk, stride_wn, pid_n, k_start, k_end, UP, BN: tl.constexpr, BK: tl.constexpr,
                   EVEN: tl.constexpr, ASM: tl.constexpr, ENTER: tl.constexpr = 0, GATED: tl.constexpr = False,
                   R=None, NW=None, H=None, eps=0.0, rstd=1.0, NORM: tl.constexpr = False, ROPE_D: tl.constexpr = 0):
    """acc [1, BN] of x[1, K] @ w_q.T over [k_start, k_end) (K % 4 == 0), the weights read as int32 words.
    EVEN: the next tile's words are loaded before this tile is multiplied (one tile in flight per thread
    while it computes; the address is clamped, so the last iteration re-reads its own tile). ENTER (EVEN
    only): the PDL mode to enter once the first tile (four in mode 4) is loaded (`pdl`, early weights); 0
    when entered. NORM: x is rms_norm_residual(x, R, NW)'s output (`_xr`): `rstd` as given, or, with ENTER,
    from `norm_prologue` after the wait. ROPE_D: the tile's rows are rope pairs (`tile_rows`)."""
    BW: tl.constexpr = BK // 4
    offs_n = tile_rows(pid_n, BN, ROPE_D)
    n_ok = offs_n < N
    offs_j = tl.arange(0, BW)
    W32 = W.to(tl.pointer_type(tl.int32), bitcast=True)
    row_words = stride_wn // 4
    if ROPE_D == 0:
        w_ptrs = W32 + (pid_n * BN).to(tl.int64) * row_words + tl.arange(0, BN)[:, None] * row_words + offs_j[None, :]
    else:
        w_ptrs = W32 + offs_n.to(tl.int64)[:, None] * row_words + offs_j[None, :]
    acc2 = tl.zeros((BN, BW), dtype=tl.float32)
    # Offsets as tile index * BW, so the compiler sees 16-byte aligned rows and emits 128-bit loads.
    t_end = tl.cdiv(k_end, BK)
    t_start = k_start // BK
    if EVEN and ENTER == 4:
        # Four tiles before the wait, multiplied after it in the loop's order; a tile past the split is read
        # clamped in bounds (as is its x) and adds nothing.
        last = K // BK - 1
        v_a = tl.load(w_ptrs + tl.minimum(t_start, last) * BW)
        v_b = tl.load(w_ptrs + tl.minimum(t_start + 1, last) * BW)
        v_c = tl.load(w_ptrs + tl.minimum(t_start + 2, last) * BW)
        v_d = tl.load(w_ptrs + tl.minimum(t_start + 3, last) * BW)
        pdl.enter(ENTER)
        rstd = norm_prologue(X, R, H, K, eps, NORM)
        acc2 = _int8_words_tile(acc2, X, v_a, t_start, t_end, last, offs_j, stride_xk, UP, BK, ASM, GATED, R, NW,
                                rstd, NORM)
        acc2 = _int8_words_tile(acc2, X, v_b, t_start + 1, t_end, last, offs_j, stride_xk, UP, BK, ASM, GATED, R,
                                NW, rstd, NORM)
        acc2 = _int8_words_tile(acc2, X, v_c, t_start + 2, t_end, last, offs_j, stride_xk, UP, BK, ASM, GATED, R,
                                NW, rstd, NORM)
        acc2 = _int8_words_tile(acc2, X, v_d, t_start + 3, t_end, last, offs_j, stride_xk, UP, BK, ASM, GATED, R,
                                NW, rstd, NORM)
        t_start += 4
        v = tl.load(w_ptrs + tl.minimum(t_start, last) * BW)
    elif EVEN:
        v = tl.load(w_ptrs + tl.minimum(t_start, K // BK - 1) * BW)  # a split may be empty: stay in bounds
        pdl.enter(ENTER)
        if ENTER != 0:
            rstd = norm_prologue(X, R, H, K, eps, NORM)
    for t in range(t_start, t_end):
        ks = t * BK + 4 * offs_j
        if EVEN:
            v_next = tl.load(w_ptrs + tl.minimum(t + 1, t_end - 1) * BW)
            k_ok = None
        else:
            k_ok = ks < K
            v = tl.load(w_ptrs + t * BW, mask=n_ok[:, None] & k_ok[None, :], other=0)
        x0, x1, x2, x3 = _x4(X, ks, k_ok, stride_xk, UP, GATED, R, NW, rstd, NORM)
        w0, w1, w2, w3 = _s8_words(v, ASM)
        acc2 = _fma4(acc2, w0, w1, w2, w3, x0, x1, x2, x3)
        if EVEN:
            v = v_next
    return tl.sum(acc2, axis=1)[None, :]


@triton.jit
def _int4_words_m1(X, QW, S, Z, K, stride_xk, stride_qn, stride_sn, stride_zn, n64, n_ok, k_start, k_end, UP,
                   GROUP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN: tl.constexpr, ASM: tl.constexpr,
                   ENTER: tl.constexpr = 0, GATED: tl.constexpr = False, R=None, NW=None, H=None, eps=0.0,
                   rstd=1.0, NORM: tl.constexpr = False):
    """acc [1, BN] of AWQ x[1, K] @ W.T over [k_start, k_end) (K % 8 == 0), tiles of NG = BK // GROUP whole
    groups read as int32 words ([BN, NG, GROUP // 8]); per group s * (sum_k q_k x_k - z * sum_k x_k), the
    x sums taken once for all rows. EVEN: the next tile's words are loaded before this one is used. ENTER
    (EVEN only): the PDL mode to enter once the first tile (four, with their scales and zeros, in mode 4)
    is loaded; 0 when entered already. NORM: as in `_int8_words_m1`."""
    NG: tl.constexpr = BK // GROUP
    GW: tl.constexpr = GROUP // 8
    offs_g = tl.arange(0, NG)
    word = offs_g[:, None] * GW + tl.arange(0, GW)[None, :]  # [NG, GW]: a tile's words, group by group
    Q32 = QW.to(tl.pointer_type(tl.int32), bitcast=True)
    q_ptrs = Q32 + n64[:, None, None] * (stride_qn // 4) + word[None, :, :]
    acc = tl.zeros((BN,), dtype=tl.float32)
    TW: tl.constexpr = BK // 8  # words a tile row
    t_end = tl.cdiv(k_end, BK)
    t_start = k_start // BK
    if EVEN and ENTER == 4:
        # Four tiles (words, scales, zeros) before the wait, used after it in the loop's order; a tile past
        # the split is read clamped in bounds and adds nothing.
        last = K // BK - 1
        t_a = tl.minimum(t_start, last)
        t_b = tl.minimum(t_start + 1, last)
        t_c = tl.minimum(t_start + 2, last)
        t_d = tl.minimum(t_start + 3, last)
        v_a = tl.load(q_ptrs + t_a * TW)
        v_b = tl.load(q_ptrs + t_b * TW)
        v_c = tl.load(q_ptrs + t_c * TW)
        v_d = tl.load(q_ptrs + t_d * TW)
        s_a, z_a = _int4_group_params(S, Z, n64, stride_sn, stride_zn, t_a * BK // GROUP + offs_g)
        s_b, z_b = _int4_group_params(S, Z, n64, stride_sn, stride_zn, t_b * BK // GROUP + offs_g)
        s_c, z_c = _int4_group_params(S, Z, n64, stride_sn, stride_zn, t_c * BK // GROUP + offs_g)
        s_d, z_d = _int4_group_params(S, Z, n64, stride_sn, stride_zn, t_d * BK // GROUP + offs_g)
        pdl.enter(ENTER)
        rstd = norm_prologue(X, R, H, K, eps, NORM)
        acc = tl.where(t_start < t_end, _int4_words_tile(acc, X, v_a, s_a, z_a, t_a * BK + 8 * word, None,
                                                         stride_xk, UP, ASM, GATED, R, NW, rstd, NORM), acc)
        acc = tl.where(t_start + 1 < t_end, _int4_words_tile(acc, X, v_b, s_b, z_b, t_b * BK + 8 * word, None,
                                                             stride_xk, UP, ASM, GATED, R, NW, rstd, NORM), acc)
        acc = tl.where(t_start + 2 < t_end, _int4_words_tile(acc, X, v_c, s_c, z_c, t_c * BK + 8 * word, None,
                                                             stride_xk, UP, ASM, GATED, R, NW, rstd, NORM), acc)
        acc = tl.where(t_start + 3 < t_end, _int4_words_tile(acc, X, v_d, s_d, z_d, t_d * BK + 8 * word, None,
                                                             stride_xk, UP, ASM, GATED, R, NW, rstd, NORM), acc)
        t_start += 4
        v = tl.load(q_ptrs + tl.minimum(t_start, last) * TW)
    elif EVEN:  # offsets as tile index * TW: 16-byte aligned rows, 128-bit loads
        v = tl.load(q_ptrs + tl.minimum(t_start, K // BK - 1) * TW)
        pdl.enter(ENTER)
        if ENTER != 0:
            rstd = norm_prologue(X, R, H, K, eps, NORM)
    for t in range(t_start, t_end):
        k0 = t * BK
        ks = k0 + 8 * word
        g = k0 // GROUP + offs_g
        if EVEN:
            v_next = tl.load(q_ptrs + tl.minimum(t + 1, t_end - 1) * TW)
            k_ok = None
            s, z = _int4_group_params(S, Z, n64, stride_sn, stride_zn, g)
        else:
            k_ok = ks < K
            v = tl.load(q_ptrs + t * TW, mask=n_ok[:, None, None] & k_ok[None, :, :], other=0)
            g_ok = n_ok[:, None] & ((k0 + offs_g * GROUP) < K)[None, :]
            s = tl.load(S + n64[:, None] * stride_sn + g[None, :], mask=g_ok, other=0.0).to(tl.float32)
            z = tl.load(Z + n64[:, None] * stride_zn + g[None, :], mask=g_ok, other=0.0).to(tl.float32)
        acc = _int4_words_tile(acc, X, v, s, z, ks, k_ok, stride_xk, UP, ASM, GATED, R, NW, rstd, NORM)
        if EVEN:
            v = v_next
    return acc[None, :]


@triton.jit
def _int4_group_params(S, Z, n64, stride_sn, stride_zn, g):
    """The scales and zeros [BN, NG] of groups `g` for rows `n64` (whole tiles: no masks), as float32."""
    s = tl.load(S + n64[:, None] * stride_sn + g[None, :]).to(tl.float32)
    z = tl.load(Z + n64[:, None] * stride_zn + g[None, :]).to(tl.float32)
    return s, z


@triton.jit
def _int4_words_tile(acc, X, v, s, z, ks, k_ok, stride_xk, UP, ASM: tl.constexpr, GATED: tl.constexpr, R, NW, rstd,
                     NORM: tl.constexpr):
    """acc [BN] plus one tile of `_int4_words_m1`: words `v` [BN, NG, GW], scales and zeros [BN, NG], x at
    `ks` [NG, GW] (mask `k_ok`, or None)."""
    x0, x1, x2, x3 = _x4(X, ks, k_ok, stride_xk, UP, GATED, R, NW, rstd, NORM)
    x4, x5, x6, x7 = _x4(X, ks + 4, k_ok, stride_xk, UP, GATED, R, NW, rstd, NORM)
    x_sum = tl.sum(x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7, axis=1)  # [NG]
    return acc + tl.sum(s * (_u4_group_dots(v, x0, x1, x2, x3, x4, x5, x6, x7, ASM) - z * x_sum[None, :]), axis=1)


@triton.jit
def _u4_group_dots(v, x0, x1, x2, x3, x4, x5, x6, x7, ASM: tl.constexpr):
    """sum_k q_k x_k within each group: words `v` [BN, NG, GW] of eight int4 codes (nibble i is k = 8j + i), and
    x_i [NG, GW] the x at those k; [BN, NG]. Each code becomes float32 exactly (`_u4_words`, minus 2**23)."""
    q0, q1, q2, q3, q4, q5, q6, q7 = _u4_words(v, ASM)
    part = (q0 - 8388608.0) * x0[None, :, :] + (q1 - 8388608.0) * x1[None, :, :] \
        + (q2 - 8388608.0) * x2[None, :, :] + (q3 - 8388608.0) * x3[None, :, :] \
        + (q4 - 8388608.0) * x4[None, :, :] + (q5 - 8388608.0) * x5[None, :, :] \
        + (q6 - 8388608.0) * x6[None, :, :] + (q7 - 8388608.0) * x7[None, :, :]
    return tl.sum(part, axis=2)


@triton.jit
def tile_rows(pid_n, BN: tl.constexpr, ROPE_D: tl.constexpr = 0):
    """The weight rows of N tile `pid_n`: BN consecutive rows; with ROPE_D (a fused q/k/v weight whose heads are
    ROPE_D rows, rope pairing row j of a head's first half with row j + ROPE_D / 2), BN / 2 consecutive rows of a
    first half and the same rows of the second half, so that tile columns i and i + BN / 2 are a rope pair
    (BN <= ROPE_D). Each pair's head is its own, so a tile may span two heads where BN / 2 does not divide
    ROPE_D / 2; pairs past the last head map to rows past N, which the loads and stores mask."""
    if ROPE_D == 0:
        return pid_n * BN + tl.arange(0, BN)
    else:
        HALF: tl.constexpr = ROPE_D // 2
        PB: tl.constexpr = BN // 2
        i = tl.arange(0, BN)
        p = pid_n * PB + i % PB  # the pair: head p // HALF, dim p % HALF of its first half
        return (p // HALF) * ROPE_D + p % HALF + (i // PB) * HALF


@triton.jit
def combine_and_rope(acc, Y, WS, CNT, M, N, stride_ym, pid_n, pid_k, COS, SIN, stride_cs, KC, VC, SLOTS, HQ, HKV,
                     BN: tl.constexpr, SPLIT_K: tl.constexpr, ROPE_D: tl.constexpr):
    """`combine_and_store` for a tile of rope pairs (`tile_rows` with ROPE_D): the sums, rounded to y's dtype as
    the plain GEMV stores them, have their q and k heads (below HQ + HKV) rotated by the token's cos/sin rows
    (`rope.rotate_pair`, the rope op's expression) and stored at their columns of y [M, (HQ + 2 HKV) ROPE_D]; the
    k and v heads also go to row SLOTS[m] of the caches [..., HKV, ROPE_D] (a negative slot stores nothing), as
    `kv_cache.write` would write them."""
    BMA: tl.constexpr = acc.shape[0]
    HALF: tl.constexpr = ROPE_D // 2
    PB: tl.constexpr = BN // 2
    DT: tl.constexpr = Y.dtype.element_ty
    total, last = combine(acc, WS, CNT, M, N, pid_n, pid_k, BMA, BN, SPLIT_K)
    a, b = tl.split(tl.permute(tl.reshape(total, (BMA, 2, PB)), (0, 2, 1)))  # tile columns i, i + PB
    a = a.to(DT).to(tl.float32)
    b = b.to(DT).to(tl.float32)
    offs_m = tl.arange(0, BMA)
    m_ok = (offs_m < M) & last
    p = pid_n * PB + tl.arange(0, PB)
    head = p // HALF
    d = p % HALF
    cs = offs_m[:, None].to(tl.int64) * stride_cs + d[None, :]
    c1 = tl.load(COS + cs, mask=m_ok[:, None], other=0.0).to(tl.float32)
    c2 = tl.load(COS + cs + HALF, mask=m_ok[:, None], other=0.0).to(tl.float32)
    s1 = tl.load(SIN + cs, mask=m_ok[:, None], other=0.0).to(tl.float32)
    s2 = tl.load(SIN + cs + HALF, mask=m_ok[:, None], other=0.0).to(tl.float32)
    r1, r2 = rotate_pair(a, b, c1, c2, s1, s2)
    rotated = (head < HQ + HKV)[None, :]
    r1 = tl.where(rotated, r1, a).to(DT)
    r2 = tl.where(rotated, r2, b).to(DT)
    ok = m_ok[:, None] & (head * ROPE_D + d < N)[None, :]
    y_ptrs = Y + offs_m[:, None].to(tl.int64) * stride_ym + (head * ROPE_D + d)[None, :]
    tl.store(y_ptrs, r1, mask=ok)
    tl.store(y_ptrs + HALF, r2, mask=ok)
    slot = tl.load(SLOTS + offs_m, mask=m_ok, other=-1)
    is_v = head >= HQ + HKV
    is_k = (head >= HQ) & (head < HQ + HKV)
    kv_head = tl.where(is_v, head - HQ - HKV, head - HQ)
    at = (slot[:, None] * HKV + kv_head[None, :]) * ROPE_D + d[None, :]
    cached = ok & (slot >= 0)[:, None]
    tl.store(KC + at, r1, mask=cached & is_k[None, :])
    tl.store(KC + at + HALF, r2, mask=cached & is_k[None, :])
    tl.store(VC + at, r1, mask=cached & is_v[None, :])
    tl.store(VC + at + HALF, r2, mask=cached & is_v[None, :])


@triton.heuristics({"EVEN": even})
@triton.jit
def int8_gemv_kernel(X, W, S, Y, WS, CNT, M, N, K, UP, R, NW, H, eps, COS, SIN, KC, VC, SLOTS, stride_cs, HQ, HKV,
                     stride_xm, stride_xk, stride_wn, stride_ym, M_BUCKET, PREC: tl.constexpr, BM: tl.constexpr,
                     BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr, M1_DOT: tl.constexpr = False,
                     WORDS: tl.constexpr = False, ASM: tl.constexpr = False, EVEN: tl.constexpr = False,
                     PDL: tl.constexpr = 0, GATED: tl.constexpr = False, NORM: tl.constexpr = False,
                     ROPE_D: tl.constexpr = 0):
    """y[M, N] = (x[M, K] @ w_q[N, K].T) * scale[N]; BM == 1 (M == 1) or 16 (M <= 16); grid (N / BN, SPLIT_K).
    With BM == 1, M1_DOT takes the tl.dot path (rows padded to 16) and WORDS the word path
    (`_int8_words_m1`; K % 4 == 0) instead of the CUDA-core one; ASM lets the word path convert by PTX
    (not under the interpreter). EVEN (set from the shapes: BN divides N and BK divides K) drops the bounds
    masks on the weight and x tiles. PDL: the launch may overlap the previous kernel (`pdl`). GATED: x is
    silu_mul(gate, up) of a fused gate/up output [M, 2K], the gate at X and up UP elements further (`_xg`). NORM
    (M == 1, not M1_DOT): x is rms_norm_residual(x, R, NW, eps)'s output [1, K], and h = x + R goes to H
    (`norm_prologue`). ROPE_D: W is a fused q/k/v weight of HQ + 2 HKV heads of ROPE_D rows; each tile takes rope
    pairs (`tile_rows`), and the epilogue stores q and k rotated by COS/SIN [M, ROPE_D] (row stride stride_cs) and
    writes k and v at SLOTS of the caches KC/VC (`combine_and_rope`)."""
    tl.static_assert(not NORM or (BM == 1 and not M1_DOT and not GATED), "NORM takes one row, without M1_DOT")
    tl.static_assert(ROPE_D == 0 or BN <= ROPE_D, "a rope tile holds pairs of one head: BN <= ROPE_D")
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    k_start, k_end = k_range(K, pid_k, BK, SPLIT_K)
    rows = tile_rows(pid_n, BN, ROPE_D)
    # Early weights (PDL modes 3, 4): the paths with whole tiles load their first tile(s), then enter.
    EARLY: tl.constexpr = PDL >= 3 and BM == 1 and EVEN and not M1_DOT
    if not EARLY:
        pdl.enter_prefetching(PDL, W, rows, rows < N, stride_wn, k_start, k_end)
        rstd = norm_prologue(X, R, H, K, eps, NORM)
    else:
        rstd = 1.0  # the paths take it after their wait
    if BM == 1 and WORDS:
        acc = _int8_words_m1(X, W, N, K, stride_xk, stride_wn, pid_n, k_start, k_end, UP, BN, BK, EVEN, ASM,
                             PDL if EARLY else 0, GATED, R, NW, H, eps, rstd, NORM, ROPE_D)
        acc = acc * tl.load(S + rows, mask=rows < N, other=0.0).to(tl.float32)[None, :]
    elif BM == 1 and M1_DOT:
        acc = rowwise_tiles(X, W, S, Y, WS, CNT, M, N, K, UP, stride_xm, stride_xk, stride_wn, stride_ym, PREC, 16,
                            BN, BK, SPLIT_K, EVEN, True, 0, GATED, STORE=False, ROPE_D=ROPE_D)
    else:
        acc = rowwise_tiles(X, W, S, Y, WS, CNT, M, N, K, UP, stride_xm, stride_xk, stride_wn, stride_ym, PREC, BM,
                            BN, BK, SPLIT_K, EVEN, True, PDL if EARLY else 0, GATED, R, NW, H, eps, rstd, NORM,
                            STORE=False, ROPE_D=ROPE_D)
    if ROPE_D == 0:
        combine_and_store(acc, Y, WS, CNT, M, N, stride_ym, pid_n, pid_k, acc.shape[0], BN, SPLIT_K)
    else:
        combine_and_rope(acc, Y, WS, CNT, M, N, stride_ym, pid_n, pid_k, COS, SIN, stride_cs, KC, VC, SLOTS, HQ, HKV,
                         BN, SPLIT_K, ROPE_D)


@triton.jit
def _weights_f32(w, INT8: tl.constexpr):
    """A weight tile as float32: int8 through its exact byte path, a float dtype by a cast."""
    if INT8:
        return _exact_f32((w.to(tl.uint8, bitcast=True) ^ 0x80).to(tl.int32), 128)  # w + 128 in [0, 255]
    else:
        return w.to(tl.float32)


@triton.jit
def rowwise_tiles(X, W, S, Y, WS, CNT, M, N, K, UP, stride_xm, stride_xk, stride_wn, stride_ym, PREC: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr, EVEN: tl.constexpr,
                  INT8: tl.constexpr, ENTER: tl.constexpr = 0, GATED: tl.constexpr = False, R=None, NW=None, H=None,
                  eps=0.0, rstd=1.0, NORM: tl.constexpr = False, STORE: tl.constexpr = True,
                  ROPE_D: tl.constexpr = 0):
    """One program's [BN] output columns of x @ w.T over its split of K, combined and stored. INT8: w holds
    int8 rows scaled per output channel by S; else w is in a float dtype (the dense GEMV) and S unused.
    ENTER (BM == 1 and EVEN only): the PDL mode to enter once the first weight tile (four in mode 4) is
    loaded (early weights, `pdl`); 0 when the kernel has entered already. NORM (BM == 1 only): x is
    rms_norm_residual(x, R, NW)'s output (`_xr`), `rstd` as given or, with ENTER, from `norm_prologue`. STORE
    False: the tile's acc [BM, BN] (scaled) is returned instead of stored. ROPE_D: the tile's rows are rope pairs
    of a fused q/k/v weight (`tile_rows`)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = tile_rows(pid_n, BN, ROPE_D)
    offs_k = tl.arange(0, BK)
    n_ok = offs_n < N
    if ROPE_D == 0:
        # 64-bit only in the tile's base; offsets inside a tile stay 32-bit (BN * stride_wn < 2**31).
        w_ptrs = W + (pid_n * BN).to(tl.int64) * stride_wn + tl.arange(0, BN)[:, None] * stride_wn + offs_k[None, :]
    else:
        w_ptrs = W + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    k_start, k_end = k_range(K, pid_k, BK, SPLIT_K)
    if BM == 1:
        # Products accumulate elementwise; the one reduction over K happens after the loop.
        acc2 = tl.zeros((BN, BK), dtype=tl.float32)
        loop_start = k_start
        if ENTER != 0:
            # The first tile's weights (four tiles' in mode 4) before the wait, their x after, in the loop's
            # order. A tile past the split (which may be empty) is read clamped in bounds and adds nothing.
            k_a = tl.minimum(k_start, K - BK)
            w_a = tl.load(w_ptrs + k_a)
            if ENTER == 4:
                k_b = tl.minimum(k_start + BK, K - BK)
                k_c = tl.minimum(k_start + 2 * BK, K - BK)
                k_d = tl.minimum(k_start + 3 * BK, K - BK)
                w_b = tl.load(w_ptrs + k_b)
                w_c = tl.load(w_ptrs + k_c)
                w_d = tl.load(w_ptrs + k_d)
            pdl.enter(ENTER)
            rstd = norm_prologue(X, R, H, K, eps, NORM)
            x = _xr(X, k_a + offs_k, None, stride_xk, UP, GATED, R, NW, rstd, NORM).to(tl.float32)
            acc2 += tl.where(k_start < k_end, _weights_f32(w_a, INT8) * x[None, :], 0.0)
            loop_start = k_start + BK
            if ENTER == 4:
                x = _xr(X, k_b + offs_k, None, stride_xk, UP, GATED, R, NW, rstd, NORM).to(tl.float32)
                acc2 += tl.where(k_start + BK < k_end, _weights_f32(w_b, INT8) * x[None, :], 0.0)
                x = _xr(X, k_c + offs_k, None, stride_xk, UP, GATED, R, NW, rstd, NORM).to(tl.float32)
                acc2 += tl.where(k_start + 2 * BK < k_end, _weights_f32(w_c, INT8) * x[None, :], 0.0)
                x = _xr(X, k_d + offs_k, None, stride_xk, UP, GATED, R, NW, rstd, NORM).to(tl.float32)
                acc2 += tl.where(k_start + 3 * BK < k_end, _weights_f32(w_d, INT8) * x[None, :], 0.0)
                loop_start = k_start + 4 * BK
        for k0 in range(loop_start, k_end, BK):
            if EVEN:
                x = _xr(X, k0 + offs_k, None, stride_xk, UP, GATED, R, NW, rstd, NORM).to(tl.float32)
                w = tl.load(w_ptrs + k0)
            else:
                k_ok = (k0 + offs_k) < K
                x = _xr(X, k0 + offs_k, k_ok, stride_xk, UP, GATED, R, NW, rstd, NORM).to(tl.float32)
                w = tl.load(w_ptrs + k0, mask=n_ok[:, None] & k_ok[None, :], other=0)
            acc2 += _weights_f32(w, INT8) * x[None, :]
        acc = tl.sum(acc2, axis=1)[None, :]
    else:
        offs_m = tl.arange(0, BM)
        m_ok = offs_m < M
        x_ptrs = X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(k_start, k_end, BK):
            if EVEN:
                x = _xg(x_ptrs + k0 * stride_xk, m_ok[:, None], UP, GATED)
                w = tl.load(w_ptrs + k0)
            else:
                k_ok = (k0 + offs_k) < K
                x = _xg(x_ptrs + k0 * stride_xk, m_ok[:, None] & k_ok[None, :], UP, GATED)
                w = tl.load(w_ptrs + k0, mask=n_ok[:, None] & k_ok[None, :], other=0)
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=PREC)
    if INT8:
        acc = acc * tl.load(S + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if STORE:
        combine_and_store(acc, Y, WS, CNT, M, N, stride_ym, pid_n, pid_k, BM, BN, SPLIT_K)
    return acc


@triton.jit
def _int4_in_group(X, QW, S, Z, M, K, K2, stride_xm, stride_xk, stride_qn, stride_sn, stride_zn, n64, n_ok, k_start,
                   k_end, UP, GROUP: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   BK: tl.constexpr, GATED: tl.constexpr = False, R=None, NW=None, rstd=1.0,
                   NORM: tl.constexpr = False):
    """acc [BM, BN] float32 over K in [k_start, k_end), tiles of BK inside one group (GROUP % BK == 0). NORM
    (BM == 1 only): of rms_norm_residual(x, R, NW) (`_xr`)."""
    offs_j = tl.arange(0, BK // 2)  # byte j of a tile holds k = 2j (low nibble) and 2j + 1 (high)
    offs_k = tl.arange(0, BK)
    q_ptrs = QW + n64[:, None] * stride_qn + offs_j[None, :]
    s_ptrs = S + n64 * stride_sn
    z_ptrs = Z + n64 * stride_zn
    if BM == 1:
        acc1 = tl.zeros((BN,), dtype=tl.float32)
        for k0 in range(k_start, k_end, BK):
            # Masks in bytes (K2 = K / 2) keep the weight loads vectorised.
            packed = tl.load(q_ptrs + k0 // 2, mask=n_ok[:, None] & ((k0 // 2 + offs_j) < K2)[None, :], other=0)
            x = _xr(X, k0 + offs_k, (k0 + offs_k) < K, stride_xk, UP, GATED, R, NW, rstd, NORM).to(tl.float32)
            x_even, x_odd = tl.split(tl.reshape(x, (BK // 2, 2)))
            p32 = packed.to(tl.int32)
            part = tl.sum(_exact_f32(p32 & 0xF, 0) * x_even[None, :] + _exact_f32(p32 >> 4, 0) * x_odd[None, :],
                          axis=1)
            g = k0 // GROUP
            s = tl.load(s_ptrs + g, mask=n_ok, other=0.0).to(tl.float32)
            z = tl.load(z_ptrs + g, mask=n_ok, other=0.0).to(tl.float32)
            acc1 += s * (part - z * tl.sum(x, axis=0))
        acc = acc1[None, :]
    else:
        offs_m = tl.arange(0, BM)
        m_ok = offs_m < M
        x_ptrs = X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(k_start, k_end, BK):
            packed = tl.load(q_ptrs + k0 // 2, mask=n_ok[:, None] & ((k0 // 2 + offs_j) < K2)[None, :], other=0)
            x = _xg(x_ptrs + k0 * stride_xk, m_ok[:, None] & ((k0 + offs_k) < K)[None, :], UP, GATED)
            x_even, x_odd = tl.split(tl.reshape(x, (BM, BK // 2, 2)))
            # Nibbles 0..15 are exact in every float dtype, so the dots see the exact integer weights;
            # via int8, the conversion takes Triton's fast int8 -> half path.
            lo = (packed & 0xF).to(tl.int8, bitcast=True).to(x.dtype)
            hi = (packed >> 4).to(tl.int8, bitcast=True).to(x.dtype)
            part = tl.dot(x_even, tl.trans(lo), input_precision=PREC)
            part = tl.dot(x_odd, tl.trans(hi), part, input_precision=PREC)
            g = k0 // GROUP
            s = tl.load(s_ptrs + g, mask=n_ok, other=0.0).to(tl.float32)
            z = tl.load(z_ptrs + g, mask=n_ok, other=0.0).to(tl.float32)
            x_sum = tl.sum(x.to(tl.float32), axis=1)
            acc += s[None, :] * (part - z[None, :] * x_sum[:, None])
    return acc


@triton.jit
def _int4_whole_groups(X, QW, S, Z, M, K, K2, stride_xm, stride_xk, stride_qn, stride_sn, stride_zn, n64, n_ok,
                       k_start, k_end, UP, GROUP: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr,
                       BN: tl.constexpr, BK: tl.constexpr, GATED: tl.constexpr = False, R=None, NW=None, rstd=1.0,
                       NORM: tl.constexpr = False):
    """acc [BM, BN] float32 over K in [k_start, k_end), tiles of NG = BK // GROUP whole groups (k_start a
    multiple of BK): the weight tile is read as [BN, NG, GROUP // 2] bytes, one contiguous BK / 2 byte
    segment a row, and each group's sums are reduced apart and scaled by the group's own s and z. NORM (BM == 1
    only): of rms_norm_residual(x, R, NW) (`_xr`)."""
    NG: tl.constexpr = BK // GROUP
    HG: tl.constexpr = GROUP // 2
    offs_g = tl.arange(0, NG)
    byte = offs_g[:, None] * HG + tl.arange(0, HG)[None, :]  # [NG, HG]: a tile's bytes, group by group
    col = offs_g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # [NG, GROUP]: a tile's k, group by group
    q_ptrs = QW + n64[:, None, None] * stride_qn + byte[None, :, :]
    if BM == 1:
        acc1 = tl.zeros((BN,), dtype=tl.float32)
        for k0 in range(k_start, k_end, BK):
            packed = tl.load(q_ptrs + k0 // 2, mask=n_ok[:, None, None] & ((k0 // 2 + byte) < K2)[None, :, :],
                             other=0)
            x = _xr(X, k0 + col, (k0 + col) < K, stride_xk, UP, GATED, R, NW, rstd, NORM).to(tl.float32)
            x_even, x_odd = tl.split(tl.reshape(x, (NG, HG, 2)))
            p32 = packed.to(tl.int32)
            part = tl.sum(_exact_f32(p32 & 0xF, 0) * x_even[None, :, :] + _exact_f32(p32 >> 4, 0) * x_odd[None, :, :],
                          axis=2)  # [BN, NG]
            # Groups past K (a K tile hanging over the end) get s = 0; their x and q are zero anyway.
            g_ok = n_ok[:, None] & ((k0 + offs_g * GROUP) < K)[None, :]
            g = k0 // GROUP + offs_g
            s = tl.load(S + n64[:, None] * stride_sn + g[None, :], mask=g_ok, other=0.0).to(tl.float32)
            z = tl.load(Z + n64[:, None] * stride_zn + g[None, :], mask=g_ok, other=0.0).to(tl.float32)
            acc1 += tl.sum(s * (part - z * tl.sum(x, axis=1)[None, :]), axis=1)
        acc = acc1[None, :]
    else:
        offs_m = tl.arange(0, BM)
        m_ok = offs_m < M
        # x as [NG, BM, GROUP]: the groups are the batch dimension of the dots.
        x_ptrs = X + offs_m[None, :, None] * stride_xm + col[:, None, :] * stride_xk
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(k_start, k_end, BK):
            packed = tl.load(q_ptrs + k0 // 2, mask=n_ok[:, None, None] & ((k0 // 2 + byte) < K2)[None, :, :],
                             other=0)
            x = _xg(x_ptrs + k0 * stride_xk, m_ok[None, :, None] & ((k0 + col) < K)[:, None, :], UP, GATED)
            x_even, x_odd = tl.split(tl.reshape(x, (NG, BM, HG, 2)))  # [NG, BM, HG]
            # As in one group: exact integer nibbles, converted through int8; [BN, NG, HG] -> [NG, HG, BN].
            lo = tl.permute((packed & 0xF).to(tl.int8, bitcast=True).to(x.dtype), (1, 2, 0))
            hi = tl.permute((packed >> 4).to(tl.int8, bitcast=True).to(x.dtype), (1, 2, 0))
            part = tl.dot(x_even, lo, input_precision=PREC)
            part = tl.dot(x_odd, hi, part, input_precision=PREC)  # [NG, BM, BN]
            g_ok = ((k0 + offs_g * GROUP) < K)[:, None] & n_ok[None, :]
            g = (k0 // GROUP + offs_g)[:, None]
            s = tl.load(S + n64[None, :] * stride_sn + g, mask=g_ok, other=0.0).to(tl.float32)  # [NG, BN]
            z = tl.load(Z + n64[None, :] * stride_zn + g, mask=g_ok, other=0.0).to(tl.float32)
            x_sum = tl.sum(x.to(tl.float32), axis=2)  # [NG, BM]
            acc += tl.sum(s[:, None, :] * (part - z[:, None, :] * x_sum[:, :, None]), axis=0)
    return acc


@triton.heuristics({"EVEN": even})
@triton.jit
def int4_gemv_kernel(X, QW, S, Z, Y, WS, CNT, M, N, K, K2, UP, R, NW, H, eps, stride_xm, stride_xk, stride_qn,
                     stride_sn, stride_zn, stride_ym, M_BUCKET, GROUP: tl.constexpr, PREC: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
                     WORDS: tl.constexpr = False, ASM: tl.constexpr = False, EVEN: tl.constexpr = False,
                     PDL: tl.constexpr = 0, GATED: tl.constexpr = False, NORM: tl.constexpr = False):
    """y[M, N] = x[M, K] @ ((q - z) * s).T with q packed two per byte along K (K2 = K / 2 bytes a row, even
    k in the low nibble); a tile never splits a group: GROUP % BK == 0 (one tile inside one group) or
    BK % GROUP == 0 (a tile of whole groups; GROUP >= 32 where BM > 1, for the dots' K of GROUP / 2). GATED:
    x is silu_mul(gate, up) of a fused gate/up output, as in `int8_gemv_kernel`; NORM (M == 1) as there."""
    tl.static_assert(not NORM or (BM == 1 and not GATED), "NORM takes one row")
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < N
    n64 = offs_n.to(tl.int64)
    k_start, k_end = k_range(K, pid_k, BK, SPLIT_K)
    EARLY: tl.constexpr = PDL >= 3 and BM == 1 and WORDS and EVEN  # early weights: the word path enters
    if not EARLY:
        pdl.enter_prefetching(PDL, QW, offs_n, n_ok, stride_qn, k_start // 2, (k_end + 1) // 2)
        rstd = norm_prologue(X, R, H, K, eps, NORM)
    else:
        rstd = 1.0  # the word path takes it after its wait
    if BM == 1 and WORDS:
        acc = _int4_words_m1(X, QW, S, Z, K, stride_xk, stride_qn, stride_sn, stride_zn, n64, n_ok, k_start, k_end,
                             UP, GROUP, BN, BK, EVEN, ASM, PDL if EARLY else 0, GATED, R, NW, H, eps, rstd, NORM)
    elif BK <= GROUP:
        acc = _int4_in_group(X, QW, S, Z, M, K, K2, stride_xm, stride_xk, stride_qn, stride_sn, stride_zn, n64, n_ok,
                             k_start, k_end, UP, GROUP, PREC, BM, BN, BK, GATED, R, NW, rstd, NORM)
    else:
        acc = _int4_whole_groups(X, QW, S, Z, M, K, K2, stride_xm, stride_xk, stride_qn, stride_sn, stride_zn, n64,
                                 n_ok, k_start, k_end, UP, GROUP, PREC, BM, BN, BK, GATED, R, NW, rstd, NORM)
    combine_and_store(acc, Y, WS, CNT, M, N, stride_ym, pid_n, pid_k, BM, BN, SPLIT_K)


# Ranked by CUDA-graph time with a cold L2 (`graph_bench`): the time a decode step pays for them.
_int8_tuned = autotune(_INT8_M1 + _INT8_MX, key=["M_BUCKET", "N", "K", "PREC", "GATED", "NORM", "ROPE_D"],
                       interpret=_INTERPRET,
                       prune_configs_by={"early_config_prune": _prune_int8}, do_bench=graph_bench)(int8_gemv_kernel)
_int4_tuned = autotune(_INT4_M1 + _INT4_MX, key=["M_BUCKET", "N", "K", "GROUP", "PREC", "GATED", "NORM"],
                       interpret=_INTERPRET,
                       prune_configs_by={"early_config_prune": _prune_int4}, do_bench=graph_bench)(int4_gemv_kernel)
_int8_launch = TunedLaunch(_int8_tuned)
_int4_launch = TunedLaunch(_int4_tuned)


def _word_aligned(x: torch.Tensor) -> torch.Tensor:
    """x for the word paths, which read a bf16 row as int32 words: unit stride along K and 4-byte aligned (a
    decode step's activation row already is; anything else is copied, a row of K elements)."""
    if x.shape[0] == 1 and x.dtype == torch.bfloat16 and (x.stride(1) != 1 or x.data_ptr() % 4):
        return x.clone(memory_format=torch.contiguous_format)
    return x


def _words_reasons(meta: dict, k: int, group: int | None = None) -> list[str]:
    if not meta.get("WORDS") or _words_fit(int(meta["BK"]), k, group):
        return []
    if group is None:
        return [f"WORDS needs K % 4 == 0, got K={k}"]
    return [f"WORDS needs whole groups and words a tile, got BK={meta['BK']} group_size={group} K={k}"]


#: A normalised launch's extra operands: (residual [1, K], norm weight [K], h [1, K] to fill, eps).
Norm = tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]


def norm_args(x: torch.Tensor, norm: Norm | None) -> tuple[tuple, bool]:
    """The kernels' (R, NW, H, eps) and NORM for `norm` (x itself in the unused pointer slots without one). A
    bf16 residual or norm weight that the word paths could not read as int32 words is copied (K elements)."""
    if norm is None:
        return (x, x, x, 0.0), False
    residual, weight, h, eps = norm
    if x.shape[0] != 1:
        raise ValueError(f"norm: x.shape={tuple(x.shape)}; the normalised GEMVs take one row")
    for name, t in (("x", x), ("residual", residual), ("h", h)):
        if t.shape != x.shape or t.stride(-1) != 1:
            raise ValueError(f"norm: {name} (shape {tuple(t.shape)}, strides {t.stride()}) is not a contiguous "
                             f"row like x {tuple(x.shape)}")
    return (_word_aligned(residual), _word_aligned(weight.view(1, -1)), h, float(eps)), True


#: A q/k/v launch's rope and cache write: (cos [M, D], sin [M, D], k_cache, v_cache [..., Hkv, D], slots [M],
#: n_q_heads, n_kv_heads).
Rope = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int]


def rope_reasons(x: torch.Tensor, n: int, rope: Rope) -> list[str]:
    """Why a GEMV of y [M, N] = x @ W.T cannot rotate and write the caches in its epilogue (empty when it can):
    `support.qkv_rope_epilogue_reasons`, and every tensor on x's device."""
    cos, sin, k_cache, v_cache, slots, hq, hkv = rope
    reasons = qkv_rope_epilogue_reasons(x, n, cos, sin, k_cache, v_cache, slots, hq, hkv)
    if any(t.device != x.device for t in (cos, sin, k_cache, v_cache, slots)):
        reasons.append(f"the rope tables, caches and slots are not all on x's device {x.device}")
    return reasons


def rope_args(x: torch.Tensor, n: int, rope: Rope | None) -> tuple[tuple, int]:
    """The kernels' (COS, SIN, KC, VC, SLOTS, stride_cs, HQ, HKV) and ROPE_D for `rope` (x in the unused pointer
    slots without one); ValueError with `rope_reasons` when the epilogue cannot take it."""
    if rope is None:
        return (x, x, x, x, x, 0, 0, 0), 0
    if bad := rope_reasons(x, n, rope):
        raise ValueError("rope: " + "; ".join(bad))
    cos, sin, k_cache, v_cache, slots, hq, hkv = rope
    return (cos, sin, k_cache, v_cache, slots, cos.stride(0), int(hq), int(hkv)), n // (hq + 2 * hkv)


def gated_k(x: torch.Tensor, gated: bool) -> tuple[int, int]:
    """(K, the up half's offset in elements): x [M, K] as it is, or (`gated`) a fused gate/up output [M, 2K]
    whose halves are the gate and up inputs of silu_mul."""
    if not gated:
        return x.shape[1], 0
    if x.shape[1] % 2:
        raise ValueError(f"gated: x.shape={tuple(x.shape)} has an odd width, not [M, 2 * K]")
    k = x.shape[1] // 2
    return k, k * x.stride(1)


def launch_int8(x: torch.Tensor, w_q: torch.Tensor, scale: torch.Tensor, y: torch.Tensor,
                kernel: object = None, gated: bool = False, norm: Norm | None = None, rope: Rope | None = None,
                **meta: object) -> None:
    """y[M, N] = int8 weight-only x @ w_q.T (M <= 16, w_q and scale contiguous). `kernel` defaults to the
    autotuned one; with the raw `int8_gemv_kernel`, `meta` gives BN, BK, SPLIT_K (and launch options, M1_DOT
    or WORDS). `gated`: x is a fused gate/up output [M, 2K] and the product is of silu_mul(gate, up).
    `norm` (M == 1, x contiguous): (residual, weight, h, eps); the product is of rms_norm_residual(x, residual,
    weight, eps)'s output, and h = x + residual is written to h (`norm_prologue`). `rope` (w_q a fused q/k/v
    weight, y contiguous): (cos, sin, k_cache, v_cache, slots, n_q_heads, n_kv_heads); y holds q and k rotated
    and v, and k and v are also written at the slots of the caches (`combine_and_rope`; inputs as `rope_reasons`
    asks, else ValueError)."""
    x = _word_aligned(x)
    (m, n), (k, up) = (x.shape[0], w_q.shape[0]), gated_k(x, gated)
    if kernel is not None and (bad := _words_reasons(meta, k)):
        raise ValueError(bad[0])
    if kernel is not None and rope is not None and (bad := _rope_tile_reasons(meta, n, rope)):
        raise ValueError(bad[0])
    extra, is_norm = norm_args(x, norm)
    rotary, rope_d = rope_args(x, n, rope)
    if rope is not None and (y.stride(1) != 1 or y.stride(0) != n):
        raise ValueError(f"rope: y (shape {tuple(y.shape)}, strides {y.stride()}) is not contiguous")
    mb = bucket(m)
    ws, counters = workspace(n, max_split(_int8_tuned, n) if kernel is None else int(meta["SPLIT_K"]), x.device)
    args = (x, w_q, scale, y, ws, counters, m, n, k, up, *extra, *rotary, x.stride(0), x.stride(1), w_q.stride(0),
            y.stride(0), mb)
    consts = {"PREC": dot_precision(x.dtype), "BM": 1 if m == 1 else MAX_M, "ASM": not triton_interpreting(),
              "GATED": gated, "NORM": is_norm, "ROPE_D": rope_d, **pdl.launch_options(x.device, gemv=True)}
    if kernel is None:
        _int8_launch((mb, n, k, x.dtype, scale.dtype, gated, is_norm, rope_d), grid(n), *args, **consts)
    else:
        kernel[grid(n)](*args, **consts, **meta)


def launch_int4(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                y: torch.Tensor, kernel: object = None, gated: bool = False, norm: Norm | None = None,
                **meta: object) -> None:
    """y[M, N] = AWQ int4 x @ W.T (M <= 16, group_size a multiple of 32, last dims contiguous). `kernel`
    defaults to the autotuned one; with the raw `int4_gemv_kernel`, `meta` gives BN, BK, SPLIT_K, where BK
    must divide group_size or (a power-of-two group_size) be a multiple of it, else ValueError. `gated`: x is a
    fused gate/up output [M, 2K] and the product is of silu_mul(gate, up); `norm` as in `launch_int8`."""
    x = _word_aligned(x)
    (m, n), (k, up) = (x.shape[0], qweight.shape[0]), gated_k(x, gated)
    if kernel is not None and not _tile_fits_groups(int(meta["BK"]), group_size):
        raise ValueError(f"BK={meta['BK']} would split a group of group_size={group_size}")
    if kernel is not None and (bad := _words_reasons(meta, k, group_size)):
        raise ValueError(bad[0])
    extra, is_norm = norm_args(x, norm)
    mb = bucket(m)
    ws, counters = workspace(n, max_split(_int4_tuned, n) if kernel is None else int(meta["SPLIT_K"]), x.device)
    args = (x, qweight, scales, zeros, y, ws, counters, m, n, k, k // 2, up, *extra, x.stride(0), x.stride(1),
            qweight.stride(0), scales.stride(0), zeros.stride(0), y.stride(0), mb)
    consts = {"GROUP": group_size, "PREC": dot_precision(x.dtype), "BM": 1 if m == 1 else MAX_M,
              "ASM": not triton_interpreting(), "GATED": gated, "NORM": is_norm,
              **pdl.launch_options(x.device, gemv=True)}
    if kernel is None:
        _int4_launch((mb, n, k, group_size, x.dtype, scales.dtype, zeros.dtype, gated, is_norm), grid(n), *args,
                     **consts)
    else:
        kernel[grid(n)](*args, **consts, **meta)


def tuned_configs() -> dict[str, dict[str, object]]:
    """Per shape tuned in this process ('int8 M<=b N=n K=k ...' or 'int4 ... g=G', ending in ' gated' for the
    launches of silu_mul(gate, up), ' normed' for those of rms_norm_residual's output and ' rope d=D' for those
    with rope and the cache write in the epilogue): the config its launches use (BN, BK, SPLIT_K, warps, stages,
    path flags). Benchmarks record it beside their timings, since the autotuner's pick among near-tied configs
    moves a shape's time between processes."""
    out = {}
    for op, launch, fields in (("int8", _int8_launch, ("M<=", "N=", "K=", "x ", "scale ")),
                               ("int4", _int4_launch, ("M<=", "N=", "K=", "g=", "x ", "scales ", "zeros "))):
        for key, meta in launch.tuned().items():
            # the launchers' keys: the shape and dtypes, then (gated, normed) and, for int8, the rope head_dim
            gated, normed, rope_d = (*key[len(fields):], False, False, 0)[:3]
            label = " ".join(f"{f}{str(v).removeprefix('torch.')}" for f, v in zip(fields, key[:len(fields)]))
            label += " gated" if gated else ""
            label += " normed" if normed else ""
            label += f" rope d={rope_d}" if rope_d else ""
            out[f"{op} {label}"] = {k: v for k, v in meta.items() if v is not None}
    return out


def serves_int4(m: int, group_size: int) -> bool:
    """Whether the decode path takes an int4 call: M <= 16 and a group made of whole 32-wide tiles."""
    return m <= MAX_M and group_size % 32 == 0


def serves_int8(m: int) -> bool:
    """Whether the decode path takes an int8 call: M <= 16."""
    return m <= MAX_M
