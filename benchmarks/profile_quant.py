"""Where `bench_quant.py --speed`'s time goes, per method: the decode step (one token per row, context
`--context`, replayed from a CUDA graph) as a table of kernels by device time, and the prefill
(`--prefill-batch` x `--prefill-len`, eager) by device time and by host time, so that a prefill that
is not faster despite faster GEMMs shows whether the host or a kernel holds it back. A diagnosis tool,
not a benchmark (profiling perturbs timings); same random Llama-3.2-1B-shaped model and fused
projections as bench_quant.

    source scripts/gpu-env.sh && python3 benchmarks/profile_quant.py --methods bf16 int8 fp8 --out $OUT
    python3 benchmarks/profile_quant.py --tiny          # CPU smoke run
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result
from bench_quant import TINY, decode_step
from profile_decode import show, top

from tessera.model import Transformer, fuse_projections
from tessera.quant import quantize
from tessera.specs import ModelConfig, QuantConfig

METHODS = ("bf16", "int8", "awq", "fp8")


def profiled(fn, reps: int, cuda: bool, n: int) -> tuple[list[dict], list[dict], dict[str, float]]:
    """(device-time table, host-time table, per-call times) of `reps` calls of `fn` after three warm-up
    calls. The times: wall clock of an unprofiled call (with a device sync) and the device's busy time
    (all kernels' time summed); wall far above busy means the host, not a kernel, sets the pace."""
    for _ in range(3):
        fn()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if cuda:
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / reps
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(reps):
            fn()
        if cuda:
            torch.cuda.synchronize()
    # Kernel and memcpy/memset events only: CPU ops also carry the device time of what they launched.
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.self_device_time_total for e in kernels) / reps / 1e6 if cuda else float("nan")
    times = {"wall_ms": 1e3 * wall, "device_busy_ms": 1e3 * busy}
    return (top(prof, True, n) if cuda else []), top(prof, False, n), times


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                   help="bf16 is the float model (float32 on the CPU)")
    p.add_argument("--context", type=int, default=512, help="cached tokens of the decode step")
    p.add_argument("--prefill-batch", type=int, default=4)
    p.add_argument("--prefill-len", type=int, default=1024)
    p.add_argument("--reps", type=int, default=10, help="profiled decode steps / prefills")
    p.add_argument("--top", type=int, default=18, help="rows per table")
    p.add_argument("--tiny", action="store_true", help="a small shape on the CPU")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = ModelConfig(**TINY) if args.tiny else ModelConfig.preset("llama-3.2-1b")
    context, pre_b, pre_t = (16, 1, 32) if args.tiny else (args.context, args.prefill_batch, args.prefill_len)
    torch.manual_seed(0)
    with torch.device(device):
        base = Transformer(cfg).to(dtype).eval()
    calib = torch.randint(0, cfg.vocab_size, (2, 32) if args.tiny else (16, 256))
    configs = {"int8": QuantConfig(method="int8"), "fp8": QuantConfig(method="fp8"),
               "awq": QuantConfig(method="awq", calib_samples=calib.shape[0], calib_seq_len=calib.shape[1],
                                  n_grid=5 if args.tiny else 20, clip_grid=10 if args.tiny else 20)}
    result: dict = {"shape": "tiny" if args.tiny else "llama-3.2-1b", "dtype": str(dtype), "context": context,
                    "prefill": [pre_b, pre_t], "reps": args.reps, "methods": {}}
    ids = torch.randint(0, cfg.vocab_size, (pre_b, pre_t), generator=torch.Generator().manual_seed(1)).to(device)
    for method in args.methods:
        if method == "bf16":
            model = base
        else:
            if method == "fp8" and not cuda:
                print("  fp8: skipped (needs a GPU)")
                continue
            model = quantize(copy.deepcopy(base), configs[method], calib, progress=False)
        fuse_projections(model)
        step, _ = decode_step(model, 1, context, dtype, cuda)
        decode, _, decode_ms = profiled(step, args.reps, cuda, args.top)

        def prefill(model: Transformer = model) -> torch.Tensor:
            h, _ = model.hidden_states(ids)
            return model.lm_head(h[:, -1])

        pre_dev, pre_host, prefill_ms = profiled(prefill, max(1, args.reps // 3), cuda, args.top)
        result["methods"][method] = {"decode_ms": decode_ms, "prefill_ms": prefill_ms, "decode_device": decode,
                                     "prefill_device": pre_dev, "prefill_host": pre_host}
        print(f"\n{method}: decode step {decode_ms['wall_ms']:.3f} ms wall, {decode_ms['device_busy_ms']:.3f} ms "
              f"device busy; prefill {prefill_ms['wall_ms']:.2f} ms wall, {prefill_ms['device_busy_ms']:.2f} ms busy")
        if cuda:
            show(f"{method}: decode step x{args.reps} (device time)", decode)
            show(f"{method}: prefill {pre_b}x{pre_t} (device time)", pre_dev)
        show(f"{method}: prefill {pre_b}x{pre_t} (host time)", pre_host)
        if model is not base:
            del model
            if cuda:
                torch.cuda.empty_cache()
    print(f"wrote {write_result('profile-quant' + ('-tiny' if args.tiny else ''), result, args.out)}")


if __name__ == "__main__":
    main()
