"""A batch-1 decode step's decoder layers as one persistent launch (opt-in: `TESSERA_PERSISTENT_DECODE=1`).

`Transformer.hidden_states` hands a step here when the switch is on, the step is one token of one
sequence through a `PagedKVContext` or a one-row `FlatKVCache`, and the model is one this path can
take (`reasons` says why not otherwise): q/k/v and gate/up fused, every projection in one format
(float weights of the model's dtype, or tessera.quant's int8 weight-only or AWQ int4, without biases),
no attention biases, power-of-two widths, a cache in the model's dtype, and Triton on a CUDA device (or
its interpreter, where the launch is one program). The embedding, the rope angles, the final norm and
the LM head stay where they were; everything between runs in `tessera.kernels.triton.persistent_decode`.

Experimental: checked against the per-op path under the interpreter and, in bf16, on an H100, where it was
slower than the per-op graph (docs/serving.md); off by default.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from tessera.attn import FlatKVCache, PagedKVContext
from tessera.kernels import registry

#: Read at each call (a CUDA graph keeps what was in force at capture).
PERSISTENT_DECODE = os.environ.get("TESSERA_PERSISTENT_DECODE", "0") == "1"
#: Context splits a kv head (None: the programs a kv head, so every program has one); for tests, where one
#: program under the interpreter still exercises the merge of several splits.
SPLITS: int | None = None
#: For CPU checks: run each phase of each layer as a launch of its own over this many programs (the kernel
#: boundary standing in for the grid barrier, which the interpreter cannot run with several programs).
STEP_PROGRAMS: int | None = None
#: Overrides of the launch's tuning (for benchmarks comparing variants in one process): any of `TUNABLE`.
OPTIONS: dict[str, int | bool] = {}
#: What OPTIONS may set: gemv depth (1 or 2 tiles in flight), elements a weight tile at most (TILE, default
#: 16384: weights, or bytes of packed int4; the tile heights follow from it) or the tile heights of the four
#: projections themselves, positions an attention block, whether a phase's first tile loads before its
#: barrier, the barrier's poll bound, how it polls (POLL 0: an atomic add of zero, 1: an acquire load in
#: every thread, 2: as 0 with a short sleep between polls), warps a program, TIMED 1: each program stamps its
#: clock at every phase's start and end (read by `phase_profile`), L2_AHEAD a > 0: each program asks the L2
#: for its share of the projection a ahead as it reaches each projection (compiled out under the
#: interpreter), SPLITS, the context splits a kv head (default: the programs a kv head; fewer splits, fewer
#: partials to merge, longer spans a program), and HEAD_READY 1: no grid barrier between q/k/v and attention,
#: each attention item waiting for its own kv head's q/k/v tiles instead (needs BN_QKV to divide the head
#: dim).
TUNABLE = ("DEPTH", "TILE", "BN_QKV", "BN_O", "BN_GU", "BN_D", "BT", "PREFETCH", "SPIN_LIMIT", "POLL", "TIMED",
           "L2_AHEAD", "SPLITS", "HEAD_READY", "num_warps")


#: The options that take one of a few integers (the others but PREFETCH take powers of two).
_CHOICES = {"DEPTH": (1, 2), "POLL": (0, 1, 2), "TIMED": (0, 1), "L2_AHEAD": (0, 1, 2, 3), "HEAD_READY": (0, 1)}


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass
class _Step:
    """A decode step's cache: per-layer key and value tensors ([slots, n_kv_heads, head_dim] in memory),
    tokens a block, and the step's slot [1], block table [1, blocks] and context length [1] on the device.
    `owner` keeps the launch alive as long as the cache."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    block_size: int
    slot: torch.Tensor
    table: torch.Tensor
    ctx: torch.Tensor
    owner: object


def _step(kv: object) -> _Step | None:
    """The cache inputs of a one-sequence decode step through `kv`, or None for any other step."""
    if isinstance(kv, PagedKVContext):
        meta = kv.meta
        if not meta.decode_only or meta.block_tables.shape[0] != 1:
            return None
        return _Step(kv.cache.k, kv.cache.v, kv.cache.spec.block_size, meta.slot_mapping, meta.block_tables,
                     meta.context_lens, kv.cache)
    if isinstance(kv, FlatKVCache):
        if kv.batch_size != 1 or kv.length + 1 > kv.max_len:
            return None
        pages = [kv.paged(i) for i in range(len(kv.k))]
        block_size, slot, table, ctx = kv.decode_tables()
        return _Step([k for k, _ in pages], [v for _, v in pages], block_size, slot, table, ctx, kv)
    return None


def _kind(module: nn.Module) -> str:
    """'float', 'int8' or 'int4' for a projection this launch can take (a plain or fused float weight, or
    the int8 / AWQ-int4 weight-only formats of tessera.quant), else a description of what it is."""
    weight = getattr(module, "weight", None)
    if getattr(module, "bias", None) is not None:
        return f"{type(module).__name__} with a bias"
    if isinstance(getattr(module, "qweight", None), torch.Tensor) and hasattr(module, "scales"):
        return "int4"
    if isinstance(weight, torch.Tensor) and weight.dtype == torch.int8 and hasattr(module, "weight_scale"):
        return "int8"
    if isinstance(weight, torch.Tensor) and weight.is_floating_point() and weight.element_size() >= 2 \
            and (type(module) is nn.Linear or not isinstance(module, nn.Module)):
        return "float"
    return type(module).__name__


def _projections(layer: nn.Module) -> list[object] | None:
    """A layer's fused q/k/v, o, fused gate/up and down projections as weight holders, or None when q/k/v
    or gate/up is not fused (or no longer current)."""
    attn, mlp = layer.self_attn, layer.mlp
    if attn.qkv is None or not attn.qkv.active(attn.q_proj, attn.k_proj, attn.v_proj):
        return None
    if mlp.gate_up is None or not mlp.gate_up.active(mlp.gate_proj, mlp.up_proj):
        return None
    return [getattr(f, "fused", f) for f in (attn.qkv, attn.o_proj, mlp.gate_up, mlp.down_proj)]


def reasons(model: nn.Module, input_ids: torch.Tensor, kv: object) -> list[str]:
    """Why this step cannot take the persistent launch (empty when it can)."""
    return _check(model, input_ids, _step(kv))[0]


def _check(model: nn.Module, input_ids: torch.Tensor, step: _Step | None) -> tuple[list[str], tuple | None]:
    """`reasons`, and (when there are none) the pointer table's tensors, weight format and group size
    (`_tensors`)."""
    out = []
    cfg = model.config
    if step is None:
        out.append("not a one-sequence decode step through a PagedKVContext or a FlatKVCache")
    if tuple(input_ids.shape) != (1, 1):
        out.append(f"input_ids of shape {tuple(input_ids.shape)}: one token of one sequence only")
    if not (input_ids.is_cuda or _interpreting()):
        out.append("needs a CUDA device (or TRITON_INTERPRET=1)")
    if torch.is_grad_enabled():
        out.append("gradients enabled")
    if cfg.attention_bias:
        out.append("attention biases")
    hd, _, g = _shape(cfg)
    widths = {"d_model": cfg.d_model, "head_dim": hd, "n_heads // n_kv_heads": g,
              "n_heads * head_dim": cfg.n_heads * hd}
    out += [f"{k}={v} is not a power of two" for k, v in widths.items() if not _pow2(v)]
    dtype = model.model.embed_tokens.weight.dtype
    kinds, layers = set(), []
    for i, layer in enumerate(model.model.layers):
        parts = _projections(layer)
        if parts is None:
            out.append(f"layer {i}: q/k/v or gate/up not fused (fuse_projections)")
            break
        layers.append(parts)
        for name, part in zip(("q/k/v", "o_proj", "gate/up", "down_proj"), parts):
            kind = _kind(part)
            if kind not in ("float", "int8", "int4"):
                out.append(f"layer {i}: {name} is {kind}")
            elif kind == "float" and part.weight.dtype != dtype:
                out.append(f"layer {i}: {name} weight in {part.weight.dtype}, the model in {dtype}")
            kinds.add((kind, getattr(part, "group_size", None)))
        if out:
            break
    if len(kinds) > 1:
        out.append(f"projections of mixed formats {sorted(map(str, kinds))}: one format for every projection")
    if len(kinds) == 1:  # the kernel reads quantized rows as int32 words
        kind = next(iter(kinds))[0]
        per_word = {"int8": 4, "int4": 8}.get(kind)
        if per_word and cfg.d_ff % per_word:
            out.append(f"d_ff={cfg.d_ff} is not a multiple of {per_word}: {kind} rows are read as int32 words of "
                       f"{per_word} weights")
    if step is not None and step.k[0].dtype != dtype:
        out.append(f"KV cache in {step.k[0].dtype}, the model in {dtype}")
    if not out:
        try:
            import triton  # noqa: F401
        except ImportError:
            out.append("Triton is not installed")
    if out or step is None:
        return out, None
    table = _tensors(model, step, layers)
    # the kernel reads each entry as one dense row-major tensor at a 16-byte aligned address (its tiles
    # load 16 bytes a thread)
    seen = set()
    for i, t in enumerate(table[0]):
        if id(t) in seen:  # a tensor in several entries (those a model does not use hold another's) once
            continue
        seen.add(id(t))
        where = f"layer {i // len(_SLOT_NAMES)}: {_SLOT_NAMES[i % len(_SLOT_NAMES)]}"
        if not t.is_contiguous():
            out.append(f"{where} is not contiguous")
        elif t.data_ptr() % 16:
            out.append(f"{where} is not 16-byte aligned (address {t.data_ptr():#x})")
    return out, None if out else table


@dataclass(eq=False)
class _Launch:
    """What one (model, cache) pair needs at every call: the pointer table, scratch and the shape."""

    ptrs: torch.Tensor
    keep: tuple[torch.Tensor, ...]
    addresses: tuple[int, ...]
    scratch: dict[str, torch.Tensor]
    programs: int
    splits: int
    #: the kernel's constexpr arguments and launch options
    meta: dict
    #: the OPTIONS in force when it was built
    options: dict


def _shape(cfg: object) -> tuple[int, int, int]:
    """(head_dim, kv heads, query heads a kv head)."""
    return cfg.head_dim or cfg.d_model // cfg.n_heads, cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads


#: The pointer table's entries a layer, in the kernel's order (`persistent_decode.SLOTS` of them).
_SLOT_NAMES = ("q/k/v weight", "o_proj weight", "gate/up weight", "down_proj weight", "input norm weight",
               "post-attention norm weight", "q norm weight", "k norm weight", "key cache", "value cache",
               "q/k/v scales", "o_proj scales", "gate/up scales", "down_proj scales", "q/k/v zeros",
               "o_proj zeros", "gate/up zeros", "down_proj zeros")


def _tensors(model: nn.Module, step: _Step, projections: list[list[object]]) -> tuple[list[torch.Tensor], int, int]:
    """The pointer table's tensors (`persistent_decode.SLOTS` a layer), the weight format (0 float, 1 int8,
    2 int4) and the int4 group size; `projections`: each layer's, from `_projections`."""
    cfg = model.config
    rows, quant, group = [], 0, 128
    for i, (layer, parts) in enumerate(zip(model.model.layers, projections)):
        attn = layer.self_attn
        kind = _kind(parts[0])
        quant = {"float": 0, "int8": 1, "int4": 2}[kind]
        spare = layer.input_layernorm.weight  # any valid address, for entries this model does not use
        qn = attn.q_norm.weight if cfg.qk_norm else spare
        kn = attn.k_norm.weight if cfg.qk_norm else spare
        if quant == 2:
            group = parts[0].group_size
            weights = [p.qweight for p in parts]
            scales, zeros = [p.scales for p in parts], [p.zeros for p in parts]
        else:
            weights = [p.weight for p in parts]
            scales = [p.weight_scale for p in parts] if quant == 1 else [spare] * 4
            zeros = [spare] * 4
        rows += [*weights, layer.input_layernorm.weight, layer.post_attention_layernorm.weight, qn, kn,
                 step.k[i], step.v[i], *scales, *zeros]
    return rows, quant, group


def check_options(options: dict[str, int | bool]) -> dict[str, int | bool]:
    """A copy of `options` (for OPTIONS) after checking it: known names, and values the kernel can take."""
    unknown = sorted(set(options) - set(TUNABLE))
    if unknown:
        raise ValueError(f"persistent decode options: unknown {unknown}; tunable: {list(TUNABLE)}")
    for key, value in options.items():
        if key == "PREFETCH":
            ok, want = isinstance(value, bool), "true or false"
        elif key in _CHOICES:
            *head, last = map(str, _CHOICES[key])
            ok, want = value in _CHOICES[key] and not isinstance(value, bool), f"{', '.join(head)} or {last}"
        else:
            ok, want = isinstance(value, int) and not isinstance(value, bool) and _pow2(value), "a power of two"
        if not ok:
            raise ValueError(f"persistent decode option {key}={value!r}: expected {want}")
    return dict(options)


def parse_options(text: str) -> dict[str, int | bool]:
    """`check_options` of 'KEY=VALUE,KEY=VALUE' (VALUE an integer, or true / false); '' is no override."""
    options: dict[str, int | bool] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"persistent decode options {text!r}: {item!r} is not KEY=VALUE")
        value = value.strip()
        if value.lower() in ("true", "false"):
            options[key.strip()] = value.lower() == "true"
        else:
            try:
                options[key.strip()] = int(value)
            except ValueError:
                raise ValueError(f"persistent decode option {item!r}: the value is not an integer, true or "
                                 "false") from None
    return check_options(options)


def _launch_for(model: nn.Module, step: _Step, table: tuple) -> _Launch:
    import triton

    from tessera.kernels.triton import persistent_decode as pd

    assert len(_SLOT_NAMES) == pd.SLOTS
    options = check_options(OPTIONS)
    tensors, quant, group = table
    addresses = tuple(t.data_ptr() for t in tensors)
    # The launch (its scratch is what a captured graph writes) lives as long as the cache, which outlives
    # the graphs that use it; the model only finds its launches, weakly.
    owned: dict = step.owner.__dict__.setdefault("_persistent_decode", {})
    found = owned.get(id(model))
    if found is not None and found.addresses == addresses and (SPLITS is None or found.splits == SPLITS) \
            and (STEP_PROGRAMS is None or found.programs == STEP_PROGRAMS) and found.options == options:
        return found
    if tensors[0].is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("persistent decode: the weights, the cache or OPTIONS changed since the last eager call; "
                           "run one eager step before capturing")
    cfg = model.config
    dev, dtype = tensors[0].device, model.model.embed_tokens.weight.dtype
    hd, hkv, g = _shape(cfg)
    programs = 1 if dev.type != "cuda" else torch.cuda.get_device_properties(dev).multi_processor_count
    programs = STEP_PROGRAMS or programs
    splits = SPLITS or options.get("SPLITS") or max(1, programs // hkv)
    hkv_words = -(-hkv // 4) * 4
    scratch = {"a": torch.empty((hkv * g + 2 * hkv) * hd, device=dev, dtype=dtype),
               "o": torch.empty(hkv * g * hd, device=dev, dtype=dtype),
               "gu": torch.empty(2 * cfg.d_ff, device=dev, dtype=dtype),
               "part": torch.empty(hkv * splits * g * (hd + 2), device=dev, dtype=torch.float32),
               # the barrier's counter and the heads' merge and ready counts: one buffer, so that a step
               # zeroes them with one memset (three were three graph nodes); each part starts 16-byte
               # aligned, as separate tensors did
               "sync": torch.zeros(4 + 2 * hkv_words, device=dev, dtype=torch.int32),
               "flag": torch.zeros(1, device=dev, dtype=torch.int32),
               "x": torch.empty(cfg.d_model, device=dev, dtype=torch.float32),
               "times": torch.zeros((pd.timer_slots(cfg.n_layers), programs) if options.get("TIMED") else 1,
                                    device=dev, dtype=torch.int64)}
    scratch["cnt"], scratch["hcnt"], scratch["hready"] = (scratch["sync"][i:i + n] for i, n in
                                                          ((0, 1), (4, hkv), (4 + hkv_words, hkv)))
    ptrs = torch.tensor(addresses, dtype=torch.int64).view(cfg.n_layers, pd.SLOTS).to(dev)
    d, di, p, pack = cfg.d_model, cfg.d_ff, programs, 2 if quant == 2 else 1
    di_p = triton.next_power_of_2(di)
    tile = options.get("TILE", 16384)  # elements a tile at most (the BN_* options override it)
    meta = dict(SCALE=hd ** -0.5, L=cfg.n_layers, D=d, HKV=hkv, G=g, HD=hd, DI=di, DI_P=di_p, BS=step.block_size,
                S=splits, SP=triton.next_power_of_2(splits), BT=32,
                BN_QKV=pd.tile_rows((hkv * g + 2 * hkv) * hd, d // pack, p, tile),
                BN_O=pd.tile_rows(d, hkv * g * hd // pack, p, tile), BN_GU=pd.tile_rows(2 * di, d // pack, p, tile),
                BN_D=pd.tile_rows(d, di_p // pack, p, tile), QK_NORM=cfg.qk_norm, PREFETCH=True, SPIN_LIMIT=1 << 16,
                QUANT=quant, GS=group, DEPTH=1, num_warps=8)
    meta.update((k, v) for k, v in options.items() if k not in ("TILE", "SPLITS"))
    if meta.get("HEAD_READY") and hd % meta["BN_QKV"]:
        raise ValueError(f"persistent decode option HEAD_READY=1 needs q/k/v tiles within one head: BN_QKV="
                         f"{meta['BN_QKV']} does not divide head_dim={hd}")
    for key in ("POLL", "TIMED"):  # POLL 2's sleep, like L2_AHEAD's prefetches, compiles out under the interpreter
        if meta.get(key) == 1 and dev.type != "cuda":
            raise ValueError(f"persistent decode option {key}=1 runs inline PTX, which needs a CUDA device; the "
                             f"interpreter runs {key}=0")
    launch = _Launch(ptrs, tuple(tensors), addresses, scratch, programs, splits, meta, options)
    owned[id(model)] = launch
    model.__dict__.setdefault("_persistent_decode", weakref.WeakSet()).add(launch)
    return launch


def hidden(model: nn.Module, input_ids: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           kv: object) -> torch.Tensor | None:
    """The final-normed hidden state [1, 1, d_model] of a decode step (`x` its embedding, `cos`/`sin` its
    rope angles) through the persistent launch, or None when the switch is off or `reasons` objects."""
    if not PERSISTENT_DECODE:
        return None
    step = _step(kv)
    problems, table = _check(model, input_ids, step)
    if problems:
        return None
    from tessera.kernels.triton import persistent_decode as pd

    launch = _launch_for(model, step, table)
    s, p, meta = launch.scratch, launch.programs, launch.meta
    s["x"].copy_(x.reshape(-1))
    # the barrier's counter, and each head's merge count (its last split resets it; zeroed anyway should a
    # launch have given up) and ready count
    s["sync"].zero_()
    args = (s["x"], launch.ptrs, s["a"], s["o"], s["gu"], s["part"], s["hcnt"], s["hready"], s["cnt"], s["flag"],
            cos.reshape(-1), sin.reshape(-1), step.slot, step.table, step.ctx, model.config.norm_eps)
    if meta.get("TIMED"):  # the launch whose stamps `phase_profile` reads (also what a graph replays)
        model.__dict__["_persistent_timed"] = weakref.ref(launch)
    if STEP_PROGRAMS is None:
        pd.decode_layers_kernel[(p,)](*args, 0, s["times"], **meta)
    else:  # each phase of each layer a launch of its own (CPU checks with several programs)
        for layer in range(meta["L"]):
            for phase in range(5):
                pd.decode_layers_kernel[(p,)](*args, layer, s["times"], **meta, ONLY=phase)
    final = model.model.norm
    return registry("rms_norm", s["x"].to(x.dtype).view(1, 1, -1), final.weight, final.eps)


def launch_built(cache: object) -> bool:
    """Whether a persistent launch was built for `cache` (a paged cache, or the owner of a flat one): False
    when `reasons` refused every step, which then ran per op."""
    return bool(cache.__dict__.get("_persistent_decode"))


def barrier_failures(model: nn.Module) -> int:
    """Grid barriers that gave up in the launches so far (0 unless the programs were not all resident);
    reads the device counter, so it synchronises."""
    return sum(int(launch.scratch["flag"].item()) for launch in model.__dict__.get("_persistent_decode", ()))


def unmerged_heads(model: nn.Module) -> int:
    """Heads whose merge counter is not back at zero after the last step (0 unless some head's context splits
    were not each counted exactly once: a split skipped or run twice); reads the device, so it synchronises."""
    return sum(int((launch.scratch["hcnt"] != 0).sum().item())
               for launch in model.__dict__.get("_persistent_decode", ()))


def unready_heads(model: nn.Module) -> int:
    """With HEAD_READY: kv heads whose count of q/k/v tiles after the last step is not every layer's full count
    (0 unless a tile was counted twice or not at all, which would let attention read a head too early or wait
    in vain); reads the device, so it synchronises. 0 for launches without HEAD_READY."""
    from tessera.kernels.triton import persistent_decode as pd

    out = 0
    for launch in model.__dict__.get("_persistent_decode", ()):
        meta = launch.meta
        if meta.get("HEAD_READY"):
            full = meta["L"] * pd.ready_count(meta["G"], meta["HD"], meta["BN_QKV"])
            out += int((launch.scratch["hready"] != full).sum().item())
    return out


#: The phases of a layer, in the order the launch runs them (`phase_profile`'s keys).
PHASES = ("qkv", "attention", "o", "gate_up", "down")


def phase_profile(model: nn.Module) -> dict:
    """Where the last step of the model's TIMED launch spent its time (OPTIONS TIMED=1), averaged over layers:
    per phase, microseconds of work (a program's time from the phase's start to its end, the mean over programs
    and the slowest program's) and of the barrier after it (from the phase's end to the next one's start: the
    mean over programs, and the least, which is what the last program to arrive waits: the barrier's own
    latency), and the launch's span by the GPU timer. SM clocks convert to time by each program's clock rate
    over the launch. Synchronises; {} when no TIMED launch has run (or its cache is gone)."""
    ref = model.__dict__.get("_persistent_timed")
    launch = ref() if ref is not None else None
    if launch is None:
        return {}
    t = launch.scratch["times"].double().cpu()
    layers = (t.shape[0] - 4) // 10
    ns_per_cycle = (t[10 * layers + 2] - t[10 * layers]) / (t[10 * layers + 3] - t[10 * layers + 1])  # [P]
    starts = t[0:10 * layers:2].view(layers, 5, -1)
    ends = t[1:10 * layers:2].view(layers, 5, -1)
    nxt = torch.cat([starts.reshape(5 * layers, -1)[1:], t[10 * layers + 3][None]]).view(layers, 5, -1)
    work = (ends - starts) * ns_per_cycle / 1e3  # [layers, 5, P] microseconds
    wait = (nxt - ends) * ns_per_cycle / 1e3
    out = {"span_us": float(t[10 * layers + 2].max() - t[10 * layers].min()) / 1e3, "layers": layers,
           "programs": t.shape[1]}
    for i, name in enumerate(PHASES):
        out[name] = {"work_us_mean": float(work[:, i].mean()), "work_us_slowest": float(work[:, i].amax(1).mean()),
                     "barrier_us_mean": float(wait[:, i].mean()), "barrier_us_least": float(wait[:, i].amin(1).mean())}
    return out

