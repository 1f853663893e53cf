"""Run under TRITON_INTERPRET=1: the byte ranges the persistent decode kernel asks the L2 for (L2_AHEAD),
recorded instead of prefetched (`persistent_decode._prefetch_plan_kernel`). For each program they must be
exactly its own tiles (pid, pid + P, ...) of the [N, ROW_BYTES] matrix, in order, a request a tile covering
its rows inside the matrix up to their last multiple of 16 bytes, 16-byte aligned, and no more tiles than
the program's share of `L2_BUDGET` holds; nothing at all where a tile is no multiple of 16 bytes. Prints
`prefetch-plan-ok`."""

from __future__ import annotations

import torch

from tessera.kernels.triton import persistent_decode as pd

MAXT = 12


def expected(pid: int, programs: int, n: int, row_bytes: int, bn: int) -> list[tuple[int, int]]:
    """The [start, end) byte span of each tile the program should ask for, in order."""
    tile_bytes = bn * row_bytes
    if tile_bytes % 16:
        return []
    tiles, budget = -(-n // bn), int(pd.L2_BUDGET) // programs
    spans = []
    for i, tile in enumerate(range(pid, tiles, programs)):
        if i * tile_bytes >= budget:
            break
        rows = min(bn, n - tile * bn)
        spans.append((tile * tile_bytes, tile * tile_bytes + (rows * row_bytes) // 16 * 16))
    return spans


def main() -> None:
    cases = [  # (programs, N, ROW_BYTES, BN)
        (3, 10, 64, 4),  # a partial last tile
        (4, 4096, 2048, 16),  # Qwen3-0.6B's q/k/v in bf16 over 4 programs (more tiles than MAXT)
        (4, 256 * 40, 8192, 256),  # tiles of 2 MB: the share of L2_BUDGET (4 MB) stops each program at 2 of 10
        (5, 96, 1536, 4),  # int4 down rows (3072 / 2 bytes)
        (2, 7, 40, 2),  # rows of 40 bytes: tiles of 80, a partial last tile of 40 -> 32
        (3, 9, 4, 4),  # int8 scales, 4 rows a tile: 16 bytes; the last tile 4 bytes -> nothing
        (2, 8, 4, 2),  # 8-byte tiles: nothing asked
        (6, 3, 32, 1),  # fewer tiles than programs
        (1, 300, 48, 1),  # one program, tiles of 48 bytes (chunks of 16)
    ]
    for programs, n, row_bytes, bn in cases:
        out = torch.full((programs, MAXT, 2), -1, dtype=torch.int64)
        pd._prefetch_plan_kernel[(programs,)](out, n, row_bytes, bn, MAXT)
        for pid in range(programs):
            want = expected(pid, programs, n, row_bytes, bn)[:MAXT]
            got = [(o, o + s) for o, s in out[pid].tolist() if s >= 0]
            assert got == want, (programs, n, row_bytes, bn, pid, got, want)
            assert all(a % 16 == 0 and b % 16 == 0 and b <= n * row_bytes for a, b in got)
        print(f"{programs} programs, [{n}, {row_bytes}] bytes, {bn} rows a tile: ok")
    print("prefetch-plan-ok")


if __name__ == "__main__":
    main()
