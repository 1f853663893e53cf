"""Run as a script under TRITON_INTERPRET=1: the decode-shape quantized and dense matmul kernels at explicit configs
(every M path, M == 1 on the CUDA cores, padded to tl.dot and on the word path, split-K 1/2/3, K not a multiple of the
tile, odd N, int4 groups 32/64/128 with a partial last group, int4 tiles inside one group and tiles of 2
and 4 whole groups) against the torch reference at
the catalogue's tolerances; after every split-K launch the per-tile counters must be back at zero. Prints
one JSON list of failures, then "gemv-ok" if none."""

from __future__ import annotations

import itertools

import torch
from check_report import report, seed_arg

from tessera.kernels import reference, registry  # registering installs the interpreter fixes
from tessera.kernels.triton import gemv, quant_gemv, split_k


def _close(op: str, got: torch.Tensor, want: torch.Tensor) -> str | None:
    tol = registry.catalogue[op].tolerance(str(want.dtype).removeprefix("torch."))
    try:
        torch.testing.assert_close(got, want, atol=tol.atol, rtol=tol.rtol)
    except AssertionError as e:
        return str(e).splitlines()[0] + " " + " ".join(str(e).splitlines()[1:3])
    return None


def main(seed: int) -> int:
    gen = torch.Generator().manual_seed(seed)
    failures: list[str] = []

    def check(name: str, op: str, got: torch.Tensor, want: torch.Tensor, counters: torch.Tensor) -> None:
        err = _close(op, got, want)
        if err:
            failures.append(f"{name}: {err}")
        if counters.any():
            failures.append(f"{name}: split-K counters left at {counters.nonzero().flatten().tolist()}")

    counters = split_k.stream_counters(torch.device("cpu"), 0)
    for dtype in (torch.float32, torch.bfloat16):
        for m in (1, 4, 16):
            x_wide = torch.randn(m, 3 * 200, generator=gen).to(dtype)
            x = x_wide[:, ::3]  # a strided K: the kernels take any x strides
            # M == 1 only: rows narrower than a tensor-core tile, the padded tl.dot path ("dot": M1_DOT), and
            # the int8 word path ("words", also on the strided x that the launch copies into place).
            only_m1 = [(4, 128, 2, ""), (16, 64, 1, "dot"), (32, 32, 3, "dot"), (8, 64, 1, "words"),
                       (16, 32, 3, "words"), (4, 128, 2, "words")] if m == 1 else []
            # (37, 200): ragged N and K, so masked tiles; (48, 256): tiles that divide both (EVEN, no masks).
            for (n, k), (bn, bk, split, path) in itertools.product(
                    ((37, 200), (48, 256)), [(16, 64, 1, ""), (16, 64, 2, ""), (32, 32, 3, ""), *only_m1]):
                m1_dot, words = path == "dot", path == "words"
                xk = x if k == 200 else torch.randn(m, k, generator=gen).to(dtype)
                w_q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
                w_q[0, :3] = torch.tensor([-128, 127, 0], dtype=torch.int8)  # the ends of the int8 range
                scale = ((torch.rand(n, generator=gen) + 0.5) / 127 * k**-0.5).to(dtype)
                y = torch.full((m, n), float("nan"), dtype=dtype)
                quant_gemv.launch_int8(xk, w_q, scale, y, kernel=quant_gemv.int8_gemv_kernel, BN=bn, BK=bk,
                                       SPLIT_K=split, M1_DOT=m1_dot, WORDS=words)
                check(f"int8 {dtype} m{m} n{n} k{k} bn{bn} bk{bk} split{split} {path or 'bytes'}",
                      "matmul.int8_weight_only", y, reference.matmul_int8_weight_only(xk, w_q, scale), counters)
                if words:  # the dense GEMV has no word path
                    continue
                w = (torch.randn(n, k, generator=gen) * k**-0.5).to(dtype)
                y = torch.full((m, n), float("nan"), dtype=dtype)
                gemv.launch(xk, w, y, kernel=gemv.dense_gemv_kernel, BN=bn, BK=bk, SPLIT_K=split, M1_DOT=m1_dot)
                check(f"dense {dtype} m{m} n{n} k{k} bn{bn} bk{bk} split{split} {path or 'bytes'}",
                      "matmul.dense", y, reference.matmul_dense(xk, w), counters)
            # 224 = 128 + 96: group 128's last group is partial; tiles inside one group (BK <= group).
            # 600: every group's last group is partial and K is no multiple of any tile; tiles of 2 and
            # 4 whole groups.
            for k, n in ((224, 19), (600, 21)):
                x = torch.randn(m, k, generator=gen).to(dtype)
                for group in (32, 64, 128):
                    groups = -(-k // group)
                    qweight = reference.pack_int4(torch.randint(0, 16, (n, k), generator=gen))
                    scales = ((torch.rand(n, groups, generator=gen) + 0.2) * k**-0.5 / 8).to(dtype)
                    zeros = torch.randint(0, 16, (n, groups), generator=gen).to(dtype)
                    zeros[0] += 0.375  # the op takes any float zero point, not only the quantizer's integers
                    want = reference.matmul_int4_awq(x, qweight, scales, zeros, group)
                    tiles = ((16, 32, 1), (16, min(group, 64), 2), (32, 32, 3)) if k == 224 else \
                        ((16, 2 * group, 1), (16, 2 * group, 2), (32, 4 * group, 1), (16, 4 * group, 2))
                    # The word path (M == 1): tiles of one, two and four whole groups, split or not.
                    words = ((16, group, 1), (8, 2 * group, 2), (32, 4 * group, 1)) if m == 1 else ()
                    for (bn, bk, split), w in [*((t, False) for t in tiles), *((t, True) for t in words)]:
                        y = torch.full((m, n), float("nan"), dtype=dtype)
                        quant_gemv.launch_int4(x, qweight, scales, zeros, group, y,
                                               kernel=quant_gemv.int4_gemv_kernel, BN=bn, BK=bk, SPLIT_K=split,
                                               WORDS=w)
                        check(f"int4 {dtype} m{m} k{k} g{group} bn{bn} bk{bk} split{split} words{int(w)}",
                              "matmul.int4_awq", y, want, counters)
    return report(failures, "gemv-ok")


if __name__ == "__main__":
    raise SystemExit(main(seed_arg()))
