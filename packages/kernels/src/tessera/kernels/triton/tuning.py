"""Autotuning that never stalls serving: keys are bucketed and results cached on disk.

Kernels key their tuning on `*_BUCKET` arguments (powers of two) rather than raw lengths, so a new
sequence length reuses the bucket's winner instead of benchmarking every config again; with
`cache_results` Triton also keeps winners across processes. Under the interpreter only a small
config runs: timing means nothing there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import triton

from tessera.kernels.support import bucket, triton_interpreting

__all__ = ["autotune", "bucket", "dot_precision", "graph_bench"]


def autotune(configs: Sequence[triton.Config], key: list[str], interpret: triton.Config,
             **kwargs: object):
    """`triton.autotune` with on-disk caching; under the interpreter only the `interpret` config."""
    configs = [interpret] if triton_interpreting() else list(configs)
    return triton.autotune(configs=configs, key=key, cache_results=True, **kwargs)


def _l2_sweep(device: int) -> object:
    """Twice the L2 of int32s (contents unset: only read): one read of it leaves none of a tuned
    kernel's operands cached. Allocated per measurement, so a serving process does not keep it."""
    import torch

    nbytes = 2 * max(torch.cuda.get_device_properties(device).L2_cache_size, 1 << 20)
    return torch.empty(nbytes // 4, dtype=torch.int32, device=f"cuda:{device}")


def graph_bench(fn: Callable[[], object], quantiles: Sequence[float] | None = None, calls: int = 32,
                replays: int = 20) -> float | list[float]:
    """Milliseconds per call of `fn` as a decode step under CUDA graphs pays it: `calls` launches
    captured in one graph, each after a read of twice the L2 (so operands come from memory, and the
    cache holds clean lines, as after the previous layer's weights), minus the same graph without `fn`.

    A drop-in for the autotuner's `do_bench`. Its timing loop launches from Python, so a kernel of a few
    microseconds is ranked with the host's launch cost and an L2 warm from the previous call; graph time
    is what matters at decode, and the two orders differ (the int8 GEMV configs at 4096 x 4096 did).

    Each call pays a sweep about as long as a large GEMV, so the difference is noisy: 32 calls a graph and
    the median of 20 replays (about 0.1 s a config) are meant to keep near-tied tiles from trading places
    between processes. With 16 x 12 the int8 M = 16 time at 8192 x 8192 moved between 1.40x and 1.61x of
    bf16 from one process to the next."""
    import torch

    fn()  # compiles; errors (out of resources, ...) surface here, outside any capture
    torch.cuda.synchronize()
    sweep = _l2_sweep(torch.cuda.current_device())
    sweep.sum()

    def capture(with_fn: bool) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                sweep.sum()
                if with_fn:
                    fn()
        graph.replay()  # the first replay uploads the graph
        return graph

    def replay_ms(graph: torch.cuda.CUDAGraph) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    timed, base = capture(True), capture(False)
    # Replays alternate between the two graphs, so a change of clocks shifts both sides of a difference.
    per_call = sorted(max(replay_ms(timed) - replay_ms(base), 0.0) / calls for _ in range(replays))
    del timed, base
    if quantiles is None:
        return per_call[replays // 2]
    return [per_call[min(int(q * replays), replays - 1)] for q in quantiles]


def dot_precision(dtype: object) -> str:
    """float32 operands get exact IEEE products (the spec's float32 tolerance is tighter than tf32's)."""
    import torch

    return "ieee" if dtype == torch.float32 else "tf32"
