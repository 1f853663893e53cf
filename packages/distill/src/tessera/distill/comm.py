"""Thin wrappers over torch.distributed: the rank/world of a group (1 process when none is initialised)
and the two flat collectives ZeRO-3 needs, under their current names with a fallback to the older ones."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class Group:
    """A process group with its rank and size; `group=None` with no initialised default group is one process."""

    pg: dist.ProcessGroup | None
    rank: int
    world: int

    @staticmethod
    def of(pg: dist.ProcessGroup | None = None) -> Group:
        if not dist.is_available() or not dist.is_initialized():
            if pg is not None:
                raise ValueError("a process group was given but torch.distributed is not initialised")
            return Group(None, 0, 1)
        return Group(pg, dist.get_rank(pg), dist.get_world_size(pg))

    @property
    def distributed(self) -> bool:
        return self.pg is not None or (dist.is_available() and dist.is_initialized())


def all_gather_flat(out: torch.Tensor, shard: torch.Tensor, group: Group, async_op: bool = False):
    """Fill `out` `[world * n]` with every rank's `shard` `[n]` in rank order. Returns a Work when async."""
    if group.world == 1:
        out.copy_(shard)
        return None
    return _all_gather(out, shard, group=group.pg, async_op=async_op)


def reduce_scatter_flat(out: torch.Tensor, full: torch.Tensor, group: Group, async_op: bool = False):
    """`out` `[n]` = sum over ranks of this rank's slice of `full` `[world * n]`. Returns a Work when async."""
    if group.world == 1:
        out.copy_(full)
        return None
    return _reduce_scatter(out, full, group=group.pg, async_op=async_op)


def all_to_all_flat(out: torch.Tensor, full: torch.Tensor, group: Group, async_op: bool = False):
    """`out` `[world * n]` = slice `rank` of every rank's `full` `[world * n]`, in rank order."""
    if group.world == 1:
        out.copy_(full)
        return None
    return dist.all_to_all_single(out, full, group=group.pg, async_op=async_op)


def all_reduce_sum(x: torch.Tensor, group: Group) -> torch.Tensor:
    if group.world > 1:
        dist.all_reduce(x, group=group.pg)
    return x


def barrier(group: Group) -> None:
    if group.world > 1:
        dist.barrier(group=group.pg)


def init_from_env(device: str = "auto", need_group: bool = False) -> tuple[Group, torch.device]:
    """Join the process group described by torchrun's environment (WORLD_SIZE > 1), NCCL on CUDA and gloo on
    CPU, and pick this process's device ("auto": cuda:LOCAL_RANK when CUDA exists, else cpu). With
    `need_group`, a single process gets a process group of its own (FSDP2 needs one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        dev = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
    elif need_group and not dist.is_initialized():
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Group.of(), dev
