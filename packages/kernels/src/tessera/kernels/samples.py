"""Sample inputs for every catalogued op: fresh random tensors, odd sizes and non-contiguous views.

`samples(op, dtype, device, seed, real=False)` returns named argument tuples for the op's reference
signature. `real=False` gives tiny shapes (fast under Triton's CPU interpreter); `real=True` gives
model-sized shapes for GPU runs. Used by the parity tests and by the benchmarks' `--tiny` mode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tessera.kernels.reference import pack_int4


@dataclass
class Sample:
    """One call of an op. Parity compares its results, then the arguments at `inplace` (what it writes in
    place: the caches of `kv_cache.write` and `attention.decode_paged_write`)."""

    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    inplace: tuple[int, ...] = ()


class _Rand:
    def __init__(self, seed: int, device: torch.device | str) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.device = torch.device(device)

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=self.gen) * scale).to(dtype=dtype, device=self.device)

    def randint(self, low: int, high: int, *shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.randint(low, high, shape, generator=self.gen).to(dtype=dtype, device=self.device)

    def perm(self, n: int) -> torch.Tensor:
        return torch.randperm(n, generator=self.gen)

    def cu(self, lengths: list[int], dtype: torch.dtype = torch.int32) -> torch.Tensor:
        return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=dtype, device=self.device)


def _strided_rows(r: _Rand, rows: int, d: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """[rows, d] whose rows are not adjacent in memory (a column slice of a wider tensor)."""
    return r.randn(rows, d + 5, dtype=dtype, scale=scale)[:, 3 : 3 + d]


def _rms_norm(r: _Rand, dtype: torch.dtype, real: bool) -> list[Sample]:
    d = 4096 if real else 37
    rows = (1024, 3) if real else (3, 5)
    return [
        Sample("3d", (r.randn(*rows, d, dtype=dtype), r.randn(d, dtype=dtype), 1e-6)),
        Sample("one-row", (r.randn(1, 2 * d + 1, dtype=dtype), r.randn(2 * d + 1, dtype=dtype), 1e-5)),
        Sample("strided", (_strided_rows(r, 13, d, dtype), r.randn(d, dtype=dtype), 1e-6)),
        Sample("fp32-weight", (r.randn(7, d, dtype=dtype), r.randn(d), 1e-6)),
    ]


def _rms_norm_residual(r: _Rand, dtype: torch.dtype, real: bool) -> list[Sample]:
    d = 4096 if real else 37
    rows = 2048 if real else 9
    return [
        Sample("2d", (r.randn(rows, d, dtype=dtype), r.randn(rows, d, dtype=dtype), r.randn(d, dtype=dtype), 1e-6)),
        Sample("strided", (_strided_rows(r, 11, d, dtype), r.randn(11, d, dtype=dtype), r.randn(d, dtype=dtype),
                           1e-6)),
    ]


def _swiglu(r: _Rand, dtype: torch.dtype, real: bool) -> list[Sample]:
    m, k, n = (300, 1024, 2816) if real else (7, 40, 33)
    s = k**-0.5
    return [
        Sample("odd", (r.randn(m, k, dtype=dtype), r.randn(n, k, dtype=dtype, scale=s), r.randn(n, k, dtype=dtype,
                                                                                               scale=s))),
        Sample("transposed-x", (r.randn(k, 5, dtype=dtype).T, r.randn(n, k, dtype=dtype, scale=s),
                                r.randn(n, k, dtype=dtype, scale=s))),
        Sample("strided-w", (r.randn(m, k, dtype=dtype), _strided_rows(r, n, k, dtype, s),
                             _strided_rows(r, n, k, dtype, s))),
    ]


def _silu_mul(r: _Rand, dtype: torch.dtype, real: bool) -> list[Sample]:
    rows, f = (64, 8960) if real else (5, 37)
    fused = r.randn(rows, 2 * f, dtype=dtype, scale=3.0)  # gate and up as column halves of one GEMM's output
    return [
        Sample("fused-halves", (fused[:, :f], fused[:, f:])),
        Sample("contiguous", (r.randn(rows, f, dtype=dtype, scale=3.0), r.randn(rows, f, dtype=dtype))),
        Sample("one-row-strided", (_strided_rows(r, 1, f + 3, dtype, 3.0), _strided_rows(r, 1, f + 3, dtype))),
    ]


def _qkv(r: _Rand, n: int, hq: int, hkv: int, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """q, k, v as head slices of one fused [N, Hq + 2 Hkv, D] projection (non-contiguous, as in a model)."""
    qkv = r.randn(n, hq + 2 * hkv, d, dtype=dtype)
    return qkv[:, :hq], qkv[:, hq : hq + hkv], qkv[:, hq + hkv :]


def _rope_tables(r: _Rand, n: int, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [N, D] of random positions (halves equal, as a model makes them)."""
    inv_freq = 10000.0 ** (-torch.arange(0, d, 2).float() / d)
    angles = torch.randint(0, 4096, (n, 1), generator=r.gen).float() * inv_freq
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype=dtype, device=r.device), emb.sin().to(dtype=dtype, device=r.device)


def _rope_cases(r: _Rand, dtype: torch.dtype, real: bool) -> list[tuple[str, tuple[torch.Tensor, ...]]]:
    """(name, (q, k, cos, sin)) cases: odd N, GQA and MQA, D 64 and 128, fused-qkv head slices, and
    unrelated cos/sin halves with strided tables (the op's contract is the general formula)."""
    shapes = [(1027, 16, 8, 128), (1, 32, 8, 64)] if real else [(7, 4, 2, 64), (1, 8, 1, 128), (5, 2, 2, 64)]
    out = []
    for n, hq, hkv, d in shapes:
        q, k, _ = _qkv(r, n, hq, hkv, d, dtype)
        out.append((f"n{n}-{hq}/{hkv}-d{d}-fused-qkv", (q, k, *_rope_tables(r, n, d, dtype))))
    n, d = 3, 64
    q = r.randn(4, n, d, dtype=dtype).transpose(0, 1)
    k = r.randn(n, 2, d, dtype=dtype)
    cos, sin = _strided_rows(r, n, d, dtype), _strided_rows(r, n, d, dtype)
    out.append(("heads-major-q-general-tables", (q, k, cos, sin)))
    return out


def _rope(r: _Rand, dtype: torch.dtype, real: bool) -> list[Sample]:
    return [Sample(name, args) for name, args in _rope_cases(r, dtype, real)]


def _rope_qk_norm(r: _Rand, dtype: torch.dtype, real: bool) -> list[Sample]:
    out = []
    for name, (q, k, cos, sin) in _rope_cases(r, dtype, real):
        d = q.shape[-1]
        weights = (r.randn(d, dtype=dtype, scale=0.3) + 1, r.randn(d, dtype=dtype, scale=0.3) + 1)
        out.append(Sample(name, (q, k, cos, sin, *weights, 1e-6)))
    return out


def _prefill(r: _Rand, dtype: torch.dtype, real: bool) -> list[Sample]:
    out = []
    cases = [([1000, 517, 1], 32, 8, 128), ([777, 64], 8, 8, 64)] if real else [([5, 19, 1], 4, 2, 64),
                                                                                ([12, 7], 2, 2, 32)]
    for lengths, hq, hkv, d in cases:
        n = sum(lengths)
        q, k, v = _qkv(r, n, hq, hkv, d, dtype)
        cu = r.cu(lengths)
        out.append(Sample(f"varlen-causal-{hq}/{hkv}-d{d}", (q, k, v, cu, max(lengths))))
        out.append(Sample(f"varlen-full-{hq}/{hkv}-d{d}", (q, k, v, cu.long()), {"causal": False, "scale": 0.3}))
    lengths = [256, 256] if real else [9, 9]
    q, k, v = _qkv(r, sum(lengths), 4, 2, 64, dtype)
    out.append(Sample("equal-lengths", (q, k, v, r.cu(lengths), lengths[0])))
    return out


def _paged_cache(r: _Rand, ctx: list[int], page: int, hkv: int, d: int, dtype: torch.dtype,
                 spare_blocks: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random caches and a block table whose blocks are scattered (a random permutation)."""
    per_seq = [-(-c // page) for c in ctx]
    width = max(1, *per_seq) + 1
    num_blocks = sum(per_seq) + spare_blocks
    k_cache = r.randn(num_blocks, page, hkv, d, dtype=dtype)
    v_cache = r.randn(num_blocks, page, hkv, d, dtype=dtype)
    order = r.perm(num_blocks)
    table = torch.zeros(len(ctx), width, dtype=torch.int32)
    used = 0
    for i, n in enumerate(per_seq):
        table[i, :n] = order[used : used + n].to(torch.int32)
        used += n
    return k_cache, v_cache, table.to(r.device)


def _decode(r: _Rand, dtype: torch.dtype, real: bool) -> list[Sample]:
    cases = [([2048, 1, 3000, 517], 16, 32, 8, 128), ([8192], 16, 8, 8, 64)] if real else \
        [([1, 37, 0, 70], 4, 4, 2, 64), ([50], 8, 2, 2, 32)]
    out = []
    for ctx, page, hq, hkv, d in cases:
        k_cache, v_cache, table = _paged_cache(r, ctx, page, hkv, d, dtype)
        q = r.randn(len(ctx), hq, d, dtype=dtype)
        lens = torch.tensor(ctx, dtype=torch.int32, device=r.device)
        out.append(Sample(f"ctx{ctx}-page{page}-{hq}/{hkv}", (q, k_cache, v_cache, table, lens)))
    k_cache, v_cache, table = _paged_cache(r, [9, 4], 4, 2, 32, dtype)
    q = r.randn(2, 3 * 4, 32, dtype=dtype)[:, ::3]
    out.append(Sample("strided-q", (q, k_cache, v_cache, table, torch.tensor([9, 4], dtype=torch.int32,
                                                                             device=r.device)), {"scale": 0.2}))
    return out


def _decode_write(r: _Rand, dtype: torch.dtype, real: bool) -> list[Sample]:
    """`_decode`'s cases, each sequence bringing its newest k/v row (v a strided view) for the slot of
    position ctx - 1; a sequence without context, and one padding lane (slot -1), write nothing."""
    out = []
    for i, s in enumerate(_decode(r, dtype, real)):
        q, k_cache, v_cache, table, lens = s.args
        b, hkv, d = q.shape[0], k_cache.shape[2], k_cache.shape[3]
        page = k_cache.shape[1]
        slots = [int(table[j, (c - 1) // page]) * page + (c - 1) % page if c > 0 else -1
                 for j, c in enumerate(lens.tolist())]
        if i == 0 and b > 1:
            slots[1] = -1
        k = r.randn(b, hkv, d, dtype=dtype)
        v = r.randn(b, 2 * hkv, d, dtype=dtype)[:, ::2]
        slot_mapping = torch.tensor(slots, dtype=torch.int64, device=r.device)
        out.append(Sample(s.name, (q, k, v, k_cache, v_cache, slot_mapping, table, lens), s.kwargs, inplace=(3, 4)))
    return out


def _decode_rope(r: _Rand, dtype: torch.dtype, real: bool) -> list[Sample]:
    """`_decode_write`'s cases with unrotated q and k and their rows' rope tables, alternately with QK-norm
    weights; q as a head slice of a fused projection."""
    out = []
    for i, s in enumerate(_decode_write(r, dtype, real)):
        q, k, v, *rest = s.args
        b, hq, d = q.shape
        q = r.randn(b, hq + 2, d, dtype=dtype)[:, 1 : hq + 1]
        cos, sin = _rope_tables(r, b, d, dtype)
        kwargs = dict(s.kwargs)
        if i % 2:
            kwargs |= {"q_weight": r.randn(d, dtype=dtype, scale=0.3) + 1,
                       "k_weight": r.randn(d, dtype=dtype, scale=0.3) + 1, "eps": 1e-6}
        out.append(Sample(f"{s.name}{'-qk-norm' if i % 2 else ''}", (q, k, v, cos, sin, *rest), kwargs,
                          inplace=(5, 6)))
    return out


def _prefill_paged(r: _Rand, dtype: torch.dtype, real: bool) -> list[Sample]:
    cases = [([1500, 300, 64], [1500, 17, 64], 16, 32, 8, 128)] if real else \
        [([9, 20, 3], [4, 20, 1], 4, 4, 2, 64), ([33], [5], 8, 2, 1, 32)]
    out = []
    for ctx, q_lens, page, hq, hkv, d in cases:
        k_cache, v_cache, table = _paged_cache(r, ctx, page, hkv, d, dtype)
        q, _, _ = _qkv(r, sum(q_lens), hq, hkv, d, dtype)
        lens = torch.tensor(ctx, dtype=torch.int32, device=r.device)
        out.append(Sample(f"ctx{ctx}-q{q_lens}-{hq}/{hkv}", (q, k_cache, v_cache, table, r.cu(q_lens), lens,
                                                             max(q_lens))))
    return out


def _kv_write(r: _Rand, dtype: torch.dtype, real: bool) -> list[Sample]:
    nb, page, hkv, d, n = (512, 16, 8, 128, 300) if real else (6, 4, 2, 32, 7)
    k_cache = r.randn(nb, page, hkv, d, dtype=dtype)
    v_cache = r.randn(nb, page, hkv, d, dtype=dtype)
    slots = r.perm(nb * page)[:n].to(r.device)
    slots[1] = -1
    slots[n - 2] = -1
    k, v = r.randn(n, hkv, d, dtype=dtype), r.randn(n, 2 * hkv, d, dtype=dtype)[:, ::2]
    return [Sample("scatter-with-padding", (k, v, k_cache, v_cache, slots), inplace=(2, 3))]


def _dense(r: _Rand, dtype: torch.dtype, real: bool) -> list[Sample]:
    # M == 1 takes the CUDA-core path, 1 < M <= 16 the padded tl.dot one; N narrow enough to split K,
    # odd N and K, M past the decode range (the reference's), and x a transposed view.
    sizes = [(1, 2048, 1024), (1, 1024, 4096), (4, 3072, 1024), (16, 4096, 1000), (5, 2000, 513),
             (33, 1024, 768)] if real else [(1, 48, 33), (3, 100, 20), (16, 200, 37), (1, 256, 8), (20, 40, 9)]
    out = [Sample(f"m{m}-k{k}-n{n}", (r.randn(m, k, dtype=dtype), r.randn(n, k, dtype=dtype, scale=k**-0.5)))
           for m, k, n in sizes]
    out.append(Sample("transposed-x", (r.randn(40, 3, dtype=dtype).T, r.randn(9, 40, dtype=dtype, scale=0.2))))
    return out


def _int8(r: _Rand, dtype: torch.dtype, real: bool) -> list[Sample]:
    # M <= 16 takes the split-K decode kernels, 16 < M <= 64 the tiled ones, M > 64 (half x) dequantize +
    # torch.mm; odd N, K odd or not a multiple of any tile.
    sizes = [(1, 4096, 4096), (1, 8192, 2048), (16, 4096, 1000), (5, 2000, 513), (257, 1024, 768),
             (513, 2001, 1000)] if real else [(1, 48, 33), (7, 100, 20), (16, 200, 37), (17, 72, 19), (70, 101, 23)]
    out = []
    for m, k, n in sizes:
        w_q = r.randint(-127, 128, n, k, dtype=torch.int8)
        scale = (r.randn(n).abs() + 0.5).to(dtype) / 127 * k**-0.5
        out.append(Sample(f"m{m}-k{k}-n{n}", (r.randn(m, k, dtype=dtype), w_q, scale)))
    out.append(Sample("transposed-x", (r.randn(40, 3, dtype=dtype).T, r.randint(-127, 128, 9, 40, dtype=torch.int8),
                                       r.randn(9).abs().to(dtype) / 127)))
    return out


def _int4(r: _Rand, dtype: torch.dtype, real: bool) -> list[Sample]:
    # M <= 16 with a group of whole 32-wide tiles takes the split-K decode kernels, M > 64 (half x) dequantize +
    # torch.mm, the rest the tiled kernel; the last group is partial. K = 600 / 4000 is no multiple of the
    # decode kernels' multi-group tiles (256 to 1024 wide), which the autotuner may pick on a GPU.
    sizes = [(1, 4096, 4096), (1, 8192, 2048), (1, 4000, 1000), (16, 4000, 1000), (100, 1000, 256),
             (300, 2000, 1000)] if real else \
        [(1, 200, 9), (1, 600, 21), (5, 80, 17), (16, 160, 19), (16, 600, 7), (20, 96, 11), (70, 232, 13)]
    out = []
    for m, k, n in sizes:
        for g in (16, 32, 64, 128):  # 16: a 32-wide K tile spans two groups
            groups = -(-k // g)
            qweight = pack_int4(r.randint(0, 16, n, k))
            scales = ((r.randn(n, groups).abs() + 0.2) * (k**-0.5) / 8).to(dtype)
            zeros = r.randint(0, 16, n, groups).to(dtype)
            out.append(Sample(f"m{m}-k{k}-n{n}-g{g}", (r.randn(m, k, dtype=dtype), qweight, scales, zeros, g)))
    k, n = 96, 5
    qweight, scales, zeros = pack_int4(r.randint(0, 16, n, k)), r.randn(n, 3).abs().to(dtype) / 16, r.randn(n, 3)
    out.append(Sample("transposed-x", (r.randn(k, 3, dtype=dtype).T, qweight, scales, zeros.to(dtype), 32)))
    return out


def _fp8(r: _Rand, dtype: torch.dtype, real: bool) -> list[Sample]:
    # K and N multiples of 16 (the alignment torch._scaled_mm needs) beside odd N that only Triton takes.
    sizes = [(1, 4096, 4096), (300, 4096, 1000), (1024, 2048, 2048), (257, 2048, 512)] if real else \
        [(1, 48, 33), (7, 64, 20), (9, 64, 48), (70, 96, 32)]
    out = []
    for m, k, n in sizes:
        w_q = (r.randn(n, k) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
        x = r.randn(m, k, dtype=dtype)
        out.append(Sample(f"m{m}-k{k}-n{n}-tensor-scale", (x, w_q, r.randn(1).abs() * 1e-3 + 1e-4)))
        out.append(Sample(f"m{m}-k{k}-n{n}-row-scale", (x, w_q, r.randn(n).abs() * 1e-3 + 1e-4)))
    w_q = (r.randn(6, 32) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    out.append(Sample("strided-x", (_strided_rows(r, 5, 32, dtype), w_q, r.randn(6).abs() * 1e-3 + 1e-4)))
    return out


def _gated(base: Callable[[_Rand, torch.dtype, bool], list[Sample]]) -> Callable[[_Rand, torch.dtype, bool],
                                                                                 list[Sample]]:
    """Samples of a gated matmul from its plain one's: x [M, K] becomes a fused gate/up output [M, 2K] (a
    transposed x, a transposed one)."""

    def make(r: _Rand, dtype: torch.dtype, real: bool) -> list[Sample]:
        out = []
        for s in base(r, dtype, real):
            x, *rest = s.args
            m, k = x.shape
            gu = r.randn(m, 2 * k, dtype=dtype) if x.is_contiguous() else r.randn(2 * k, m, dtype=dtype).T
            out.append(Sample(s.name, (gu, *rest), s.kwargs))
        return out

    return make


def _normed(base: Callable[[_Rand, torch.dtype, bool], list[Sample]]) -> Callable[[_Rand, torch.dtype, bool],
                                                                                 list[Sample]]:
    """Samples of a normalised matmul from its plain one's: x [M, K] gains a residual (a transposed one beside
    a transposed x) and a norm weight, and eps follows the plain arguments."""

    def make(r: _Rand, dtype: torch.dtype, real: bool) -> list[Sample]:
        out = []
        for s in base(r, dtype, real):
            x, *rest = s.args
            m, k = x.shape
            residual = r.randn(m, k, dtype=dtype) if x.is_contiguous() else r.randn(k, m, dtype=dtype).T
            weight = (r.randn(k).abs() + 0.5).to(dtype)
            out.append(Sample(s.name, (x, residual, weight, *rest, 1e-6), s.kwargs))
        return out

    return make


def _qkv_rope(int8: bool) -> Callable[[_Rand, torch.dtype, bool], list[Sample]]:
    """Samples of a fused q/k/v projection with its rope and cache write (int8 weights, or AWQ int4), with rope
    tables, paged caches and slots (a padding lane where there are several tokens): Llama-3.2-1B's and
    Qwen3-0.6B's heads at one and 16 tokens, and small GQA and no-q-head cases (one with a transposed x)."""

    def make(r: _Rand, dtype: torch.dtype, real: bool) -> list[Sample]:
        cases = [(1, 32, 8, 64, 2048, 128), (16, 16, 8, 128, 1024, 128)] if real else \
            [(1, 2, 1, 16, 64, 32), (3, 4, 2, 16, 128, 32), (5, 0, 1, 32, 64, 16)]
        out = []
        for m, hq, hkv, d, k, g in cases:
            n, groups = (hq + 2 * hkv) * d, -(-k // g)
            if int8:
                weights: tuple = (r.randint(-127, 128, n, k, dtype=torch.int8),
                                  (r.randn(n).abs() + 0.5).to(dtype) / 127 * k**-0.5)
            else:
                weights = (pack_int4(r.randint(0, 16, n, k)),
                           ((r.randn(n, groups).abs() + 0.2) * (k**-0.5) / 8).to(dtype),
                           r.randint(0, 16, n, groups).to(dtype), g)
            cos, sin = _rope_tables(r, m, d, dtype)
            blocks, page = 4 * m, 4
            k_cache, v_cache = r.randn(blocks, page, hkv, d, dtype=dtype), r.randn(blocks, page, hkv, d, dtype=dtype)
            slots = r.perm(blocks * page)[:m].to(r.device)
            if m > 1:
                slots[1] = -1
            x = r.randn(k, m, dtype=dtype).T if hq == 0 else r.randn(m, k, dtype=dtype)  # a transposed x too
            cache_at = 1 + len(weights) + 2
            out.append(Sample(f"m{m}-hq{hq}-hkv{hkv}-d{d}-k{k}" + ("" if int8 else f"-g{g}"),
                              (x, *weights, cos, sin, k_cache, v_cache, slots, hq, hkv),
                              inplace=(cache_at, cache_at + 1)))
        return out

    return make


def _swiglu_rows(base: Callable[[_Rand, torch.dtype, bool], list[Sample]]) -> Callable[[_Rand, torch.dtype, bool],
                                                                                      list[Sample]]:
    """Samples of a SwiGLU matmul from its plain one's: each per-row weight tensor (every argument after x but
    the last) gains a second half of rows, the up projection's, drawn like the first (its rows rolled by one)."""

    def make(r: _Rand, dtype: torch.dtype, real: bool) -> list[Sample]:
        out = []
        for s in base(r, dtype, real):
            x, *weights, last = s.args
            fused = [torch.cat([w, w.roll(1, 0)]) for w in weights]
            out.append(Sample(s.name, (x, *fused, last), s.kwargs))
        return out

    return make


_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
SAMPLERS: dict[str, tuple[Callable[[_Rand, torch.dtype, bool], list[Sample]], tuple[torch.dtype, ...]]] = {
    "rms_norm": (_rms_norm, _FLOATS),
    "rms_norm_residual": (_rms_norm_residual, _FLOATS),
    "swiglu": (_swiglu, _FLOATS),
    "silu_mul": (_silu_mul, _FLOATS),
    "rope": (_rope, _FLOATS),
    "rope_qk_norm": (_rope_qk_norm, _FLOATS),
    "attention.prefill": (_prefill, _FLOATS),
    "attention.prefill_paged": (_prefill_paged, _FLOATS),
    "attention.decode_paged": (_decode, _FLOATS),
    "attention.decode_paged_write": (_decode_write, _FLOATS),
    "attention.decode_paged_rope": (_decode_rope, _FLOATS),
    "kv_cache.write": (_kv_write, _FLOATS),
    "matmul.dense": (_dense, _FLOATS),
    "matmul.int8_weight_only": (_int8, _FLOATS),
    "matmul.int4_awq": (_int4, _FLOATS),
    "matmul.fp8": (_fp8, (torch.bfloat16, torch.float16)),
    "matmul.dense_gated": (_gated(_dense), _FLOATS),
    "matmul.int8_weight_only_gated": (_gated(_int8), _FLOATS),
    "matmul.int4_awq_gated": (_gated(_int4), _FLOATS),
    "matmul.int4_awq_swiglu": (_swiglu_rows(_int4), _FLOATS),
    "matmul.int4_awq_qkv_rope": (_qkv_rope(int8=False), _FLOATS),
    "matmul.int8_weight_only_qkv_rope": (_qkv_rope(int8=True), _FLOATS),
    "matmul.dense_normed": (_normed(_dense), _FLOATS),
    "matmul.int8_weight_only_normed": (_normed(_int8), _FLOATS),
    "matmul.int4_awq_normed": (_normed(_int4), _FLOATS),
}


def dtypes(op: str) -> tuple[torch.dtype, ...]:
    """The activation dtypes `samples` can make for `op`."""
    return SAMPLERS[op][1]


def samples(op: str, dtype: torch.dtype, device: torch.device | str = "cpu", seed: int = 0,
            real: bool = False) -> list[Sample]:
    """Fresh inputs for `op` in `dtype` on `device`; raises KeyError naming an op with no sampler."""
    if op not in SAMPLERS:
        raise KeyError(f"no samples for op {op!r}; have {sorted(SAMPLERS)}")
    return SAMPLERS[op][0](_Rand(seed, device), dtype, real)
