"""The three values of `ParallelConfig.strategy` behind one interface the trainer and checkpoints use.

- `none`: the module as is, `torch.optim.Adam(W)`, every rank (if several) holding everything and averaging
  gradients with all-reduce (plain data parallelism).
- `zero3`: `tessera.distill.zero3.Zero3` with `ShardedAdam` over the fp32 master shards.
- `fsdp2`: PyTorch's `fully_shard` on the same units and the root, with `torch.optim.Adam(W)` on the DTensors.

Checkpoint pieces are strategy-neutral: (state, parameter name, start, values) where `values` is a contiguous
run of the parameter's flattened elements from `start` and `state` is "param", "exp_avg" or "exp_avg_sq".
Any strategy at any world size can load pieces written by any other.
"""

from __future__ import annotations

import itertools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from tessera.distill.comm import Group, all_reduce_sum
from tessera.distill.sharded_adam import ShardedAdam
from tessera.distill.zero3 import Zero3
from tessera.specs.distill import OptimizerConfig, ParallelConfig

STATES = ("param", "exp_avg", "exp_avg_sq")
Piece = tuple[str, str, int, torch.Tensor]
Reader = Callable[[str, str, int, int], torch.Tensor]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class Strategy(ABC):
    """A sharded (or not) model plus its optimizer. `module` is what the training step calls."""

    name: str
    module: nn.Module
    group: Group

    @abstractmethod
    def step(self, lr: float, max_norm: float) -> torch.Tensor:
        """Finish gradient communication, clip to `max_norm` (0 = no clipping), update with `lr`, zero the
        gradients. Returns the global gradient norm before clipping."""

    @property
    @abstractmethod
    def step_count(self) -> int:
        """Optimizer steps taken (restored by `load`)."""

    @abstractmethod
    def pieces(self) -> Iterator[Piece]:
        """This rank's parameter and optimizer-state pieces for a checkpoint."""

    @abstractmethod
    def load(self, read: Reader, step_count: int) -> None:
        """Fill this rank's parameters and optimizer state from `read(state, name, start, stop)`."""

    @abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 parameters on the CPU under every name they have, tied names included (collective)."""

    @abstractmethod
    def memory_report(self) -> dict[str, float]:
        """Per-rank bytes of parameters, gradients and optimizer state against 16 Psi / N."""

    @abstractmethod
    def param_shapes(self) -> dict[str, torch.Size]:
        """Full shape of every parameter, by canonical name (the first of its tied names)."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where this rank's parameters live."""


def _torch_optimizer(params, opt: OptimizerConfig) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if opt.name == "adamw" else torch.optim.Adam
    return cls(params, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


class Zero3Strategy(Strategy):
    name = "zero3"

    def __init__(self, module: nn.Module, units: Sequence[nn.Module], parallel: ParallelConfig,
                 opt: OptimizerConfig, ordered_reduce: bool | None = None) -> None:
        self.module = module
        self.engine = Zero3(module, units, compute_dtype=DTYPES[parallel.compute_dtype], prefetch=parallel.prefetch,
                            ordered_reduce=ordered_reduce)
        self.group = self.engine.group
        self.optimizer = ShardedAdam(self.engine.parameters(), lr=opt.lr, betas=opt.betas, eps=opt.eps,
                                     weight_decay=opt.weight_decay, decoupled=opt.name == "adamw")
        index = {id(p): i for i, p in enumerate(self.optimizer.params)}
        self._getters = {"param": lambda u: u.shard.data,
                         "exp_avg": lambda u: self.optimizer.exp_avg[index[id(u.shard)]],
                         "exp_avg_sq": lambda u: self.optimizer.exp_avg_sq[index[id(u.shard)]]}

    def step(self, lr: float, max_norm: float) -> torch.Tensor:
        norm = self.engine.clip_grad_norm_(max_norm)
        self.optimizer.step(lr=lr)
        self.engine.zero_grad()
        return norm

    @property
    def step_count(self) -> int:
        return self.optimizer.step_count

    def pieces(self) -> Iterator[Piece]:
        return self.engine.local_pieces(self._getters)

    def load(self, read: Reader, step_count: int) -> None:
        self.engine.load_pieces(self._getters, read)
        self.optimizer.step_count = step_count

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.engine.full_state_dict()

    def memory_report(self) -> dict[str, float]:
        return self.engine.memory_report(self.optimizer.state_bytes())

    def param_shapes(self) -> dict[str, torch.Size]:
        return {slot.name: slot.shape for unit in self.engine.all_units() for slot in unit.slots}

    @property
    def device(self) -> torch.device:
        return self.engine.root.shard.device


class _TorchOptimStrategy(Strategy):
    """Shared by `none` and `fsdp2`: a torch optimizer over `module.parameters()`."""

    def __init__(self, module: nn.Module, opt: OptimizerConfig, group: Group) -> None:
        self.module, self.group = module, group
        self.params = dict(module.named_parameters())
        canonical = {id(p): name for name, p in self.params.items()}
        self.aliases = {name: canonical[id(p)] for name, p in module.named_parameters(remove_duplicate=False)}
        self.optimizer = _torch_optimizer(list(self.params.values()), opt)
        self._steps = 0

    @abstractmethod
    def _sync_grads(self) -> None:
        """Make every gradient the rank average."""

    def param_shapes(self) -> dict[str, torch.Size]:
        return {name: p.shape for name, p in self.params.items()}

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def step(self, lr: float, max_norm: float) -> torch.Tensor:
        self._sync_grads()
        params = [p for p in self.params.values() if p.grad is not None]
        if max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        _set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._steps += 1
        return norm

    @property
    def step_count(self) -> int:
        return self._steps

    @abstractmethod
    def _local(self, t: torch.Tensor) -> tuple[torch.Tensor, int]:
        """This rank's contiguous part of `t` (flattened) and where it starts."""

    @abstractmethod
    def _full(self, t: torch.Tensor) -> torch.Tensor:
        """The whole of `t` (collective for sharded tensors)."""

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        full = {name: self._full(p).detach().float().cpu().clone() for name, p in self.params.items()}
        return {alias: full[name] for alias, name in self.aliases.items()}

    def pieces(self) -> Iterator[Piece]:
        for name, p in self.params.items():
            local, start = self._local(p)
            if local.numel():
                yield "param", name, start, local
            state = self.optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state and local.numel():
                    yield key, name, start, self._local(state[key])[0]

    def load(self, read: Reader, step_count: int) -> None:
        with torch.no_grad():
            for name, p in self.params.items():
                local, start = self._local(p)
                if not local.numel():
                    continue
                local.copy_(read("param", name, start, start + local.numel()))
                if step_count == 0:
                    continue
                state = self.optimizer.state[p]
                state["step"] = torch.tensor(float(step_count))
                for key in ("exp_avg", "exp_avg_sq"):
                    state[key] = torch.zeros_like(p)
                    self._local(state[key])[0].copy_(read(key, name, start, start + local.numel()))
        self._steps = step_count

    def memory_report(self) -> dict[str, float]:
        psi = sum(p.numel() for p in self.params.values())
        local = 0
        for p in self.params.values():
            state = self.optimizer.state.get(p, {})
            # fp32 parameter and gradient, plus whichever Adam moments exist
            local += self._local(p)[0].numel() * 4 * (2 + sum(k in state for k in ("exp_avg", "exp_avg_sq")))
        return {"params": psi, "world_size": self.group.world,
                "formula_16psi_over_n": 16 * psi / self.group.world, "measured_sharded_bytes": local}


class PlainStrategy(_TorchOptimStrategy):
    name = "none"

    def _sync_grads(self) -> None:
        if self.group.world == 1:
            return
        for p in self.params.values():
            if p.grad is not None:
                all_reduce_sum(p.grad, self.group).div_(self.group.world)

    def _local(self, t: torch.Tensor) -> tuple[torch.Tensor, int]:
        return t.detach().reshape(-1), 0

    def _full(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def pieces(self) -> Iterator[Piece]:
        # every rank holds the same replica; rank 0 writes it once
        return super().pieces() if self.group.rank == 0 else iter(())


class FSDP2Strategy(_TorchOptimStrategy):
    name = "fsdp2"

    def __init__(self, module: nn.Module, units: Sequence[nn.Module], parallel: ParallelConfig,
                 opt: OptimizerConfig) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if not dist.is_initialized():
            raise RuntimeError("strategy 'fsdp2' needs an initialised process group (init_from_env or torchrun)")
        dtype = DTYPES[parallel.compute_dtype]
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for unit in units:
            fully_shard(unit, mp_policy=policy)
        fully_shard(module, mp_policy=policy)
        if len(units) > 1 and parallel.prefetch:
            for a, b in itertools.pairwise(units):
                a.set_modules_to_forward_prefetch([b])
                b.set_modules_to_backward_prefetch([a])
        super().__init__(module, opt, Group.of())

    def _local(self, t: torch.Tensor) -> tuple[torch.Tensor, int]:
        local = t.to_local()
        rows = t.shape[0] if t.dim() else 1
        chunk = -(-rows // self.group.world)
        row_start = min(self.group.rank * chunk, rows)
        if local.shape[0] != min(chunk, rows - row_start):
            raise RuntimeError(f"unexpected FSDP2 shard layout: {tuple(local.shape)} rows for rank {self.group.rank}")
        return local.detach().reshape(-1), row_start * math.prod(t.shape[1:])

    def _full(self, t: torch.Tensor) -> torch.Tensor:
        return t.full_tensor()

    def _sync_grads(self) -> None:
        """FSDP2 reduce-scatters (and averages) gradients during backward."""


def make_strategy(module: nn.Module, units: Sequence[nn.Module], parallel: ParallelConfig,
                  opt: OptimizerConfig) -> Strategy:
    """Build the strategy named by `parallel.strategy` around `module` (already on its device)."""
    if parallel.strategy == "zero3":
        return Zero3Strategy(module, units, parallel, opt)
    if parallel.strategy == "fsdp2":
        return FSDP2Strategy(module, units, parallel, opt)
    return PlainStrategy(module, opt, Group.of())
