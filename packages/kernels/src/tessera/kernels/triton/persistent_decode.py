"""Every decoder layer of a batch-1 decode step in ONE launch (opt-in, experimental).

At one token a step, a decode layer is a chain of small launches (norm, q/k/v, rope, cache write,
paged decode, merge, o, norm, gate/up, down), each a few microseconds of launch, ramp-up and tail
around a few MB of weights. Here one program per SM steps through all layers' phases together,
separated by grid-wide barriers (an arrival counter at GPU scope), so nothing is launched between
them; before each barrier a program loads its first weight tile of the next phase (its first two with
DEPTH 2), which does not depend on the activations, so the wait overlaps that load.

Per layer:
1. every program takes 1 / rms of the residual row (kept in float32, holding values of the model
   dtype) and computes tiles of the fused q/k/v projection from the normalised row;
2. attention: a work item per (kv head, split of the context); its program applies QK-norm and rope
   to the head's queries and key (float32, rounded once, as `rope_qk_norm`), writes the new key and
   value to the paged cache where its split holds the newest position (and takes that position's score
   from them directly), attends over its cached positions (online softmax; the first chunk loaded
   before the barrier, as nothing in the step writes it) and stores its partial; the last split of a
   head to arrive (a counter per head) merges the head's partials into the attention output;
3. the o projection, added to the residual (each sum rounded to the model dtype, as the model's adds);
4. the post-attention norm and the fused gate/up projection;
5. silu(gate) * up (rounded as `silu_mul`) and the down projection, added to the residual.

The caller applies the final norm and the LM head. The kernel needs all programs resident at once
(one per SM, and nothing else holding the SMs): a barrier that cannot complete gives up after a bounded
number of polls and counts the failure in `flag`, so an impossible launch shows as an error, not a hang.
Under the interpreter the programs run one after another, so only a one-program launch is meaningful
there.
"""

from __future__ import annotations

import triton
import triton.language as tl

from tessera.kernels.support import triton_interpreting
from tessera.kernels.triton.pdl import prefetch_l2
from tessera.kernels.triton.quant_gemv import _s8_words, _u4_group_dots

#: Pointers per layer in the table the kernel reads: the weights of fused q/k/v, o, fused gate/up and down
#: (float, int8, or int4 packed two a byte); input norm, post-attention norm, q norm, k norm; key cache,
#: value cache; the four projections' scales (int8: per row; int4: per row and group), then their zero
#: points (int4). Entries a model does not use hold any valid address.
SLOTS = 18
_SLOTS = tl.constexpr(SLOTS)

#: Bytes of one projection that the programs together ask the L2 to prefetch at once (L2_AHEAD): a third
#: of an H100's or H200's L2, so the projection in use and those asked ahead fit beside each other.
L2_BUDGET = tl.constexpr(16 << 20)

_INTERPRETING = tl.constexpr(triton_interpreting())


@triton.jit
def _load_acquire(ptr):
    """The int32 at `ptr`, loaded with acquire semantics at GPU scope by every thread (no broadcast through
    shared memory, but a request from every warp)."""
    return tl.inline_asm_elementwise("ld.acquire.gpu.global.b32 $0, [$1];", "=r,l", [ptr], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def _poll(counter, POLL: tl.constexpr):
    """The arrival count so far: POLL 0 (and 2) an atomic add of zero, which Triton runs as one thread's
    acquire load, its result broadcast to the others through shared memory (what the interpreter runs); POLL 1
    an acquire load in every thread."""
    if POLL == 1:
        return _load_acquire(counter)
    else:
        return tl.atomic_add(counter, 0, sem="acquire", scope="gpu")


@triton.jit
def _grid_barrier(counter, target, flag, SPIN_LIMIT: tl.constexpr, POLL: tl.constexpr = 0):
    """Arrive at `counter` and wait until it reaches `target` (`_wait_for`), from the count the arrival itself
    returns: the last program to arrive goes on without a poll (acquire and release in one atomic)."""
    tl.debug_barrier()  # every thread's stores of the phase before the program's release
    seen = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") + 1
    _wait_for(counter, target, flag, SPIN_LIMIT, POLL, seen)


@triton.jit
def _wait_for(counter, target, flag, SPIN_LIMIT: tl.constexpr, POLL: tl.constexpr, seen):
    """Wait until `counter` reaches `target` (`seen`: a count already read, an int32 tensor; 0 for none),
    polling as `_poll`'s POLL says, POLL 2 sleeping about 128 ns between polls (fewer polls queued at the
    counter's L2 slice ahead of the arrivals); after SPIN_LIMIT polls give up and count it in `flag`. No
    thread of the program reads on before the wait ends."""
    spins = 0
    while (seen < target) & (spins < SPIN_LIMIT):
        if POLL == 2 and not _INTERPRETING:
            if spins > 0:
                _nap(spins)
        seen = _poll(counter, POLL)
        spins += 1
    if seen < target:
        tl.atomic_add(flag, 1)
    tl.debug_barrier()


@triton.jit
def _nap(like):
    """Sleep about 128 ns (`nanosleep`; `like` only gives the assembly an operand)."""
    tl.inline_asm_elementwise("nanosleep.u32 128; mov.b32 $0, $1;", "=r,r", [like], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _stamp(TIMES, slot, pid, P, TIMED: tl.constexpr, GLOBAL: tl.constexpr = False):
    """With TIMED, this program's clock (SM cycles; with GLOBAL the GPU's nanosecond timer) into slot `slot`
    of TIMES ([slots, P] int64): where the phases' time goes, for `tessera.model.persistent.phase_profile`."""
    if TIMED:
        if GLOBAL:
            t = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [pid], dtype=tl.int64,
                                          is_pure=False, pack=1)
        else:
            t = tl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l,r", [pid], dtype=tl.int64, is_pure=False,
                                          pack=1)
        tl.store(TIMES + slot * P + pid, t)


@triton.jit
def _ptr(PTRS, layer, j: tl.constexpr, DT: tl.constexpr):
    """Entry j of `layer`'s row of the table, as a pointer to DT. The table holds 16-byte aligned addresses
    only (the caller checks), and saying so lets the weight tiles load 16 bytes a thread at a time: of a
    pointer read from memory the compiler otherwise assumes nothing, and loads element by element."""
    return tl.multiple_of(_address(PTRS, layer, j).to(tl.pointer_type(DT)), 16)


@triton.jit
def _address(PTRS, layer, j):
    """Entry j of `layer`'s row of the table: an address, as an int64."""
    return tl.load(PTRS + layer * _SLOTS + j)


@triton.jit
def _wptr(PTRS, layer, j: tl.constexpr, DT: tl.constexpr, QUANT: tl.constexpr):
    """Projection j's weight: DT for QUANT 0; for int8 (1) and packed int4 (2) int32 words, four or eight
    weights a word, which `_gemv` converts a word at a time."""
    if QUANT == 0:
        return _ptr(PTRS, layer, j, DT)
    else:
        return _ptr(PTRS, layer, j, tl.int32)


@triton.jit
def _tile(w, tile, N: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, BN: tl.constexpr):
    """Rows [tile * BN, tile * BN + BN) of a row-major [N, K] weight; rows past N read nothing."""
    rows = tile * BN + tl.arange(0, BN)
    cols = tl.arange(0, KP)
    return tl.load(w + rows[:, None] * K + cols[None, :], mask=(rows[:, None] < N) & (cols[None, :] < K), other=0.0)


@triton.jit
def _handoff(w, pid, P, N: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, BN: tl.constexpr, counter, target, flag,
             PREFETCH: tl.constexpr, SPIN_LIMIT: tl.constexpr, DEPTH: tl.constexpr, POLL: tl.constexpr = 0):
    """The barrier between two phases (polled as `_grid_barrier`'s POLL says), and this program's first
    tile of the next phase's weight `w` and, with DEPTH 2, its second (else the first again, unused): loaded
    before the wait with PREFETCH, so the wait overlaps their loads, after it otherwise."""
    if PREFETCH:
        first, second = _first_tiles(w, pid, P, N, K, KP, BN, DEPTH)
        _grid_barrier(counter, target, flag, SPIN_LIMIT, POLL)
    else:
        _grid_barrier(counter, target, flag, SPIN_LIMIT, POLL)
        first, second = _first_tiles(w, pid, P, N, K, KP, BN, DEPTH)
    return first, second


@triton.jit
def _prefetch_share(base, pid, P, N: tl.constexpr, ROW_BYTES: tl.constexpr, BN: tl.constexpr, OUT, MAXT: tl.constexpr,
                    RECORD: tl.constexpr = False):
    """Ask the L2 for this program's tiles (pid, pid + P, ...; rows [tile * BN, tile * BN + BN) but none past N)
    of the row-major [N, ROW_BYTES] byte matrix at address `base` (an int64, 16-byte aligned), a request a
    tile, in order, until the program's share of `L2_BUDGET` is asked for; a tile's bytes past its last
    multiple of 16 are left out (a bulk prefetch's unit), so requests stay aligned where tiles are a multiple
    of 16 bytes, and nothing is asked otherwise. With RECORD (for tests, under the interpreter) store each
    request's offset from `base` and size to OUT ([MAXT, 2] int64) instead."""
    if (BN * ROW_BYTES) % 16 == 0:
        tiles: tl.constexpr = (N + BN - 1) // BN
        budget = L2_BUDGET // P
        tile = pid
        i = 0
        while (tile < tiles) & (i * BN * ROW_BYTES < budget):
            offset = tile.to(tl.int64) * (BN * ROW_BYTES)
            size = (tl.minimum(BN, N - tile * BN) * ROW_BYTES) & -16
            if RECORD:
                tl.store(OUT + 2 * i, offset, mask=i < MAXT)
                tl.store(OUT + 2 * i + 1, size.to(tl.int64), mask=i < MAXT)
            elif not _INTERPRETING:
                prefetch_l2(base + offset, size, ONE_THREAD=True)
            tile += P
            i += 1


@triton.jit
def _prefetch_plan_kernel(OUT, N: tl.constexpr, ROW_BYTES: tl.constexpr, BN: tl.constexpr, MAXT: tl.constexpr):
    """`_prefetch_share`'s requests for program `program_id(0)` of `num_programs(0)`, recorded to its rows of
    OUT ([programs, MAXT, 2] int64), for tests."""
    pid = tl.program_id(0)
    _prefetch_share(0, pid, tl.num_programs(0), N, ROW_BYTES, BN, OUT + pid * MAXT * 2, MAXT, True)


@triton.jit
def _ahead(PTRS, layer, NOW: tl.constexpr, AHEAD: tl.constexpr, L: tl.constexpr, pid, P, D: tl.constexpr,
           DO: tl.constexpr, DI: tl.constexpr, NQKV: tl.constexpr, BN_QKV: tl.constexpr, BN_O: tl.constexpr,
           BN_GU: tl.constexpr, BN_D: tl.constexpr, QUANT: tl.constexpr, GS: tl.constexpr, DT: tl.constexpr):
    """L2_AHEAD: ask the L2 for this program's share of the projection AHEAD after `layer`'s projection NOW
    (0 q/k/v, 1 o, 2 gate/up, 3 down; counting on into the next layers; nothing past the last layer), so its
    weights stream from memory while the phases before it wait on barriers and activations. Nothing for
    AHEAD 0, or under the interpreter."""
    if AHEAD > 0 and not _INTERPRETING:
        KIND: tl.constexpr = (NOW + AHEAD) % 4
        target = layer + (NOW + AHEAD) // 4
        if target < L:
            if KIND == 0:
                _ahead_projection(PTRS, target, 0, NQKV, D, BN_QKV, pid, P, QUANT, GS, DT)
            elif KIND == 1:
                _ahead_projection(PTRS, target, 1, D, DO, BN_O, pid, P, QUANT, GS, DT)
            elif KIND == 2:
                _ahead_projection(PTRS, target, 2, 2 * DI, D, BN_GU, pid, P, QUANT, GS, DT)
            else:
                _ahead_projection(PTRS, target, 3, D, DI, BN_D, pid, P, QUANT, GS, DT)


@triton.jit
def _ahead_projection(PTRS, layer, J: tl.constexpr, N: tl.constexpr, K: tl.constexpr, BN: tl.constexpr, pid, P,
                      QUANT: tl.constexpr, GS: tl.constexpr, DT: tl.constexpr):
    """`_prefetch_share` of projection J's [N, K] weight in `layer`, with its int8 scales or int4 scales and
    zeros (float32, per row or per row and group)."""
    ROW: tl.constexpr = K * (DT.primitive_bitwidth // 8) if QUANT == 0 else (K if QUANT == 1 else K // 2)
    _prefetch_share(_address(PTRS, layer, J), pid, P, N, ROW, BN, PTRS, 1)
    if QUANT == 1:
        _prefetch_share(_address(PTRS, layer, 10 + J), pid, P, N, 4, BN, PTRS, 1)
    elif QUANT == 2:
        _prefetch_share(_address(PTRS, layer, 10 + J), pid, P, N, K // GS * 4, BN, PTRS, 1)
        _prefetch_share(_address(PTRS, layer, 14 + J), pid, P, N, K // GS * 4, BN, PTRS, 1)


@triton.jit
def _first_tiles(w, pid, P, N: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, BN: tl.constexpr,
                 DEPTH: tl.constexpr):
    """This program's first tile of `w` and, with DEPTH 2, its second (past the last tile: all masked);
    with DEPTH 1 the first twice."""
    first = _tile(w, pid, N, K, KP, BN)
    if DEPTH == 2:
        second = _tile(w, pid + P, N, K, KP, BN)
    else:
        second = first
    return first, second


@triton.jit
def _gemv(w, first, second, x, out, resid, pid, P, N: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
          BN: tl.constexpr, RESIDUAL: tl.constexpr, sc, zp, QUANT: tl.constexpr, GS: tl.constexpr,
          DEPTH: tl.constexpr = 1):
    """y = W @ x over this program's tiles (`first` and `second` issued: `_first_tiles`), rounded to the
    dtype; stored to `out`, or with RESIDUAL added to the float32 residual rows and the sum rounded. K is
    the input width (KP its power of two); QUANT 1: int8 rows times their scale `sc`; QUANT 2: int4, even k
    in the low nibble, (q - zero) * scale per row and group of GS (`zp`, `sc`; GS divides d_model, so is a
    power of two), taken per group as s * (sum q x - z * sum x), so a tile reads each row's scales and
    zeros once, not once a weight. int8 and int4 tiles are int32 words, each weight turned to float32 by
    one PRMT and a subtraction (`quant_gemv._s8_words`, `_u4_group_dots`), exactly, instead of an I2F, which
    runs at an eighth of the FMA rate and would bound the phase: x is split once a phase into the four
    (eight) vectors that meet byte (nibble) i of each word. DEPTH 1 loads a program's next tile after the
    current one's arithmetic; DEPTH 2 keeps two tiles in flight: while one is multiplied the next is loading
    (twice the registers)."""
    DT: tl.constexpr = out.dtype.element_ty
    tiles: tl.constexpr = (N + BN - 1) // BN
    EW: tl.constexpr = 8 if QUANT == 2 else (4 if QUANT == 1 else 1)  # weights an element of the tiles
    ASM: tl.constexpr = not _INTERPRETING  # the words' conversion by PRMT (bit ops under the interpreter)
    if QUANT == 1:
        # x at k = 4j + b for b = 0..3, [KP // 4] each, to meet byte b of word j
        xa, xb = tl.split(tl.reshape(x, (KP // 4, 2, 2)))  # b even, b odd
        x0, x2 = tl.split(xa)
        x1, x3 = tl.split(xb)
    elif QUANT == 2:
        NG: tl.constexpr = KP // GS  # groups a padded row (those past K // GS: zero weights, scales and x)
        GW: tl.constexpr = GS // 8  # words a group
        # x at k = 8j + i for nibble i = 0..7 of word j, [NG, GW] each
        xa, xb = tl.split(tl.reshape(x, (KP // 8, 2, 2, 2)))  # i even, i odd
        xaa, xab = tl.split(xa)
        xba, xbb = tl.split(xb)
        x0, x4 = tl.split(xaa)
        x2, x6 = tl.split(xab)
        x1, x5 = tl.split(xba)
        x3, x7 = tl.split(xbb)
        x0 = tl.reshape(x0, (NG, GW))
        x1 = tl.reshape(x1, (NG, GW))
        x2 = tl.reshape(x2, (NG, GW))
        x3 = tl.reshape(x3, (NG, GW))
        x4 = tl.reshape(x4, (NG, GW))
        x5 = tl.reshape(x5, (NG, GW))
        x6 = tl.reshape(x6, (NG, GW))
        x7 = tl.reshape(x7, (NG, GW))
        xsum = tl.sum(x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7, axis=1)  # [NG]
        g = tl.arange(0, NG)
    wt = first
    wn = second  # DEPTH 2: the tile after `wt`, issued
    tile = pid
    while tile < tiles:
        rows = tile * BN + tl.arange(0, BN)
        if QUANT == 2:
            ok = (rows[:, None] < N) & (g[None, :] < K // GS)
            at = rows[:, None] * (K // GS) + g[None, :]
            s = tl.load(sc + at, mask=ok, other=0.0)  # [BN, NG]
            z = tl.load(zp + at, mask=ok, other=0.0)
            dots = _u4_group_dots(tl.reshape(wt, (BN, NG, GW)), x0, x1, x2, x3, x4, x5, x6, x7, ASM)  # [BN, NG]
            y = tl.sum(s * (dots - z * xsum[None, :]), axis=1)
        elif QUANT == 1:
            w0, w1, w2, w3 = _s8_words(wt, ASM)
            y = tl.sum(w0 * x0[None, :] + w1 * x1[None, :] + w2 * x2[None, :] + w3 * x3[None, :], axis=1)
            y = y * tl.load(sc + rows, mask=rows < N, other=0.0)
        else:
            y = tl.sum(wt.to(tl.float32) * x[None, :], axis=1)
        y = y.to(DT).to(tl.float32)
        if RESIDUAL:
            r = tl.load(resid + rows, mask=rows < N, other=0.0, cache_modifier=".cg")
            tl.store(resid + rows, (r + y).to(DT).to(tl.float32), mask=rows < N)
        else:
            tl.store(out + rows, y.to(DT), mask=rows < N)
        tile += P
        if DEPTH == 2:  # the tile after the next issued now, while the next (in flight) is multiplied
            wt = wn
            wn = _tile(w, tile + P, N, K // EW, KP // EW, BN)  # past the end: all masked, nothing read
        elif tile < tiles:
            wt = _tile(w, tile, N, K // EW, KP // EW, BN)


@triton.jit
def _normed_row(X, weight, D: tl.constexpr, eps, DT: tl.constexpr):
    """rms_norm of the residual row with `weight`, rounded to the dtype (as the norm op), in float32."""
    cols = tl.arange(0, D)
    h = tl.load(X + cols, cache_modifier=".cg")
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / D + eps)
    return (h * rstd * tl.load(weight + cols).to(tl.float32)).to(DT).to(tl.float32)


@triton.jit
def _rotated(src, rows, w, cos, sin, eps, HD: tl.constexpr, QK_NORM: tl.constexpr, DT: tl.constexpr):
    """Heads `rows` [R] of `src` (rows of HD) after QK-norm (with QK_NORM) and rope, in float32, rounded
    once to the dtype: `x * cos + rotate_half(x) * sin`."""
    HALF: tl.constexpr = HD // 2
    ds = tl.arange(0, HD)
    sw = (ds + HALF) % HD
    x = tl.load(src + rows[:, None] * HD + ds[None, :], cache_modifier=".cg").to(tl.float32)
    xs = tl.load(src + rows[:, None] * HD + sw[None, :], cache_modifier=".cg").to(tl.float32)
    if QK_NORM:
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / HD + eps)
        x = x * rstd[:, None] * tl.load(w + ds).to(tl.float32)[None, :]
        xs = xs * rstd[:, None] * tl.load(w + sw).to(tl.float32)[None, :]
    sign = tl.where(ds < HALF, -1.0, 1.0)
    return (x * cos[None, :] + sign[None, :] * xs * sin[None, :]).to(DT).to(tl.float32)


@triton.jit
def _span(item, t_ctx, S: tl.constexpr):
    """Work item `item`'s kv head and its split's positions [begin, end) of a context of t_ctx."""
    span = (t_ctx + S - 1) // S
    begin = (item % S) * span
    return item // S, begin, tl.minimum(begin + span, t_ctx)


@triton.jit
def _kv_chunk(kc, vc, TABLE, kvh, t0, stop, HKV: tl.constexpr, HD: tl.constexpr, BS: tl.constexpr,
              BT: tl.constexpr):
    """Keys and values [BT, HD] of kv head `kvh` at positions t0 .. t0 + BT - 1 through the block table, in
    the cache's dtype; positions at or past `stop` read nothing (zeros)."""
    ds = tl.arange(0, HD)
    ts = t0 + tl.arange(0, BT)
    ok = ts < stop
    blk = tl.load(TABLE + ts // BS, mask=ok, other=0).to(tl.int64)
    at = ((blk * BS + ts % BS) * (HKV * HD) + kvh * HD)[:, None] + ds[None, :]
    return tl.load(kc + at, mask=ok[:, None], other=0.0), tl.load(vc + at, mask=ok[:, None], other=0.0)


@triton.jit
def _attention_first(kc, vc, TABLE, CTX, pid, HKV: tl.constexpr, HD: tl.constexpr, BS: tl.constexpr,
                     S: tl.constexpr, BT: tl.constexpr):
    """The first chunk of cached keys and values of this program's first work item (`_attention`): positions
    before the newest, which nothing in this step writes, so they may load before the barrier that opens
    attention, overlapping it. A program with no work item reads nothing. Also the context length, which
    `_attention` takes from here rather than reading it again."""
    t_ctx = tl.load(CTX)
    kvh, begin, end = _span(pid, t_ctx, S)
    stop = tl.where(pid < HKV * S, tl.minimum(end, t_ctx - 1), begin)
    k_first, v_first = _kv_chunk(kc, vc, TABLE, kvh, begin, stop, HKV, HD, BS, BT)
    return k_first, v_first, t_ctx


@triton.jit
def _attention(A, O, kc, vc, wq, wk, COS, SIN, SLOT, TABLE, t_ctx, PART, HCNT, pid, P, eps, scale, k_first, v_first,
               HKV: tl.constexpr, G: tl.constexpr, HD: tl.constexpr, BS: tl.constexpr, S: tl.constexpr,
               SP: tl.constexpr, BT: tl.constexpr, QK_NORM: tl.constexpr, HREADY=None, ready=0, flag=None,
               SPIN_LIMIT: tl.constexpr = 0, POLL: tl.constexpr = 0, READY: tl.constexpr = False):
    """Phase 2 (module docstring). The newest position's key and value come from the q/k/v output, not
    read back from the cache: a split that holds it starts its online softmax with that position, then
    runs over its cached positions chunk by chunk (the first chunk, `k_first` and `v_first`, loaded by
    `_attention_first`, before the barrier). READY: no barrier before this phase; an item first waits until
    its kv head's count in HREADY reaches `ready` (`_signal_heads`)."""
    DT: tl.constexpr = O.dtype.element_ty
    NQ: tl.constexpr = HKV * G * HD
    W: tl.constexpr = HD + 2  # a partial: acc [HD], running max, running sum
    gs = tl.arange(0, G)
    ds = tl.arange(0, HD)
    one = tl.arange(0, 1)
    slot = tl.load(SLOT).to(tl.int64)
    cos = tl.load(COS + ds).to(tl.float32)
    sin = tl.load(SIN + ds).to(tl.float32)
    kk = k_first
    vv = v_first
    item = pid
    while item < HKV * S:
        kvh, begin, end = _span(item, t_ctx, S)
        split = item % S
        cached = tl.minimum(end, t_ctx - 1)  # the cached positions are [begin, cached)
        if item != pid:  # a later item of this program: its first chunk now
            kk, vv = _kv_chunk(kc, vc, TABLE, kvh, begin, cached, HKV, HD, BS, BT)
        if READY:
            _wait_for(HREADY + kvh, ready, flag, SPIN_LIMIT, POLL, tl.full((), 0, tl.int32))  # nothing read yet
        q = _rotated(A, kvh * G + gs, wq, cos, sin, eps, HD, QK_NORM, DT)  # [G, HD]
        k_new = _rotated(A + NQ, kvh + one, wk, cos, sin, eps, HD, QK_NORM, DT)  # [1, HD]
        v_new = tl.load(A + NQ + HKV * HD + kvh * HD + ds[None, :] + one[:, None] * 0, cache_modifier=".cg")
        holds = (t_ctx - 1 >= begin) & (t_ctx - 1 < end)  # this split holds the newest position
        dst = slot * (HKV * HD) + kvh * HD + ds[None, :] + one[:, None] * 0
        tl.store(kc + dst, k_new.to(DT), mask=holds & (slot >= 0) & (ds[None, :] < HD))
        tl.store(vc + dst, v_new, mask=holds & (slot >= 0) & (ds[None, :] < HD))
        s_new = tl.sum(q * k_new, axis=1) * scale  # [G]
        m = tl.where(holds, s_new, float("-inf"))
        lsum = tl.where(holds, 1.0, 0.0) + tl.zeros((G,), tl.float32)
        acc = tl.where(holds, v_new.to(tl.float32), 0.0) + tl.zeros((G, HD), tl.float32)
        for t0 in range(begin, cached, BT):
            ok = t0 + tl.arange(0, BT) < cached
            sc = tl.sum(q[:, None, :] * kk.to(tl.float32)[None, :, :], axis=2) * scale  # [G, BT]
            sc = tl.where(ok[None, :], sc, float("-inf"))
            m_new = tl.maximum(m, tl.max(sc, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(sc - m_new[:, None])
            lsum = lsum * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vv.to(tl.float32)[None, :, :], axis=1)
            m = m_new
            # the next chunk (or nothing), loaded once this one is used: two chunks held at once spill
            kk, vv = _kv_chunk(kc, vc, TABLE, kvh, t0 + BT, cached, HKV, HD, BS, BT)
        base = PART + (kvh * S + split) * G * W
        tl.store(base + gs[:, None] * W + ds[None, :], acc)
        tl.store(base + gs * W + HD, m)
        tl.store(base + gs * W + HD + 1, lsum)
        tl.debug_barrier()  # every thread's partial before one thread publishes it
        arrived = tl.atomic_add(HCNT + kvh, 1, sem="acq_rel", scope="gpu")
        last = arrived == S - 1
        ss = tl.arange(0, SP)
        live = (ss < S)[:, None] & last
        hp = PART + (kvh * S + ss)[:, None] * G * W + gs[None, :] * W  # [SP, G]
        pm = tl.load(hp + HD, mask=live, other=float("-inf"), cache_modifier=".cg")
        pl = tl.load(hp + HD + 1, mask=live, other=0.0, cache_modifier=".cg")
        top = tl.max(pm, axis=0)
        wgt = tl.where(live & (pm > float("-inf")), tl.exp(pm - top[None, :]), 0.0)
        pacc = tl.load(hp[:, :, None] + ds[None, None, :], mask=live[:, :, None], other=0.0, cache_modifier=".cg")
        out = tl.sum(pacc * wgt[:, :, None], axis=0) / tl.sum(pl * wgt, axis=0)[:, None]
        tl.store(O + (kvh * G + gs)[:, None] * HD + ds[None, :], out.to(DT), mask=last & (ds[None, :] < HD))
        tl.atomic_xchg(HCNT + kvh, 0, mask=last, sem="relaxed", scope="gpu")  # ready for the next layer
        item += P


@triton.jit
def _qkv_phase(PTRS, layer, w, w2, X, A, pid, P, eps, D: tl.constexpr, NQKV: tl.constexpr, BN: tl.constexpr,
               QUANT: tl.constexpr, GS: tl.constexpr, DT: tl.constexpr, DEPTH: tl.constexpr, HREADY,
               HKV: tl.constexpr, G: tl.constexpr, HD: tl.constexpr, READY: tl.constexpr):
    """Input norm, then this program's tiles of the fused q/k/v projection (the first, `w`, loaded); with
    READY, each tile then counted at its kv head (`_signal_heads`)."""
    x = _normed_row(X, _ptr(PTRS, layer, 4, DT), D, eps, DT)
    _gemv(_wptr(PTRS, layer, 0, DT, QUANT), w, w2, x, A, X, pid, P, NQKV, D, D, BN, False,
          _ptr(PTRS, layer, 10, tl.float32), _ptr(PTRS, layer, 14, tl.float32), QUANT, GS, DEPTH)
    if READY:
        _signal_heads(HREADY, pid, P, NQKV, BN, HKV, G, HD)


@triton.jit
def _signal_heads(HREADY, pid, P, N: tl.constexpr, BN: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr,
                  HD: tl.constexpr):
    """HEAD_READY: for each q/k/v tile this program stored, one release increment of its kv head's count in
    HREADY (a tile lies within one head's q, k or v rows: BN divides the head dim), so attention on a head
    waits for that head's tiles alone, not for a grid barrier; a head is complete at (G + 2) * HD / BN a
    layer (`ready_count`)."""
    tl.debug_barrier()  # every thread's stores of the tiles before the program's release
    NQ: tl.constexpr = HKV * G * HD
    tiles: tl.constexpr = (N + BN - 1) // BN
    tile = pid
    while tile < tiles:
        row = tile * BN
        head = tl.where(row < NQ, row // (G * HD), ((row - NQ) // HD) % HKV)  # q rows, else k then v rows
        tl.atomic_add(HREADY + head, 1, sem="release", scope="gpu")
        tile += P


@triton.jit
def _o_phase(PTRS, layer, w, w2, O, A, X, pid, P, D: tl.constexpr, DO: tl.constexpr, BN: tl.constexpr,
             QUANT: tl.constexpr, GS: tl.constexpr, DT: tl.constexpr, DEPTH: tl.constexpr):
    """The o projection of the attention output, added to the residual."""
    cols = tl.arange(0, DO)
    x = tl.load(O + cols, cache_modifier=".cg").to(tl.float32)
    _gemv(_wptr(PTRS, layer, 1, DT, QUANT), w, w2, x, A, X, pid, P, D, DO, DO, BN, True,
          _ptr(PTRS, layer, 11, tl.float32), _ptr(PTRS, layer, 15, tl.float32), QUANT, GS, DEPTH)


@triton.jit
def _gate_up_phase(PTRS, layer, w, w2, X, GU, pid, P, eps, D: tl.constexpr, DI: tl.constexpr, BN: tl.constexpr,
                   QUANT: tl.constexpr, GS: tl.constexpr, DT: tl.constexpr, DEPTH: tl.constexpr):
    """Post-attention norm, then the fused gate/up projection."""
    x = _normed_row(X, _ptr(PTRS, layer, 5, DT), D, eps, DT)
    _gemv(_wptr(PTRS, layer, 2, DT, QUANT), w, w2, x, GU, X, pid, P, 2 * DI, D, D, BN, False,
          _ptr(PTRS, layer, 12, tl.float32), _ptr(PTRS, layer, 16, tl.float32), QUANT, GS, DEPTH)


@triton.jit
def _down_phase(PTRS, layer, w, w2, GU, X, pid, P, D: tl.constexpr, DI: tl.constexpr, DI_P: tl.constexpr,
                BN: tl.constexpr, QUANT: tl.constexpr, GS: tl.constexpr, DT: tl.constexpr, DEPTH: tl.constexpr):
    """silu(gate) * up (rounded as `silu_mul`), then the down projection, added to the residual."""
    cols = tl.arange(0, DI_P)
    gate = tl.load(GU + cols, mask=cols < DI, other=0.0, cache_modifier=".cg").to(tl.float32)
    up = tl.load(GU + DI + cols, mask=cols < DI, other=0.0, cache_modifier=".cg").to(tl.float32)
    x = ((gate * tl.sigmoid(gate)).to(DT).to(tl.float32) * up).to(DT).to(tl.float32)
    _gemv(_wptr(PTRS, layer, 3, DT, QUANT), w, w2, x, GU, X, pid, P, D, DI, DI_P, BN, True,
          _ptr(PTRS, layer, 13, tl.float32), _ptr(PTRS, layer, 17, tl.float32), QUANT, GS, DEPTH)


@triton.jit
def decode_layers_kernel(X, PTRS, A, O, GU, PART, HCNT, HREADY, CNT, FLAG, COS, SIN, SLOT, TABLE, CTX, eps, LAYER,
                         TIMES, SCALE: tl.constexpr, L: tl.constexpr, D: tl.constexpr, HKV: tl.constexpr,
                         G: tl.constexpr, HD: tl.constexpr,
                         DI: tl.constexpr, DI_P: tl.constexpr, BS: tl.constexpr, S: tl.constexpr,
                         SP: tl.constexpr, BT: tl.constexpr, BN_QKV: tl.constexpr, BN_O: tl.constexpr,
                         BN_GU: tl.constexpr, BN_D: tl.constexpr, QK_NORM: tl.constexpr, PREFETCH: tl.constexpr,
                         SPIN_LIMIT: tl.constexpr, QUANT: tl.constexpr = 0, GS: tl.constexpr = 128,
                         DEPTH: tl.constexpr = 1, ONLY: tl.constexpr = -1, POLL: tl.constexpr = 0,
                         TIMED: tl.constexpr = 0, L2_AHEAD: tl.constexpr = 0, HEAD_READY: tl.constexpr = 0):
    """Every layer, phases between grid barriers; or, with ONLY = k in 0..4, phase k of layer LAYER alone
    and no barrier (a launch per phase: the kernel boundary is the barrier, which is how the CPU checks run
    several programs under the interpreter). With TIMED, each program stamps its clock into TIMES
    ([timer_slots(L), P] int64) as each phase starts (slot 10 l + 2 k) and ends (10 l + 2 k + 1), and the GPU
    timer and its clock at the launch's start and end (slots 10 L .. 10 L + 3). With L2_AHEAD = a > 0, as a
    program reaches each projection (before the barrier that opens it) it asks the L2 for its share of the
    projection a later (`_ahead`), so that in steady state each phase's weights load from the L2. With
    HEAD_READY, no grid barrier between q/k/v and attention: each attention item waits for its own kv head's
    q/k/v tiles (HREADY, zeroed before the launch; `_signal_heads`)."""
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    DT: tl.constexpr = A.dtype.element_ty
    DO: tl.constexpr = HKV * G * HD
    NQKV: tl.constexpr = DO + 2 * HKV * HD
    PK: tl.constexpr = 8 if QUANT == 2 else (4 if QUANT == 1 else 1)  # weights an element of the weight tiles
    READY_LAYER: tl.constexpr = (G + 2) * HD // BN_QKV  # a kv head's q/k/v tiles a layer (`ready_count`)
    if ONLY == 0:
        w, w2 = _first_tiles(_wptr(PTRS, LAYER, 0, DT, QUANT), pid, P, NQKV, D // PK, D // PK, BN_QKV, DEPTH)
        _qkv_phase(PTRS, LAYER, w, w2, X, A, pid, P, eps, D, NQKV, BN_QKV, QUANT, GS, DT, DEPTH, HREADY, HKV, G, HD,
                   HEAD_READY)
    elif ONLY == 1:
        kc = _ptr(PTRS, LAYER, 8, DT)
        vc = _ptr(PTRS, LAYER, 9, DT)
        kf, vf, t_ctx = _attention_first(kc, vc, TABLE, CTX, pid, HKV, HD, BS, S, BT)
        _attention(A, O, kc, vc, _ptr(PTRS, LAYER, 6, DT),
                   _ptr(PTRS, LAYER, 7, DT), COS, SIN, SLOT, TABLE, t_ctx, PART, HCNT, pid, P, eps, SCALE, kf, vf,
                   HKV, G, HD, BS, S, SP, BT, QK_NORM, HREADY, (LAYER + 1) * READY_LAYER, FLAG, SPIN_LIMIT, POLL,
                   HEAD_READY)
    elif ONLY == 2:
        w, w2 = _first_tiles(_wptr(PTRS, LAYER, 1, DT, QUANT), pid, P, D, DO // PK, DO // PK, BN_O, DEPTH)
        _o_phase(PTRS, LAYER, w, w2, O, A, X, pid, P, D, DO, BN_O, QUANT, GS, DT, DEPTH)
    elif ONLY == 3:
        w, w2 = _first_tiles(_wptr(PTRS, LAYER, 2, DT, QUANT), pid, P, 2 * DI, D // PK, D // PK, BN_GU, DEPTH)
        _gate_up_phase(PTRS, LAYER, w, w2, X, GU, pid, P, eps, D, DI, BN_GU, QUANT, GS, DT, DEPTH)
    elif ONLY == 4:
        w, w2 = _first_tiles(_wptr(PTRS, LAYER, 3, DT, QUANT), pid, P, D, DI // PK, DI_P // PK, BN_D, DEPTH)
        _down_phase(PTRS, LAYER, w, w2, GU, X, pid, P, D, DI, DI_P, BN_D, QUANT, GS, DT, DEPTH)
    else:
        _stamp(TIMES, 10 * L, pid, P, TIMED, True)
        _stamp(TIMES, 10 * L + 1, pid, P, TIMED)
        phase = 0
        w, w2 = _first_tiles(_wptr(PTRS, 0, 0, DT, QUANT), pid, P, NQKV, D // PK, D // PK, BN_QKV, DEPTH)
        for a in tl.static_range(1, L2_AHEAD + 1):  # the projections after layer 0's q/k/v, up to L2_AHEAD
            _ahead(PTRS, 0, 0, a, L, pid, P, D, DO, DI, NQKV, BN_QKV, BN_O, BN_GU, BN_D, QUANT, GS, DT)
        for layer in range(L):
            _stamp(TIMES, 10 * layer, pid, P, TIMED)
            _qkv_phase(PTRS, layer, w, w2, X, A, pid, P, eps, D, NQKV, BN_QKV, QUANT, GS, DT, DEPTH, HREADY, HKV, G,
                       HD, HEAD_READY)
            _stamp(TIMES, 10 * layer + 1, pid, P, TIMED)
            # the o projection's first tile, held through attention; with DEPTH 2 its second is loaded after
            # attention, around the barrier that ends it as PREFETCH says (two tiles held through attention
            # spill registers)
            _ahead(PTRS, layer, 1, L2_AHEAD, L, pid, P, D, DO, DI, NQKV, BN_QKV, BN_O, BN_GU, BN_D, QUANT, GS, DT)
            # and attention's first chunk of cached keys and values, around the barrier as PREFETCH says
            kc = _ptr(PTRS, layer, 8, DT)
            vc = _ptr(PTRS, layer, 9, DT)
            if PREFETCH or HEAD_READY:
                kf, vf, t_ctx = _attention_first(kc, vc, TABLE, CTX, pid, HKV, HD, BS, S, BT)
            if HEAD_READY:  # no barrier: attention items wait for their own heads
                w, w2 = _first_tiles(_wptr(PTRS, layer, 1, DT, QUANT), pid, P, D, DO // PK, DO // PK, BN_O, 1)
            else:
                phase += 1
                w, w2 = _handoff(_wptr(PTRS, layer, 1, DT, QUANT), pid, P, D, DO // PK, DO // PK, BN_O, CNT,
                                 phase * P, FLAG, PREFETCH, SPIN_LIMIT, 1, POLL)
            if not (PREFETCH or HEAD_READY):
                kf, vf, t_ctx = _attention_first(kc, vc, TABLE, CTX, pid, HKV, HD, BS, S, BT)
            _stamp(TIMES, 10 * layer + 2, pid, P, TIMED)
            _attention(A, O, kc, vc, _ptr(PTRS, layer, 6, DT),
                       _ptr(PTRS, layer, 7, DT), COS, SIN, SLOT, TABLE, t_ctx, PART, HCNT, pid, P, eps, SCALE, kf, vf,
                       HKV, G, HD, BS, S, SP, BT, QK_NORM, HREADY, (layer + 1) * READY_LAYER, FLAG, SPIN_LIMIT, POLL,
                       HEAD_READY)
            _stamp(TIMES, 10 * layer + 3, pid, P, TIMED)
            phase += 1
            if DEPTH == 2:  # the o projection's second tile (the one from pid + P), around the barrier
                w2, _ = _handoff(_wptr(PTRS, layer, 1, DT, QUANT), pid + P, P, D, DO // PK, DO // PK, BN_O, CNT,
                                 phase * P, FLAG, PREFETCH, SPIN_LIMIT, 1, POLL)
            else:
                _grid_barrier(CNT, phase * P, FLAG, SPIN_LIMIT, POLL)
            _stamp(TIMES, 10 * layer + 4, pid, P, TIMED)
            _o_phase(PTRS, layer, w, w2, O, A, X, pid, P, D, DO, BN_O, QUANT, GS, DT, DEPTH)
            _stamp(TIMES, 10 * layer + 5, pid, P, TIMED)
            phase += 1
            _ahead(PTRS, layer, 2, L2_AHEAD, L, pid, P, D, DO, DI, NQKV, BN_QKV, BN_O, BN_GU, BN_D, QUANT, GS, DT)
            w, w2 = _handoff(_wptr(PTRS, layer, 2, DT, QUANT), pid, P, 2 * DI, D // PK, D // PK, BN_GU, CNT,
                             phase * P, FLAG, PREFETCH, SPIN_LIMIT, DEPTH, POLL)
            _stamp(TIMES, 10 * layer + 6, pid, P, TIMED)
            _gate_up_phase(PTRS, layer, w, w2, X, GU, pid, P, eps, D, DI, BN_GU, QUANT, GS, DT, DEPTH)
            _stamp(TIMES, 10 * layer + 7, pid, P, TIMED)
            phase += 1
            _ahead(PTRS, layer, 3, L2_AHEAD, L, pid, P, D, DO, DI, NQKV, BN_QKV, BN_O, BN_GU, BN_D, QUANT, GS, DT)
            w, w2 = _handoff(_wptr(PTRS, layer, 3, DT, QUANT), pid, P, D, DI // PK, DI_P // PK, BN_D, CNT,
                             phase * P, FLAG, PREFETCH, SPIN_LIMIT, DEPTH, POLL)
            _stamp(TIMES, 10 * layer + 8, pid, P, TIMED)
            _down_phase(PTRS, layer, w, w2, GU, X, pid, P, D, DI, DI_P, BN_D, QUANT, GS, DT, DEPTH)
            _stamp(TIMES, 10 * layer + 9, pid, P, TIMED)
            phase += 1
            # the next layer's q/k/v tiles (after the last layer, layer 0's: read and left unused)
            _ahead(PTRS, layer + 1, 0, L2_AHEAD, L, pid, P, D, DO, DI, NQKV, BN_QKV, BN_O, BN_GU, BN_D, QUANT, GS,
                   DT)
            w, w2 = _handoff(_wptr(PTRS, (layer + 1) % L, 0, DT, QUANT), pid, P, NQKV, D // PK, D // PK, BN_QKV,
                             CNT, phase * P, FLAG, PREFETCH, SPIN_LIMIT, DEPTH, POLL)
        _stamp(TIMES, 10 * L + 2, pid, P, TIMED, True)
        _stamp(TIMES, 10 * L + 3, pid, P, TIMED)


def ready_count(g: int, hd: int, bn_qkv: int) -> int:
    """HEAD_READY: the q/k/v tiles of one kv head a layer (G query rows of HD, a key and a value, BN_QKV rows a
    tile), the count `_signal_heads` adds to the head's counter each layer (the kernel's READY_LAYER)."""
    return (g + 2) * hd // bn_qkv


def timer_slots(layers: int) -> int:
    """Rows of a TIMED launch's TIMES: a start and an end for each of a layer's five phases, and the GPU
    timer and the clock at the launch's start and end."""
    return 10 * layers + 4


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def tile_rows(n: int, k_padded: int, programs: int, elements: int = 16384) -> int:
    """Rows a tile for an [n, k] weight: at most `elements` a tile (weights, or bytes of packed int4; they
    take registers), and no more rows than spread the tiles over every program."""
    return max(1, min(_pow2_floor(elements // k_padded), _pow2_floor(max(1, n // programs))))
