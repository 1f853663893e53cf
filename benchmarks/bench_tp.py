"""Tensor-parallel decode: TP=N against TP=1 in the same run, random weights, bf16.

For each model shape: decode latency at batch 1 (ms per token) and decode throughput at batch 64
(tokens/s), each step attending to a cache of `--context` tokens. Every rank runs the same step
(the lockstep the engine keeps); the step is the model's forward over one new token per row through
a flat KV cache, timed with CUDA events after warm-up (median of `--steps`). The fraction of the
bandwidth ceiling counts each rank's weight and KV bytes read per step against its measured copy rate.

    python3 benchmarks/bench_tp.py --tp 2                # on a machine with 2 GPUs
    python3 benchmarks/bench_tp.py --tiny                # CPU, gloo, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_result

from tessera.attn import FlatKVCache
from tessera.serve.tensor_parallel import build_tp_model
from tessera.specs import ModelConfig

TINY = ModelConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=16, d_ff=256)


def random_reader(cfg: ModelConfig, device: torch.device, std: float = 0.02):
    """Deterministic random weights: the full tensor from a seed of its name, then the rank's slice,
    so every TP degree sees the same model."""

    shapes = full_shapes(cfg)

    def read(name: str, split: tuple[int, int, int] | None) -> torch.Tensor:
        gen = torch.Generator(device=device).manual_seed(sum(map(ord, name)) * 7919 % 2**31)
        shape = shapes[name]
        full = (torch.ones(shape, device=device) if name.endswith("norm.weight")
                else torch.randn(shape, device=device, generator=gen) * std)
        if split is None:
            return full
        dim, start, stop = split
        return full.narrow(dim, start, stop - start)

    return read


def full_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    from tessera.model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def _time_decode(model, cfg, batch: int, context: int, steps: int, device: torch.device) -> list[float]:
    cache = FlatKVCache(model.config, batch_size=batch, max_len=context + steps + 8, dtype=torch.bfloat16,
                        device=device)
    cache.length = context  # attend to `context` cached tokens (their values do not change the timing)
    ids = torch.randint(0, cfg.vocab_size, (batch, 1), device=device)
    times = []
    with torch.inference_mode():
        for i in range(steps + 3):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                model(ids, positions=cache.positions(1), kv=cache)
                end.record()
                torch.cuda.synchronize()
                ms = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                model(ids, positions=cache.positions(1), kv=cache)
                ms = (time.perf_counter() - t0) * 1e3
            cache.advance(1)
            if i >= 3:  # warm-up steps are not counted
                times.append(ms)
    return times


def _copy_ceiling(device: torch.device) -> float:
    """Measured device-to-device copy rate, bytes/s (read + write)."""
    if device.type != "cuda":
        return float("nan")
    x = torch.empty(2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    return 2 * x.numel() * 20 / (start.elapsed_time(end) / 1e3)


def _rank_main(rank: int, world: int, port: int, args_json: str, out_file: str) -> None:
    args = json.loads(args_json)
    cuda = torch.cuda.is_available() and not args["tiny"]
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    rows = []
    try:
        ceiling = _copy_ceiling(device)
        for name in args["models"]:
            cfg = TINY if name == "tiny" else ModelConfig.preset(name)
            model = build_tp_model(cfg, random_reader(cfg, device), device=device, dtype=torch.bfloat16)
            weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            for batch in args["batches"]:
                times = _time_decode(model, cfg, batch, args["context"], args["steps"], device)
                ms = statistics.median(times)
                local = model.config
                kv_bytes = (2 * local.n_layers * batch * args["context"] * local.n_kv_heads
                            * (local.head_dim or 1) * 2)
                rows.append({"model": name, "tp": world, "batch": batch, "ms_per_step": ms,
                             "tokens_per_s": batch / (ms / 1e3),
                             "weight_gb_per_rank": weight_bytes / 1e9,
                             "frac_copy_ceiling": (weight_bytes + kv_bytes) / (ms / 1e3) / ceiling})
            del model
            if cuda:
                torch.cuda.empty_cache()
    finally:
        dist.destroy_process_group()
    if rank == 0:
        Path(out_file).write_text(json.dumps({"rows": rows, "copy_ceiling_bytes_per_s": ceiling}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.spawn(_rank_main, args=(world, _free_port(), json.dumps(vars(args), default=str), out), nprocs=world)
        return json.loads(Path(out).read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel degree compared with TP=1 (default 2)")
    parser.add_argument("--models", nargs="+", default=["llama-3.2-1b", "llama-3.1-8b"], help="ModelConfig presets")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--context", type=int, default=512, help="cached tokens each decode step attends to")
    parser.add_argument("--steps", type=int, default=30, help="timed decode steps per point")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on CPU over gloo, to check the script")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args()
    if args.tiny:
        args.models, args.context, args.steps = ["tiny"], 32, 5
    elif torch.cuda.device_count() < args.tp:
        parser.error(f"--tp {args.tp} needs {args.tp} GPUs; {torch.cuda.device_count()} visible")
    one, many = run(1, args), run(args.tp, args)
    rows = []
    for a, b in zip(one["rows"], many["rows"]):
        rows.append({"model": a["model"], "batch": a["batch"], "tp1_ms": a["ms_per_step"],
                     f"tp{args.tp}_ms": b["ms_per_step"], "tp1_tok_s": a["tokens_per_s"],
                     f"tp{args.tp}_tok_s": b["tokens_per_s"], "speedup": a["ms_per_step"] / b["ms_per_step"],
                     "tp1_frac_bw": a["frac_copy_ceiling"], f"tp{args.tp}_frac_bw": b["frac_copy_ceiling"]})
    print_table(rows, f"decode, TP={args.tp} vs TP=1 (bf16, random weights, context {args.context}, eager)")
    path = write_result(f"tp{args.tp}", {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                         "tp1": one, f"tp{args.tp}": many}, args.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
