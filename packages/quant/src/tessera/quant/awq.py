"""Activation-aware weight quantization (AWQ, Lin et al. 2023) as a float-to-float transform.

A few input channels of each linear carry much larger activations than the rest; their weights
matter most. AWQ multiplies those weight columns by a per-input-channel scale s (and divides the
activations by s, folded into the op before the linear, so the float model is unchanged) before
round-to-nearest int4: salient channels then lose less to rounding. Block by block:

1. Run the block on calibration inputs (outputs of the float model's previous block) and record
   the inputs of its linears.
2. For each scale group (the op before it, the linears it feeds, what the loss is measured on)
   search, for alpha in {0, 1/n, ..., (n-1)/n}, both s = mean|x|^alpha and s = mean|x|^alpha /
   mean|w~|^(1-alpha) (w~: each weight group divided by its absolute maximum, the reference
   implementation's "duo scaling"), each normalised by sqrt(max(s) min(s)); alpha=0 of the first
   form is plain RTN, so the search never does worse than RTN on the calibration data. The loss is
   the squared error of the group's output with the group's linears fake-quantized:
       input_layernorm          -> q, k, v        loss on the block output
       v_proj                   -> o_proj         loss on o_proj's output (only when the shapes match, MHA)
       post_attention_layernorm -> gate, up       loss on the MLP output
       up_proj                  -> down_proj      loss on down_proj's output
3. Fold the chosen scales: the norm's weight (or the previous linear's rows) is divided by s,
   the linears' columns multiplied by s.
4. Clipping search: for every linear but q/k (whose errors the softmax amplifies unpredictably),
   shrink each group's weight range by a factor in [1 - max_shrink, 1] and keep the one whose
   partial output on sampled calibration tokens is closest to the unclipped one.

The caller then quantizes the transformed weights with plain RTN int4 (`Int4Linear.from_linear`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from tessera.quant.rtn import fake_quantize_int4
from tessera.specs.quant import AWQConfig

CLIP_TOKENS = 512
"""Calibration tokens (evenly strided) used by the clipping search, as in the reference implementation."""

CHUNK_TOKENS = 8192
"""Tokens per forward chunk when replaying a block: bounds the MLP's intermediate activations."""

CLIP_ELEMENTS = 1 << 24
"""Elements of the clipping search's [rows, tokens, groups] partial-output buffer per step (64 MiB fp32)."""


@dataclass
class ScaleGroup:
    """`prev` feeds `linears` (qualified names inside the block); `target` is what the loss is measured
    on: "block" or the name of a module whose input is the input of `linears[0]`."""

    prev: str
    linears: tuple[str, ...]
    target: str


@dataclass
class BlockInputs:
    """Calibration inputs of one block: hidden-state chunks and the other arguments of each call."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    rest: list[tuple[tuple, dict]] = field(default_factory=list)


def scale_groups(block: nn.Module) -> list[ScaleGroup]:
    """The AWQ scale groups of a Llama/Qwen decoder layer (see the module docstring)."""
    groups = [ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "block")]
    v, o = block.get_submodule("self_attn.v_proj"), block.get_submodule("self_attn.o_proj")
    if v.out_features == o.in_features:
        groups.append(ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"))
    groups.append(ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"))
    groups.append(ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"))
    return groups


def calibration_batch(calib: Iterable[Iterable[int]] | torch.Tensor, samples: int, seq_len: int) -> torch.Tensor:
    """Token ids [n, T] int64 (n <= samples, T <= seq_len) from a [N, T] tensor or from token sequences,
    which are concatenated and cut into windows of `seq_len` (the last partial window is dropped
    unless it is the only one). Raises ValueError when there are no tokens."""
    if isinstance(calib, torch.Tensor):
        ids = calib.long()
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.numel() == 0:
            raise ValueError(f"calibration tensor must be non-empty [N, T], got shape {tuple(calib.shape)}")
        return ids[:samples, :seq_len]
    flat = [int(t) for seq in calib for t in seq]
    if not flat:
        raise ValueError("calibration data holds no tokens")
    if len(flat) < seq_len:
        return torch.tensor([flat])
    n = min(samples, len(flat) // seq_len)
    return torch.tensor(flat[: n * seq_len]).view(n, seq_len)


def apply_awq(model: nn.Module, config: AWQConfig, calib: torch.Tensor, quantized: set[str],
              progress: bool = True) -> None:
    """Transform `model` (a `tessera.model.Transformer`) in place: fold searched scales and clip weights.

    `calib` is [n, T] token ids; `quantized` holds the qualified names of the linears that will be
    int4-quantized afterwards (the others are only kept exact under the folding). The float model's
    function is unchanged by the scales; only the clipping alters it.
    """
    layers = model.get_submodule("model.layers")
    device = next(model.parameters()).device
    inputs = _first_block_inputs(model, layers[0], calib.to(device))
    for i, block in enumerate(tqdm(layers, desc="awq", unit="layer", disable=not progress)):
        prefix = f"model.layers.{i}."
        local = {name for name in (q.removeprefix(prefix) for q in quantized if q.startswith(prefix))}
        groups = scale_groups(block)
        feats, outputs = _run_block(block, inputs, [g.linears[0] for g in groups] + _ungrouped(block, groups))
        for group in groups:
            members = [n for n in group.linears if n in local]
            if not members:
                continue
            scales = _search_scale(block, group, members, inputs, outputs, feats[group.linears[0]], config)
            _fold(block, group, scales)
            feats[group.linears[0]] = feats[group.linears[0]] / scales.to(feats[group.linears[0]].dtype)
        if config.clip_search:
            owner = {n: g.linears[0] for g in groups for n in g.linears}
            for name in sorted(local):
                if name.endswith(("q_proj", "k_proj")):
                    continue
                _clip(block.get_submodule(name), _sample_tokens(feats[owner.get(name, name)]), config)
        inputs = BlockInputs(outputs, inputs.rest)


class _Captured(Exception):
    """Raised by the capture hook to stop the forward once block 0's inputs are recorded."""


def _first_block_inputs(model: nn.Module, first: nn.Module, ids: torch.Tensor) -> BlockInputs:
    captured = BlockInputs()

    def hook(_: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.hidden.append(args[0])
        captured.rest.append((args[1:], kwargs))
        raise _Captured

    rows = max(1, CHUNK_TOKENS // ids.shape[1])
    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for chunk in ids.split(rows):
                try:
                    model(chunk)
                except _Captured:
                    pass
    finally:
        handle.remove()
    return captured


def _ungrouped(block: nn.Module, groups: list[ScaleGroup]) -> list[str]:
    """Linears of the block that no scale group covers (o_proj under GQA): clipped, not scaled."""
    covered = {n for g in groups for n in g.linears}
    return [n for n, m in block.named_modules() if isinstance(m, nn.Linear) and n not in covered]


@torch.no_grad()
def _run_block(block: nn.Module, inputs: BlockInputs, watch: list[str]
               ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Block outputs per chunk, and the inputs of the `watch`ed modules flattened to [tokens, features]."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in watch}
    handles = [
        block.get_submodule(n).register_forward_pre_hook(lambda _m, a, n=n: seen[n].append(a[0].flatten(0, -2)))
        for n in watch
    ]
    try:
        outputs = [block(h, *args, **kwargs) for h, (args, kwargs) in zip(inputs.hidden, inputs.rest)]
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(xs) for n, xs in seen.items()}, outputs


def _weight_mean(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Mean over output rows of |w| / (absolute maximum of its quantization group): [K] float32."""
    w = torch.cat([x.float() for x in weights])
    g = w.abs().reshape(-1, group_size)
    return (g / (g.amax(dim=1, keepdim=True) + 1e-6)).reshape(w.shape).mean(dim=0)


def _candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor, n_grid: int) -> Iterable[torch.Tensor]:
    for duo in (False, True):
        for i in range(n_grid):
            alpha = i / n_grid
            s = x_mean.pow(alpha)
            if duo:
                s = s / (w_mean.pow(1 - alpha) + 1e-4)
            s = s.clamp(min=1e-4)
            yield s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def _search_scale(block: nn.Module, group: ScaleGroup, members: list[str], inputs: BlockInputs,
                  block_out: list[torch.Tensor], x: torch.Tensor, config: AWQConfig) -> torch.Tensor:
    """The per-input-channel scale [K] float32 of `group` with the lowest output error."""
    linears = [block.get_submodule(n) for n in members]
    originals = [lin.weight.detach().clone() for lin in linears]
    x_mean = x.abs().float().mean(dim=0)
    w_mean = _weight_mean(originals, config.group_size)
    run, reference = _loss_target(block, group, inputs, block_out, x)
    best, best_err = torch.ones_like(x_mean), math.inf
    try:
        for s in _candidate_scales(x_mean, w_mean, config.n_grid):
            for lin, w in zip(linears, originals):
                q = fake_quantize_int4(w.float() * s, config.group_size, config.zero_point) / s
                lin.weight.copy_(q.to(w.dtype))
            err = sum(float((out.float() - ref.float()).pow(2).sum()) for out, ref in zip(run(), reference))
            if err < best_err:
                best, best_err = s, err
    finally:
        for lin, w in zip(linears, originals):
            lin.weight.copy_(w)
    return best


def _loss_target(block: nn.Module, group: ScaleGroup, inputs: BlockInputs, block_out: list[torch.Tensor],
                 x: torch.Tensor) -> tuple[Callable[[], list[torch.Tensor]], list[torch.Tensor]]:
    """(run, reference): `run()` recomputes the group's target outputs with the current weights."""
    if group.target == "block":
        def run() -> list[torch.Tensor]:
            return [block(h, *a, **kw) for h, (a, kw) in zip(inputs.hidden, inputs.rest)]

        return run, block_out
    module = block.get_submodule(group.target)
    chunks = x.split(CHUNK_TOKENS)

    def run_module() -> list[torch.Tensor]:
        return [module(c) for c in chunks]

    return run_module, run_module()


@torch.no_grad()
def _fold(block: nn.Module, group: ScaleGroup, scales: torch.Tensor) -> None:
    """prev's output channels /= s, each linear's input channels *= s (the float function is unchanged)."""
    prev = block.get_submodule(group.prev)
    s = scales.to(prev.weight.device)
    if isinstance(prev, nn.Linear):
        prev.weight.copy_((prev.weight.float() / s[:, None]).to(prev.weight.dtype))
        if prev.bias is not None:
            prev.bias.copy_((prev.bias.float() / s).to(prev.bias.dtype))
    else:
        prev.weight.copy_((prev.weight.float() / s).to(prev.weight.dtype))
    for name in group.linears:
        lin = block.get_submodule(name)
        lin.weight.copy_((lin.weight.float() * s[None, :]).to(lin.weight.dtype))


def _sample_tokens(x: torch.Tensor) -> torch.Tensor:
    step = max(1, x.shape[0] // CLIP_TOKENS)
    return x[::step][:CLIP_TOKENS].float()


@torch.no_grad()
def _clip(linear: nn.Linear, x: torch.Tensor, config: AWQConfig) -> None:
    """Shrink each weight group's [min, max] range by the factor whose partial outputs on `x` [T, K]
    are closest to the unclipped weights' (the original range is one of the candidates). The groups of
    a row are chosen independently, so their errors can add up; a row whose whole output on `x` would
    then be further from the float output than plain RTN's keeps its unclipped weights."""
    g = config.group_size
    w = linear.weight.float()
    n, k = w.shape
    xg = x.reshape(x.shape[0], k // g, g)
    steps = max(1, round(config.max_shrink * config.clip_grid))
    clipped = torch.empty_like(w)
    rows = max(1, CLIP_ELEMENTS // (x.shape[0] * (k // g)))
    for r0 in range(0, n, rows):
        wg = w[r0 : r0 + rows].reshape(-1, k // g, g)
        ref = torch.einsum("tgk,rgk->rtg", xg, wg)
        hi0, lo0 = wg.amax(-1, keepdim=True).clamp(min=0), wg.amin(-1, keepdim=True).clamp(max=0)
        best_err = torch.full(wg.shape[:2], math.inf, device=w.device)
        best = wg
        for i in range(steps):
            ratio = 1 - i / config.clip_grid
            cand = wg.clamp(lo0 * ratio, hi0 * ratio)
            q = fake_quantize_int4(cand.reshape(-1, k), g, config.zero_point).reshape(wg.shape)
            err = (torch.einsum("tgk,rgk->rtg", xg, q) - ref).pow(2).mean(1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better[..., None], cand, best)
        best = best.reshape(-1, k)
        w_rows = w[r0 : r0 + rows]
        ref = x @ w_rows.T
        worse = _row_error(best, x, ref, g, config.zero_point) > _row_error(w_rows, x, ref, g, config.zero_point)
        clipped[r0 : r0 + rows] = torch.where(worse[:, None], w_rows, best)
    linear.weight.copy_(clipped.to(linear.weight.dtype))


def _row_error(w: torch.Tensor, x: torch.Tensor, reference: torch.Tensor, group_size: int, zero_point: bool
               ) -> torch.Tensor:
    """Squared error per output row [N] of `x @ Q(w).T` against the float output `reference` [T, N],
    Q = RTN int4."""
    q = fake_quantize_int4(w, group_size, zero_point)
    return (x @ q.T - reference).pow(2).sum(dim=0)
