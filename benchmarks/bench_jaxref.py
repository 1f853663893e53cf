"""tessera.jaxref (JAX/XLA) vs the PyTorch `tessera.model.Transformer`, on the same random weights.

Prefill forward over `[B, T]` tokens (no cache) in bf16: tokens/s of each, the JAX/torch ratio, and
the achieved matmul FLOP/s as a fraction of a measured bf16 torch.mm ceiling. Parity: the fp32 max
|logit difference| between the two with the highest matmul precision on both sides (no TF32; the
torch model's registry ops pinned to their fp32 references, and also with its default backends),
and the bf16 difference of the timed runs.

Both frameworks are timed the same way: wall clock around one call plus a device sync (JAX has no
CUDA events on torch's stream), median of `repeats` after warm-up; a call lasts milliseconds, so the
sync costs a negligible share. The JAX time excludes compilation (warm-up compiles).

    source scripts/gpu-env.sh && python3 benchmarks/bench_jaxref.py --out $OUT     # H200, ~3 min
    python3 benchmarks/bench_jaxref.py --tiny                                      # CPU smoke run, seconds
    python3 benchmarks/bench_jaxref.py --parity-only --fp64-floor                  # full presets, CPU parity
    python3 benchmarks/bench_jaxref.py --parity-only --fp64-floor --torch-blas cublas cublaslt  # GPU, per BLAS

`--sum-block N` adds, to each parity row, the torch model with its float32 projections summed over K in
blocks of N products added pairwise (`tessera.kernels.dense.float32_sum_blocks`), as jaxref sums its own
(`tessera.jaxref.layers.SUM_BLOCK`); the plain figures stay beside it.

`--torch-blas` repeats the parity rows with the torch side's CUDA matmuls on each named library
(`torch.backends.cuda.preferred_blas_library`): their float32 GEMMs sum in different orders, so the
torch model's own float32 error, and hence the difference to jaxref, depends on the library.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

# JAX would otherwise reserve 75% of the GPU at start-up and starve the torch model beside it.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import measure_ceilings, print_table, write_result

from tessera.jaxref import forward, from_hf_state
from tessera.kernels import dense, registry
from tessera.model import Transformer
from tessera.model.fusion import route_decode_linears
from tessera.specs import ModelConfig


def wall(fn: Callable[[], object], sync: Callable[[object], None], repeats: int, warmup: int) -> float:
    """Median seconds of `fn()` followed by `sync(result)`, after `warmup` calls."""
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def torch_sync(_: object) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextmanager
def reference_kernels() -> Iterator[None]:
    """Pin every registry op of the torch model to its plain-torch reference (fp32 math, no TF32)."""
    for op in registry.ops():
        registry.pin(op, "reference")
    try:
        yield
    finally:
        for op in registry.ops():
            registry.pin(op, None)


def prefill_flops(cfg: ModelConfig, batch: int, seq: int) -> float:
    """Matmul FLOPs of a causal prefill: 2 x (non-embedding params + lm_head) per token, plus scores
    and values over the (T + 1) / 2 keys a query sees on average."""
    linear = cfg.num_params(include_embeddings=False) + cfg.vocab_size * cfg.d_model
    head_dim = cfg.head_dim or cfg.d_model // cfg.n_heads
    attn = 2 * 2 * cfg.n_layers * cfg.n_heads * head_dim * (seq + 1) / 2
    return batch * seq * (2 * linear + attn)


@contextmanager
def blas_library(name: str | None) -> Iterator[None]:
    """torch's CUDA matmuls on `name` ("cublas" or "cublaslt") inside the block; None leaves torch's choice."""
    if name is None:
        yield
        return
    previous = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(name)
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(previous)


def _parity(model: Transformer, got: np.ndarray, ids: np.ndarray, name: str, parity_tokens: int,
            device: torch.device, exact: np.ndarray | None, library: str | None, sum_block: int | None) -> dict:
    """One parity row: jaxref's float32 logits `got` against the torch model's, with the BLAS in force;
    with `exact` (the torch model's float64 logits) also each side's float32 error against it; with
    `sum_block` also the torch model's logits with its float32 projections summed in blocks."""
    label = f"{name} ({library})" if library else name
    with torch.inference_mode():
        default = model(torch.from_numpy(ids).to(device)).float().cpu().numpy()
        with reference_kernels():
            ref = model(torch.from_numpy(ids).to(device)).float().cpu().numpy()
    fp32_diff = float(np.abs(got - ref).max())
    print(f"{label}: fp32 max|logit diff| {fp32_diff:.3g} (max|logit| {np.abs(ref).max():.3g})")
    parity = {"preset": name, "torch_blas": library or "torch default", "tokens": parity_tokens,
              "fp32_max_logit_diff": fp32_diff,
              "within_2e-5": fp32_diff <= 2e-5, "fp32_diff_default_kernels": float(np.abs(got - default).max()),
              "fp32_max_abs_logit": float(np.abs(ref).max())}
    if exact is not None:
        parity["torch_fp32_vs_fp64"] = float(np.abs(ref - exact).max())
        parity["jax_fp32_vs_fp64"] = float(np.abs(got - exact).max())
        print(f"{label}: vs float64, torch {parity['torch_fp32_vs_fp64']:.3g}, jax {parity['jax_fp32_vs_fp64']:.3g}")
    if sum_block is not None:
        with torch.inference_mode(), reference_kernels(), dense.float32_sum_blocks(sum_block):
            blocked = model(torch.from_numpy(ids).to(device)).float().cpu().numpy()
        parity["sum_block"] = sum_block
        parity["fp32_max_logit_diff_sum_blocks"] = float(np.abs(got - blocked).max())
        parity["within_2e-5_sum_blocks"] = parity["fp32_max_logit_diff_sum_blocks"] <= 2e-5
        print(f"{label}: torch float32 sums in blocks of {sum_block}: max|logit diff| "
              f"{parity['fp32_max_logit_diff_sum_blocks']:.3g}")
        if exact is not None:
            parity["torch_sum_blocks_fp32_vs_fp64"] = float(np.abs(blocked - exact).max())
            print(f"{label}: torch float32 sums in blocks vs float64 {parity['torch_sum_blocks_fp32_vs_fp64']:.3g}")
    return parity


def run_preset(cfg: ModelConfig, name: str, device: torch.device, shapes: list[tuple[int, int]],
               parity_tokens: int, repeats: int, warmup: int, peak: dict[str, float],
               fp64_floor: bool = False, blas: list[str | None] | None = None,
               sum_block: int | None = None) -> tuple[list[dict], list[dict]]:
    """The fp32 parity rows (one per BLAS library in `blas`) and the bf16 speed rows of one preset (same
    random weights on both sides)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg).eval()
    if sum_block is not None:
        route_decode_linears(model)  # every projection through dense.linear, where `sum_block` reaches it
    state = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight")
    params = from_hf_state(state, cfg)
    del state
    rng = np.random.default_rng(0)

    ids = rng.integers(0, cfg.vocab_size, (1, parity_tokens))
    with jax.default_matmul_precision("highest"):
        got = np.asarray(forward(params, cfg, jnp.asarray(ids, jnp.int32)))
    exact = None
    if fp64_floor:
        # Each side's own float32 error against the same torch model run in float64 (reference kernels):
        # how far apart two correct float32 implementations may land from rounding alone.
        with torch.inference_mode(), reference_kernels():
            exact = model.double()(torch.from_numpy(ids).to(device)).cpu().numpy()
        model = model.float()
    parities = []
    for library in blas or [None]:
        with blas_library(library):
            parities.append(_parity(model, got, ids, name, parity_tokens, device, exact, library, sum_block))

    model = model.to(torch.bfloat16)
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    rows = []
    for batch, seq in shapes:
        ids = rng.integers(0, cfg.vocab_size, (batch, seq))
        ids_t, ids_j = torch.from_numpy(ids).to(device), jnp.asarray(ids, jnp.int32)
        with torch.inference_mode():
            t_torch = wall(partial(model, ids_t), torch_sync, repeats, warmup)
            logits_t = model(ids_t).float().cpu().numpy()
        run_jax = partial(forward, params, cfg, ids_j)
        t_jax = wall(run_jax, jax.block_until_ready, repeats, warmup)
        bf16_diff = float(np.abs(np.asarray(run_jax(), np.float32) - logits_t).max())
        flops = prefill_flops(cfg, batch, seq)
        rows.append({
            "preset": name, "B": batch, "T": seq,
            "torch_tok_s": batch * seq / t_torch, "jax_tok_s": batch * seq / t_jax, "jax_vs_torch": t_torch / t_jax,
            "torch_of_mm_ceiling": flops / t_torch / peak["bf16_mm_flops"],
            "jax_of_mm_ceiling": flops / t_jax / peak["bf16_mm_flops"],
            "bf16_max_logit_diff": bf16_diff, "torch_ms": 1e3 * t_torch, "jax_ms": 1e3 * t_jax})
    return parities, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", nargs="+", default=None,
                        help="ModelConfig presets (default llama-3.2-1b qwen3-0.6b; tiny-student with --tiny)")
    parser.add_argument("--prefill", default=None, help="B x T shapes, e.g. 1x2048,8x512")
    parser.add_argument("--parity-tokens", type=int, default=None, help="T of the fp32 parity forward (B=1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per shape (median reported)")
    parser.add_argument("--tiny", action="store_true", help="tiny preset and shapes; runs on CPU in seconds")
    parser.add_argument("--fp64-floor", action="store_true",
                        help="also run the torch model in float64 and report each side's float32 error against it")
    parser.add_argument("--parity-only", action="store_true",
                        help="only the fp32 parity rows: no ceilings, no bf16 timing (e.g. full presets on a CPU)")
    parser.add_argument("--torch-blas", nargs="+", choices=("cublas", "cublaslt"), default=None,
                        help="parity rows once per CUDA BLAS library of the torch side (default: torch's choice)")
    parser.add_argument("--sum-block", type=int, default=None, metavar="N",
                        help="also run the torch model with float32 projections summed in blocks of N (32: jaxref's)")
    parser.add_argument("--out", type=Path, default=None, help="directory for the JSON result")
    args = parser.parse_args(argv)
    if args.sum_block is not None and args.sum_block < 1:
        parser.error(f"--sum-block={args.sum_block}: a block holds at least one product")
    if args.torch_blas and not torch.cuda.is_available():
        parser.error("--torch-blas picks a CUDA BLAS library; no CUDA device here")

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    presets = args.preset or (["tiny-student"] if args.tiny else ["llama-3.2-1b", "qwen3-0.6b"])
    shapes = [tuple(map(int, s.split("x"))) for s in (args.prefill or ("2x64" if args.tiny else "1x2048,8x512")
                                                       ).split(",")]
    parity_tokens = args.parity_tokens or (32 if args.tiny else 512)
    repeats, warmup = (args.repeats or (3 if args.tiny else 20)), (1 if args.tiny else 3)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    print(f"torch on {device}; jax {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind})")

    if args.parity_only:
        shapes, peak = [], {}
    else:
        peak = measure_ceilings(device, cuda, args.tiny)
    speed_rows, parity_rows = [], []
    for name in presets:
        parity, speed = run_preset(ModelConfig.preset(name), name, device, shapes, parity_tokens, repeats, warmup, peak,
                                   args.fp64_floor, args.torch_blas, args.sum_block)
        parity_rows += parity
        speed_rows += speed
        if cuda:
            torch.cuda.empty_cache()

    print_table([{"ceiling": k, "value": v} for k, v in peak.items()], title="measured ceilings")
    print_table(speed_rows, title="bf16 prefill forward: tessera.jaxref (JAX/XLA) vs tessera.model (PyTorch)")
    print_table(parity_rows, title="fp32 parity, highest matmul precision on both sides")
    path = write_result("jaxref" + ("-tiny" if args.tiny else "") + ("-parity" if args.parity_only else "")
                        + ("-" + "-".join(args.torch_blas) if args.torch_blas else "")
                        + (f"-sum{args.sum_block}" if args.sum_block else ""), {
        "ceilings": peak, "speed": speed_rows, "parity": parity_rows, "jax": jax.__version__,
        "jax_device": jax.devices()[0].device_kind, "timing": "wall clock + sync, median", "tiny": args.tiny},
        args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
