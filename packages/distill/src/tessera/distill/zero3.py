"""ZeRO stage 3 written directly on torch.distributed collectives.

The module's parameters are grouped into units (each given submodule, e.g. one transformer block, plus a
root unit holding everything else: embeddings, final norm, head, loss-side projections). Each unit's
parameters are flattened into one fp32 vector, padded to a multiple of the world size, and each rank keeps
only its 1/N slice: the fp32 master shard that the optimizer updates (`Zero3.parameters()`).

Lifecycle of a unit within one forward/backward:
  pre-forward   all-gather the shard (cast to the compute dtype) into the unit's flat buffer, point the
                modules' parameter attributes at views of it, and start the all-gather of the next unit
                (prefetch); the buffer enters autograd through `_Gather`, so gradients land on it.
  post-forward  free the buffer's storage (block units; the root stays gathered until its backward,
                because it is used again at the end of the forward). Autograd's saved tensors keep pointing
                at that storage, which is empty until it is refilled.
  pre-backward  (a hook on the unit's output gradient) refill the storage by all-gathering again, and
                prefetch the unit that runs backward next.
  backward      `_Gather.backward` receives the gradient of the whole flat buffer, reduce-scatters it in fp32
                (asynchronously; `finish_backward()` waits and accumulates into the shard's `.grad`, averaged
                over ranks) and frees the storage. On CPU the reduction is an all-to-all plus a rank-ordered
                sum, so gradients are bitwise independent of the collective's algorithm.
So between uses a unit's full parameters are not resident; `resident_bytes()` and the tests measure it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_flatten

from tessera.distill.comm import Group, all_gather_flat, all_reduce_sum, all_to_all_flat, reduce_scatter_flat


@dataclass
class _Slot:
    name: str                      # canonical qualified name (first one seen)
    shape: torch.Size
    aliases: list[tuple[nn.Module, str]] = field(default_factory=list)
    offset: int = 0

    @property
    def numel(self) -> int:
        return self.shape.numel()


class FlatUnit:
    """One unit: its parameters flattened, this rank's fp32 shard, and the compute-dtype gather buffer."""

    def __init__(self, name: str, slots: list[_Slot], tensors: list[torch.Tensor], group: Group,
                 compute_dtype: torch.dtype, device: torch.device, ordered_reduce: bool) -> None:
        self.name, self.slots, self.group, self.compute_dtype = name, slots, group, compute_dtype
        self.ordered_reduce = ordered_reduce
        offset = 0
        for slot in slots:
            slot.offset = offset
            offset += slot.numel
        self.numel = offset
        self.shard_numel = -(-max(offset, 1) // group.world)
        self.padded = self.shard_numel * group.world
        flat = torch.zeros(self.padded, dtype=torch.float32, device=device)
        for slot, t in zip(slots, tensors):
            flat[slot.offset:slot.offset + slot.numel].copy_(t.detach().reshape(-1))
        lo = group.rank * self.shard_numel
        self.shard = nn.Parameter(flat[lo:lo + self.shard_numel].clone())
        self.buffer = torch.empty(self.padded, dtype=compute_dtype, device=device)
        self.gathered = False
        self._gather_work: tuple[object, torch.Tensor, object] | None = None
        self._rs_pending: list[tuple[object, torch.Tensor, torch.Tensor]] = []

    @property
    def sizes(self) -> list[int]:
        return [s.numel for s in self.slots] + [self.padded - self.numel]

    def _free_storage(self) -> None:
        self.buffer.untyped_storage().resize_(0)

    def start_gather(self, async_op: bool) -> None:
        """Refill the buffer from every rank's shard (no-op when already gathered or in flight)."""
        if self.gathered or self._gather_work is not None:
            return
        self.buffer.untyped_storage().resize_(self.padded * self.buffer.element_size())
        src = self.shard.detach().to(self.compute_dtype)
        # The storage behind autograd's saved views is refilled with the very values it held, so the
        # version counter must not move (it would make backward reject the saved tensors). The collective
        # may write (and bump the counter) on a background thread, so the counter is restored after waiting.
        keep = torch.autograd._unsafe_preserve_version_counter(self.buffer)
        work = all_gather_flat(self.buffer, src, self.group, async_op=async_op)
        self._gather_work = (work, src, keep)

    def wait_gather(self) -> None:
        if self.gathered:
            return
        if self._gather_work is None:
            self.start_gather(async_op=False)
        work, _, keep = self._gather_work
        if work is not None:
            work.wait()
        keep.__exit__(None, None, None)
        self._gather_work = None
        self.gathered = True

    def free(self) -> None:
        if self._gather_work is not None:
            self.wait_gather()
        self._free_storage()
        self.gathered = False

    def bind(self, full: torch.Tensor) -> None:
        """Point every alias of every parameter at its view of `full` (the gathered flat buffer)."""
        for slot, piece in zip(self.slots, torch.split(full, self.sizes)):
            view = piece.view(slot.shape)
            for module, attr in slot.aliases:
                setattr(module, attr, view)

    def reduce_grad(self, grad_full: torch.Tensor) -> None:
        grad = grad_full.to(torch.float32).contiguous()
        n = self.padded if self.ordered_reduce else self.shard_numel
        out = torch.empty(n, dtype=torch.float32, device=grad.device)
        collective = all_to_all_flat if self.ordered_reduce else reduce_scatter_flat
        work = collective(out, grad, self.group, async_op=self.group.world > 1)
        self._rs_pending.append((work, out, grad))

    def finish_reduce(self) -> None:
        for work, out, _ in self._rs_pending:
            if work is not None:
                work.wait()
            if self.ordered_reduce:
                parts = out.view(self.group.world, self.shard_numel)
                out = parts[0].clone()
                for part in parts[1:]:
                    out += part
            if self.group.world > 1:
                out.div_(self.group.world)
            if self.shard.grad is None:
                self.shard.grad = out
            else:
                self.shard.grad.add_(out)
        self._rs_pending.clear()


class _Gather(torch.autograd.Function):
    """Identity from a unit's shard to its gathered flat buffer; backward reduce-scatters the buffer's grad."""

    @staticmethod
    def forward(ctx, shard: torch.Tensor, unit: FlatUnit, engine: Zero3) -> torch.Tensor:
        ctx.unit, ctx.engine = unit, engine
        return unit.buffer.detach()

    @staticmethod
    def backward(ctx, grad_full: torch.Tensor):
        ctx.engine._reduce(ctx.unit, grad_full)
        return None, None, None


class Zero3:
    """Shard `module`'s parameters ZeRO-3 style; the module keeps its call signature.

    `units`: submodules that each become one gather unit, listed in forward order (prefetch follows this
    order). All other parameters form the root unit. A parameter shared between two units raises
    ValueError naming it. `compute_dtype` is the dtype of the gathered parameters (bf16 for mixed
    precision); master weights, gradients and optimizer state stay fp32. `group`: the process group
    (None: the default one, or a single process). `ordered_reduce`: sum gradients over ranks in rank order
    (an all-to-all, then a local sum) so the result does not depend on the backend's reduction algorithm;
    None picks it on CPU (gloo) and the backend's reduce-scatter on GPUs (faster, order unspecified).
    """

    def __init__(self, module: nn.Module, units: Sequence[nn.Module] = (), *, group: dist.ProcessGroup | None = None,
                 compute_dtype: torch.dtype = torch.float32, prefetch: bool = True,
                 device: torch.device | str | None = None, ordered_reduce: bool | None = None) -> None:
        self.module, self.group, self.prefetch = module, Group.of(group), prefetch
        first = next(module.parameters(), None)
        dev = torch.device(device) if device is not None else (first.device if first is not None
                                                               else torch.device("cpu"))
        self.ordered_reduce = dev.type == "cpu" if ordered_reduce is None else ordered_reduce
        prefixes = {}
        for qual, sub in module.named_modules():
            for u in units:
                if sub is u:
                    prefixes[id(u)] = qual + "."
        missing = [i for i, u in enumerate(units) if id(u) not in prefixes]
        if missing:
            raise ValueError(f"units at positions {missing} are not submodules of the wrapped module")
        owners = {qual: sub for qual, sub in module.named_modules()}
        groups: dict[int, list[tuple[str, nn.Module, str, nn.Parameter]]] = {id(u): [] for u in units}
        groups[id(module)] = []
        for qual, p in module.named_parameters(remove_duplicate=False):
            mod_name, _, attr = qual.rpartition(".")
            owner = owners[mod_name]
            key = next((id(u) for u in units if qual.startswith(prefixes[id(u)])), id(module))
            groups[key].append((qual, owner, attr, p))
        seen: dict[int, int] = {}
        for key, entries in groups.items():
            for qual, _, _, p in entries:
                if seen.setdefault(id(p), key) != key:
                    raise ValueError(f"parameter {qual!r} is shared between two units; put them in one unit")
        self.units: list[FlatUnit] = []
        self._unit_of: dict[int, FlatUnit] = {}
        for u in units:
            self._unit_of[id(u)] = self._make_unit(prefixes[id(u)].rstrip("."), groups[id(u)], compute_dtype, dev)
            self.units.append(self._unit_of[id(u)])
        self.root = self._make_unit("<root>", groups[id(module)], compute_dtype, dev)
        self._block_order = [self._unit_of[id(u)] for u in units]
        for u in units:
            u.register_forward_pre_hook(self._make_pre_forward(self._unit_of[id(u)]))
            u.register_forward_hook(self._make_post_forward(self._unit_of[id(u)]))
        module.register_forward_pre_hook(self._root_pre_forward)
        module.register_forward_hook(self._root_post_forward)
        self.peak_resident = 0
        self._reducing: list[FlatUnit] = []

    def _make_unit(self, name: str, entries: list[tuple[str, nn.Module, str, nn.Parameter]],
                   compute_dtype: torch.dtype, dev: torch.device) -> FlatUnit:
        slots: list[_Slot] = []
        tensors: list[torch.Tensor] = []
        by_id: dict[int, _Slot] = {}
        for qual, owner, attr, p in entries:
            slot = by_id.get(id(p))
            if slot is None:
                slot = by_id[id(p)] = _Slot(qual, p.shape)
                slots.append(slot)
                tensors.append(p)
            slot.aliases.append((owner, attr))
        unit = FlatUnit(name, slots, tensors, self.group, compute_dtype, dev, self.ordered_reduce)
        for slot in slots:
            for owner, attr in slot.aliases:
                owner._parameters.pop(attr, None)
        unit.bind(unit.buffer)  # placeholders: views of storage that is about to be emptied
        unit.free()
        return unit

    # -- hooks ------------------------------------------------------------------------------------------------

    def _activate(self, unit: FlatUnit) -> None:
        unit.wait_gather()
        grad = torch.is_grad_enabled() and unit.shard.requires_grad
        unit.bind(_Gather.apply(unit.shard, unit, self) if grad else unit.buffer)
        self.peak_resident = max(self.peak_resident, self.resident_bytes())

    def _reduce(self, unit: FlatUnit, grad_full: torch.Tensor) -> None:
        # One reduce-scatter stays in flight behind the backward compute; waiting for the older ones bounds the
        # full-size gradient buffers held at once to two.
        unit.reduce_grad(grad_full)
        unit.free()
        self._reducing.append(unit)
        while len(self._reducing) > 1:
            self._reducing.pop(0).finish_reduce()

    def _root_pre_forward(self, module: nn.Module, args) -> None:
        self.finish_backward()
        self._activate(self.root)
        if self.prefetch and self._block_order:
            self._block_order[0].start_gather(async_op=True)

    def _root_post_forward(self, module: nn.Module, args, output) -> None:
        if not (torch.is_grad_enabled() and self.root.shard.requires_grad):
            self.root.free()

    def _make_pre_forward(self, unit: FlatUnit) -> Callable:
        def hook(module: nn.Module, args) -> None:
            self._activate(unit)
            nxt = self._neighbour(unit, +1)
            if self.prefetch and nxt is not None:
                nxt.start_gather(async_op=True)
        return hook

    def _make_post_forward(self, unit: FlatUnit) -> Callable:
        def hook(module: nn.Module, args, output):
            unit.free()
            if torch.is_grad_enabled() and unit.shard.requires_grad:
                tensors = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
                for t in tensors:
                    t.register_hook(self._make_pre_backward(unit))
            return output
        return hook

    def _make_pre_backward(self, unit: FlatUnit) -> Callable:
        def hook(grad: torch.Tensor) -> None:
            if not unit.gathered:
                unit.wait_gather()
                self.peak_resident = max(self.peak_resident, self.resident_bytes())
            prev = self._neighbour(unit, -1)
            if self.prefetch and prev is not None:
                prev.start_gather(async_op=True)
        return hook

    def _neighbour(self, unit: FlatUnit, step: int) -> FlatUnit | None:
        i = self._block_order.index(unit) + step
        return self._block_order[i] if 0 <= i < len(self._block_order) else None

    # -- optimizer side ---------------------------------------------------------------------------------------

    def all_units(self) -> list[FlatUnit]:
        return [*self.units, self.root]

    def parameters(self) -> Iterator[nn.Parameter]:
        """This rank's fp32 master shards, one per unit (root last): what the optimizer updates."""
        return (u.shard for u in self.all_units())

    def finish_backward(self) -> None:
        """Wait for every in-flight gradient reduce-scatter and add it (rank-averaged) to the shards' `.grad`;
        free any buffer still gathered (e.g. a unit whose output never needed a gradient)."""
        self._reducing.clear()
        for unit in self.all_units():
            unit.finish_reduce()
            if unit.gathered or unit._gather_work is not None:
                unit.free()

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global L2 norm of the gradient across all shards of all ranks; scales `.grad` so the norm is at most
        `max_norm` (coefficient max_norm / (norm + 1e-6), as torch.nn.utils.clip_grad_norm_). Returns the norm
        before clipping."""
        self.finish_backward()
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        dev = grads[0].device if grads else self.root.shard.device
        sq = torch.zeros((), dtype=torch.float32, device=dev)
        for g in grads:
            sq += g.pow(2).sum()
        norm = all_reduce_sum(sq, self.group).sqrt()
        if max_norm > 0:
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for g in grads:
                g.mul_(coef)
        return norm

    # -- introspection and state ------------------------------------------------------------------------------

    def resident_bytes(self) -> int:
        """Bytes of gathered (full) parameter buffers currently allocated on this rank."""
        return sum(u.buffer.untyped_storage().nbytes() for u in self.all_units())

    def num_params(self) -> int:
        return sum(u.numel for u in self.all_units())

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter in full, fp32, on the CPU, under every name it had (tied names included).
        Collective: every rank must call it."""
        out: dict[str, torch.Tensor] = {}
        for unit in self.all_units():
            flat = torch.empty(unit.padded, dtype=torch.float32, device=unit.shard.device)
            all_gather_flat(flat, unit.shard.detach(), self.group)
            for slot in unit.slots:
                t = flat[slot.offset:slot.offset + slot.numel].view(slot.shape).cpu().clone()
                out[slot.name] = t
                for owner, attr in slot.aliases[1:]:
                    out[_qualname(self.module, owner, attr)] = t
        return out

    def _owned_slices(self) -> Iterator[tuple[FlatUnit, str, int, int, int, int]]:
        """For each parameter slice this rank owns: (unit, parameter name, start and stop in the parameter's
        flattened elements, start and stop in the unit's flat shard)."""
        for unit in self.all_units():
            lo = self.group.rank * unit.shard_numel
            hi = lo + unit.shard_numel
            for slot in unit.slots:
                a, b = max(lo, slot.offset), min(hi, slot.offset + slot.numel)
                if a < b:
                    yield unit, slot.name, a - slot.offset, b - slot.offset, a - lo, b - lo

    def local_pieces(self, states: dict[str, Callable[[FlatUnit], torch.Tensor]]) -> Iterator[tuple[str, str, int,
                                                                                                        torch.Tensor]]:
        """For each parameter slice this rank owns: (state, parameter name, start, 1-D values), where `start`
        indexes the parameter's flattened elements and `states[state](unit)` gives the unit's flat shard."""
        for unit, name, start, _, lo, hi in self._owned_slices():
            for state, get in states.items():
                yield state, name, start, get(unit)[lo:hi]

    def load_pieces(self, states: dict[str, Callable[[FlatUnit], torch.Tensor]],
                    read: Callable[[str, str, int, int], torch.Tensor]) -> None:
        """Fill this rank's shards from `read(state, name, start, stop)` (flattened elements of the full tensor)."""
        with torch.no_grad():
            for unit, name, start, stop, lo, hi in self._owned_slices():
                for state, get in states.items():
                    get(unit)[lo:hi].copy_(read(state, name, start, stop))

    def memory_report(self, optimizer_state_bytes: int) -> dict[str, float]:
        """Sharded bytes per rank against the 16 Psi / N formula: fp32 master shards, their fp32 gradient
        shards (as held between backward and the optimizer step) and the optimizer state; plus the peak bytes
        of gathered full-parameter buffers seen so far."""
        psi = self.num_params()
        shard = sum(u.shard.numel() * u.shard.element_size() for u in self.all_units())
        grads = shard
        return {"params": psi, "world_size": self.group.world, "formula_16psi_over_n": 16 * psi / self.group.world,
                "measured_sharded_bytes": shard + grads + optimizer_state_bytes,
                "peak_gathered_bytes": self.peak_resident}


def _qualname(root: nn.Module, owner: nn.Module, attr: str) -> str:
    for name, sub in root.named_modules():
        if sub is owner:
            return f"{name}.{attr}" if name else attr
    raise KeyError(f"module owning {attr!r} is not inside the wrapped module")
