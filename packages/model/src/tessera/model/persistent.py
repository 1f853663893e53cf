"""A batch-1 decode step's decoder layers as one persistent launch (opt-in: `TESSERA_PERSISTENT_DECODE=1`).

`Transformer.hidden_states` hands a step here when the switch is on, the step is one token of one
sequence through a `PagedKVContext`, and the model is one this path can take (`reasons` says why
not otherwise): q/k/v and gate/up fused over plain float weights, no attention biases, power-of-two
widths, a cache in the model's dtype, and Triton on a CUDA device (or its interpreter, where the
launch is one program). The embedding, the rope angles, the final norm and the LM head stay where
they were; everything between runs in `tessera.kernels.triton.persistent_decode`.

Experimental: built and checked against the per-op path under the interpreter, not yet timed on a GPU.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from tessera.attn import PagedKVContext
from tessera.kernels import registry

#: Read at each call (a CUDA graph keeps what was in force at capture).
PERSISTENT_DECODE = os.environ.get("TESSERA_PERSISTENT_DECODE", "0") == "1"
#: Context splits a kv head (None: the programs a kv head, so every program has one); for tests, where one
#: program under the interpreter still exercises the merge of several splits.
SPLITS: int | None = None


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def reasons(model: nn.Module, input_ids: torch.Tensor, kv: object) -> list[str]:
    """Why this step cannot take the persistent launch (empty when it can)."""
    out = []
    cfg = model.config
    if not isinstance(kv, PagedKVContext) or not kv.meta.decode_only:
        out.append("not a decode-only step through a PagedKVContext")
    if tuple(input_ids.shape) != (1, 1):
        out.append(f"input_ids of shape {tuple(input_ids.shape)}: one token of one sequence only")
    if not (input_ids.is_cuda or _interpreting()):
        out.append("needs a CUDA device (or TRITON_INTERPRET=1)")
    if torch.is_grad_enabled():
        out.append("gradients enabled")
    if cfg.attention_bias:
        out.append("attention biases")
    hd = cfg.head_dim or cfg.d_model // cfg.n_heads
    g = cfg.n_heads // cfg.n_kv_heads
    widths = {"d_model": cfg.d_model, "head_dim": hd, "n_heads // n_kv_heads": g,
              "n_heads * head_dim": cfg.n_heads * hd}
    out += [f"{k}={v} is not a power of two" for k, v in widths.items() if not _pow2(v)]
    dtype = model.lm_head.weight.dtype
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        if attn.qkv is None or not attn.qkv.active(attn.q_proj, attn.k_proj, attn.v_proj) \
                or not hasattr(attn.qkv, "weight"):
            out.append(f"layer {i}: q/k/v not fused over plain weights (fuse_projections)")
        if mlp.gate_up is None or not mlp.gate_up.active(mlp.gate_proj, mlp.up_proj) \
                or not hasattr(mlp.gate_up, "weight"):
            out.append(f"layer {i}: gate/up not fused over plain weights (fuse_projections)")
        for name, lin in (("o_proj", attn.o_proj), ("down_proj", mlp.down_proj)):
            if type(lin) is not nn.Linear or lin.bias is not None:
                out.append(f"layer {i}: {name} is {type(lin).__name__}, not a plain bias-free nn.Linear")
            elif lin.weight.dtype != dtype:
                out.append(f"layer {i}: {name} weight in {lin.weight.dtype}, the model in {dtype}")
        if out:
            break
    if isinstance(kv, PagedKVContext) and kv.cache.k[0].dtype != dtype:
        out.append(f"KV cache in {kv.cache.k[0].dtype}, the model in {dtype}")
    if not out:
        try:
            import triton  # noqa: F401
        except ImportError:
            out.append("Triton is not installed")
    return out


@dataclass(eq=False)
class _Launch:
    """What one (model, cache) pair needs at every call: the pointer table, scratch and the shape."""

    ptrs: torch.Tensor
    keep: tuple[torch.Tensor, ...]
    addresses: tuple[int, ...]
    scratch: dict[str, torch.Tensor]
    programs: int
    splits: int


def _tensors(model: nn.Module, cache: object) -> list[torch.Tensor]:
    cfg = model.config
    rows = []
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        qn = attn.q_norm.weight if cfg.qk_norm else layer.input_layernorm.weight  # any valid pointer
        kn = attn.k_norm.weight if cfg.qk_norm else layer.input_layernorm.weight
        rows += [attn.qkv.weight, attn.o_proj.weight, mlp.gate_up.weight, mlp.down_proj.weight,
                 layer.input_layernorm.weight, layer.post_attention_layernorm.weight, qn, kn, cache.k[i], cache.v[i]]
    return rows


def _launch_for(model: nn.Module, kv: PagedKVContext) -> _Launch:
    from tessera.kernels.triton import persistent_decode as pd

    tensors = _tensors(model, kv.cache)
    addresses = tuple(t.data_ptr() for t in tensors)
    # The launch (its scratch is what a captured graph writes) lives as long as the cache, which outlives
    # the graphs that use it; the model only finds its launches, weakly.
    owned: dict = kv.cache.__dict__.setdefault("_persistent_decode", {})
    found = owned.get(id(model))
    if found is not None and found.addresses == addresses and (SPLITS is None or found.splits == SPLITS):
        return found
    if tensors[0].is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("persistent decode: the weights or the cache moved since the last eager call; "
                           "run one eager step before capturing")
    bad = [i for i, t in enumerate(tensors) if not t.is_contiguous()]
    if bad:
        raise ValueError(f"persistent decode: table entries {bad} are not contiguous")
    cfg = model.config
    dev, dtype = tensors[0].device, tensors[0].dtype
    hd = cfg.head_dim or cfg.d_model // cfg.n_heads
    hkv, g = cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads
    programs = 1 if dev.type != "cuda" else torch.cuda.get_device_properties(dev).multi_processor_count
    splits = SPLITS or max(1, programs // hkv)
    scratch = {"a": torch.empty((hkv * g + 2 * hkv) * hd, device=dev, dtype=dtype),
               "o": torch.empty(hkv * g * hd, device=dev, dtype=dtype),
               "gu": torch.empty(2 * cfg.d_ff, device=dev, dtype=dtype),
               "part": torch.empty(hkv * splits * g * (hd + 2), device=dev, dtype=torch.float32),
               "hcnt": torch.zeros(hkv, device=dev, dtype=torch.int32),
               "cnt": torch.zeros(1, device=dev, dtype=torch.int32),
               "flag": torch.zeros(1, device=dev, dtype=torch.int32),
               "x": torch.empty(cfg.d_model, device=dev, dtype=torch.float32)}
    ptrs = torch.tensor(addresses, dtype=torch.int64).view(cfg.n_layers, pd.SLOTS).to(dev)
    launch = _Launch(ptrs, tuple(tensors), addresses, scratch, programs, splits)
    owned[id(model)] = launch
    model.__dict__.setdefault("_persistent_decode", weakref.WeakSet()).add(launch)
    return launch


def hidden(model: nn.Module, input_ids: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           kv: object) -> torch.Tensor | None:
    """The final-normed hidden state [1, 1, d_model] of a decode step (`x` its embedding, `cos`/`sin` its
    rope angles) through the persistent launch, or None when the switch is off or `reasons` objects."""
    if not PERSISTENT_DECODE or reasons(model, input_ids, kv):
        return None
    import triton

    from tessera.kernels.triton import persistent_decode as pd

    cfg = model.config
    launch = _launch_for(model, kv)
    s = launch.scratch
    hd = cfg.head_dim or cfg.d_model // cfg.n_heads
    hkv, g = cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads
    d, di, p = cfg.d_model, cfg.d_ff, launch.programs
    di_p = triton.next_power_of_2(di)
    meta = kv.meta
    s["x"].copy_(x.reshape(-1))
    s["cnt"].zero_()
    s["hcnt"].zero_()  # the last split of each head resets it; zeroed anyway should a launch have given up
    pd.decode_layers_kernel[(p,)](
        s["x"], launch.ptrs, s["a"], s["o"], s["gu"], s["part"], s["hcnt"], s["cnt"], s["flag"],
        cos.reshape(-1), sin.reshape(-1), meta.slot_mapping, meta.block_tables, meta.context_lens, cfg.norm_eps,
        SCALE=hd ** -0.5, L=cfg.n_layers, D=d, HKV=hkv, G=g, HD=hd, DI=di, DI_P=di_p,
        BS=kv.cache.spec.block_size, S=launch.splits, SP=triton.next_power_of_2(launch.splits), BT=32,
        BN_QKV=pd.tile_rows((hkv * g + 2 * hkv) * hd, d, p), BN_O=pd.tile_rows(d, hkv * g * hd, p),
        BN_GU=pd.tile_rows(2 * di, d, p), BN_D=pd.tile_rows(d, di_p, p), QK_NORM=cfg.qk_norm, PREFETCH=True,
        SPIN_LIMIT=1 << 16, num_warps=8)
    final = model.model.norm
    return registry("rms_norm", s["x"].to(x.dtype).view(1, 1, d), final.weight, final.eps)


def barrier_failures(model: nn.Module) -> int:
    """Grid barriers that gave up in the launches so far (0 unless the programs were not all resident);
    reads the device counter, so it synchronises."""
    return sum(int(launch.scratch["flag"].item()) for launch in model.__dict__.get("_persistent_decode", ()))
