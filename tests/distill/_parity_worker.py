"""One rank of the ZeRO-3 / FSDP2 parity run (started by test_zero3.py with RANK, WORLD_SIZE, MASTER_*).

Trains the `_parity` model for STEPS steps with each strategy, writing (rank 0) per-step losses, the full
parameters after every step, and the memory report to OUT."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _launch import DONE
from _parity import ACCUM, LR, MAX_NORM, STEPS, batch, lm_loss, make_model, micro

from tessera.distill.sharded_checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from tessera.distill.strategy import Zero3Strategy, make_strategy
from tessera.specs.distill import OptimizerConfig, ParallelConfig


def run(strategy: str, dtype: str, out: Path) -> None:
    """`strategy` "zero3-rs" is ZeRO-3 with the backend's reduce-scatter instead of the rank-ordered sum."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model()
    opt = OptimizerConfig(name="adamw", lr=LR, betas=(0.9, 0.95), weight_decay=0.1, warmup_steps=0)
    if strategy == "zero3-rs":
        strat = Zero3Strategy(model, list(model.model.layers), ParallelConfig(strategy="zero3", compute_dtype=dtype),
                              opt, ordered_reduce=False)
    else:
        parallel = ParallelConfig(strategy=strategy, compute_dtype=dtype)
        strat = make_strategy(model, list(model.model.layers), parallel, opt)
    losses, tensors = [], {}
    for step in range(STEPS):
        ids = batch(step, world)
        total = torch.zeros(())
        for m in range(ACCUM):
            loss = lm_loss(strat.module, micro(ids, rank, world, m)) / ACCUM
            loss.backward()
            total += loss.detach()
        strat.step(LR, MAX_NORM)
        dist.all_reduce(total)
        losses.append(total.item() / world)
        full = strat.full_state_dict()
        tensors.update({f"step{step}/{k}": v.contiguous() for k, v in full.items() if k != "lm_head.weight"})
    report = strat.memory_report()
    if dtype == "float32" and strategy == "zero3":
        save_checkpoint(out / "ckpt", STEPS, strat, {"from": "zero3"})
    if dtype == "float32" and strategy == "fsdp2":
        # the ZeRO-3 checkpoint, loaded into the other strategy
        fresh = make_model()
        other = make_strategy(fresh, list(fresh.model.layers), ParallelConfig(strategy="fsdp2"), opt)
        load_checkpoint(latest_checkpoint(out / "ckpt"), other)
        loaded = {k: v.contiguous() for k, v in other.full_state_dict().items() if k != "lm_head.weight"}
        if rank == 0:
            save_file(loaded, str(out / "fsdp2-from-zero3-ckpt.safetensors"))
    if rank == 0:
        save_file(tensors, str(out / f"{strategy}-{dtype}.safetensors"))
    reports = [None] * world
    dist.all_gather_object(reports, report)
    if rank == 0:
        (out / f"{strategy}-{dtype}.json").write_text(json.dumps({"losses": losses, "memory": reports}))


def main() -> None:
    out, dtypes = Path(sys.argv[1]), sys.argv[2].split(",")
    dist.init_process_group("gloo")
    for dtype in dtypes:
        for strategy in ("zero3", "fsdp2"):
            run(strategy, dtype, out)
    if dist.get_world_size() == 2:
        run("zero3-rs", "float32", out)
    dist.barrier()
    dist.destroy_process_group()
    print(DONE, flush=True)


if __name__ == "__main__":
    main()
