"""Where each side's float32 logit error comes from: the torch `tessera.model.Transformer` and
`tessera.jaxref`, each against a float64 forward of the same random weights, component by component.
A diagnosis behind `bench_jaxref.py --fp64-floor`, not a benchmark with a target.

Both models run with a float64 residual stream, and each component either in float32 (the
implementation's own float32 code, on its inputs rounded to float32) or in float64 (exact math), its
output carried in float64. With every component in float32 the logits are the plain float32 forward's
(the "plain float32" rows check it); with every component in float64 they are the float64 reference:
the torch model cast to float64 with its registry ops pinned to their references, which every row is
measured against. The sweeps:

  exact-one   all float32 but one component in float64: how much of the error goes when it is exact
  round-one   all float64 but one component in float32: that component's own error
  specials    RoPE tables from float32 angles with exact cos/sin (the angle rounding alone); torch
              attention through SDPA (math or default backend); jaxref's projections as one dot

Components: rope_tables (cos/sin from positions), rope (applying them to q/k; QK-norm too on torch),
qkv, attention (scores, softmax, sum over keys), o_proj, residual (the stream's adds), norm (the
blocks' RMSNorms), gate_up, silu_mul, down, final_norm, lm_head. The embedding lookup is exact.
The "tables" rows compare the float32 RoPE inverse frequencies and cos/sin tables directly.

    python3 benchmarks/probe_jaxref_error.py --tokens 64 --layers 2 --sweeps exact-one   # CPU, ~4 min
    python3 benchmarks/probe_jaxref_error.py                                 # CPU, 512 tokens, 16 layers, ~30 min
    source scripts/gpu-env.sh && XLA_PYTHON_CLIENT_PREALLOCATE=false \\
        python3 benchmarks/probe_jaxref_error.py --out $OUT                   # H200, a few minutes
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from unittest import mock

# JAX would otherwise reserve 75% of the GPU at start-up and starve the torch model beside it.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_result

import tessera.attn.attention as attn_attention
import tessera.jaxref.layers as jl
import tessera.jaxref.model as jm
import tessera.model.layers as model_layers
import tessera.model.transformer as model_transformer
from tessera.attn import RotaryEmbedding, rope_inv_freq
from tessera.jaxref import forward, from_hf_state
from tessera.kernels import registry
from tessera.model import Transformer
from tessera.specs import ModelConfig

COMPONENTS = ("rope_tables", "rope", "qkv", "attention", "o_proj", "residual", "norm", "gate_up", "silu_mul",
              "down", "final_norm", "lm_head")
SWEEPS = ("exact-one", "round-one", "specials")
LINEARS = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o_proj", "gate_proj": "gate_up",
           "up_proj": "gate_up", "down_proj": "down", "lm_head": "lm_head"}
JAX_MATMULS = {"wq": "qkv", "wk": "qkv", "wv": "qkv", "wo": "o_proj", "w_down": "down"}
TORCH_ATTENTION = ("sdpa-math", "sdpa-default", "sdpa-efficient")


@dataclass
class Variant:
    """One forward: each component's precision ("32", "64", or for rope_tables "angle32": float32
    angles, exact cos/sin), optionally torch's float32 attention backend or jaxref's sum block."""

    name: str
    modes: dict[str, str]
    torch_attention: str | None = None
    jax_sum_block: int | None = None
    sides: tuple[str, ...] = ("torch", "jax")


def variants(components: list[str], sweeps: list[str], cuda: bool) -> list[Variant]:
    all32, all64 = dict.fromkeys(COMPONENTS, "32"), dict.fromkeys(COMPONENTS, "64")
    out = [Variant("all float32", all32)]
    if "exact-one" in sweeps:
        out += [Variant(f"float32, {c} float64", {**all32, c: "64"}) for c in components]
    if "round-one" in sweeps:
        out += [Variant(f"float64, {c} float32", {**all64, c: "32"}) for c in components]
    if "specials" in sweeps:
        out += [Variant("float32, rope_tables from float32 angles, exact cos/sin", {**all32, "rope_tables": "angle32"}),
                Variant("float64, rope_tables from float32 angles, exact cos/sin", {**all64, "rope_tables": "angle32"}),
                Variant("float32, projections as one dot", all32, jax_sum_block=1 << 30, sides=("jax",))]
        backends = TORCH_ATTENTION if cuda else TORCH_ATTENTION[:2]
        out += [Variant(f"float32, attention {b}", all32, torch_attention=b, sides=("torch",)) for b in backends]
    return out


def _floats_to(dtype: Any, args: tuple[Any, ...]) -> list[Any]:
    return [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


def _widen(out: Any) -> Any:
    return tuple(o.double() for o in out) if isinstance(out, tuple) else out.double()


class TorchDispatch:
    """Stands in for the registry inside the torch model: runs each op at its component's precision,
    float32 through the real registry (its pins apply), float64 through the reference."""

    def __init__(self, variant: Variant, final_norm: torch.Tensor) -> None:
        self.variant, self.final_norm = variant, final_norm

    def run(self, op: str, component: str, *args: Any) -> Any:
        if self.variant.modes[component] == "64":
            return registry.get(op, backend="reference")(*_floats_to(torch.float64, args))
        args32 = _floats_to(torch.float32, args)
        if op == "attention.prefill" and self.variant.torch_attention:
            backend = {"sdpa-math": [SDPBackend.MATH], "sdpa-efficient": [SDPBackend.EFFICIENT_ATTENTION]}
            chosen = backend.get(self.variant.torch_attention)
            if self.variant.torch_attention == "sdpa-efficient" and args32[0].shape[1] != args32[1].shape[1]:
                # the fused backends take no GQA: give every query head its own copy of its KV head
                group = args32[0].shape[1] // args32[1].shape[1]
                args32 = (args32[0], *(x.repeat_interleave(group, dim=1) for x in args32[1:3]), *args32[3:])
            with sdpa_kernel(chosen) if chosen else nullcontext():
                return _widen(registry.get(op, *args32, backend="sdpa")(*args32))
        return _widen(registry(op, *args32))

    def __call__(self, op: str, *args: Any) -> Any:
        modes = self.variant.modes
        if op == "rms_norm":
            return self.run(op, self._norm(args[1]), *args)
        if op == "rms_norm_residual":
            x, residual, weight, eps = args
            norm = self._norm(weight)
            if modes["residual"] == modes[norm] == "32":
                return self.run(op, norm, *args)
            h = x + residual if modes["residual"] == "64" else (x.float() + residual.float()).double()
            return self.run("rms_norm", norm, h, weight, eps), h
        if op == "rope_qk_norm" and modes["rope"] != modes["norm"]:
            q, k, cos, sin, q_weight, k_weight, eps = args
            q, k = self.run("rms_norm", "norm", q, q_weight, eps), self.run("rms_norm", "norm", k, k_weight, eps)
            return self.run("rope", "rope", q, k, cos, sin)
        component = {"rope": "rope", "rope_qk_norm": "rope", "attention.prefill": "attention", "silu_mul": "silu_mul"}
        if op not in component:
            raise KeyError(f"probe: registry op {op!r} has no component; known: {sorted(component)}")
        return self.run(op, component[op], *args)

    def _norm(self, weight: torch.Tensor) -> str:
        return "final_norm" if weight is self.final_norm else "norm"


def _torch_linear(module: nn.Linear, mode: str, x: torch.Tensor) -> torch.Tensor:
    dtype = torch.float32 if mode == "32" else torch.float64
    bias = None if module.bias is None else module.bias.to(dtype)
    return F.linear(x.to(dtype), module.weight.to(dtype), bias).double()


def _torch_tables(rotary: RotaryEmbedding, forward_fn: Callable[..., Any], mode: str,
                  positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if mode == "64":
        return forward_fn(positions, torch.float64)
    if mode == "32":
        return _widen(forward_fn(positions, torch.float32))
    angles = (positions[..., None].float() * rotary.inv_freq.float()).double()
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos(), emb.sin()


@contextmanager
def torch_variant(model: Transformer, variant: Variant) -> Iterator[None]:
    """Inside, the float64 `model` runs each component at `variant`'s precision."""
    dispatch = TorchDispatch(variant, model.model.norm.weight)
    rotary = model.model.rotary_emb
    with ExitStack() as stack:
        for module in (model_layers, model_transformer, attn_attention):
            stack.enter_context(mock.patch.object(module, "registry", dispatch))
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                mode = variant.modes[LINEARS[name.rsplit(".", 1)[-1]]]
                stack.enter_context(mock.patch.object(module, "forward", partial(_torch_linear, module, mode)))
        tables = partial(_torch_tables, rotary, rotary.forward, variant.modes["rope_tables"])
        stack.enter_context(mock.patch.object(rotary, "forward", tables))
        yield


def _jax_run(mode: str, fn32: Callable[..., Any], fn64: Callable[..., Any], *args: Any) -> Any:
    """`fn32` on the float arrays of `args` in float32 or `fn64` on them in float64 (per `mode`); the
    result in the dtype of the first array argument."""
    out_dtype = next(a.dtype for a in args if isinstance(a, jax.Array))
    wide = jnp.float32 if mode == "32" else jnp.float64
    cast = [a.astype(wide) if isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jnp.floating) else a for a in args]
    out = (fn32 if mode == "32" else fn64)(*cast)
    return jax.tree.map(lambda o: o.astype(out_dtype), out)


def _rms_norm64(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _attention64(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
    hq, d = q.shape[2:]
    rep = hq // k.shape[2]
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    scores = jnp.einsum("bthd,bshd->bhts", q, k) * d ** -0.5
    scores = jnp.where(k_pos[:, None, None, :] <= q_pos[:, None, :, None], scores, -jnp.inf)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v)


def _jax_tables(mode: str, positions: jax.Array, inv_freq: np.ndarray,
                dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    if mode == "32":
        return tuple(t.astype(dtype) for t in jl.rope_tables(positions, inv_freq, jnp.float32))
    if mode == "64":
        angles = positions.astype(jnp.float64)[..., None] * jnp.asarray(inv_freq, jnp.float64)
    else:
        angles = (positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)).astype(jnp.float64)
    emb = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def jax_variant_fn(cfg: ModelConfig, variant: Variant) -> Callable[[Any, jax.Array], jax.Array]:
    """A jit-compiled `(params, ids) -> logits` of jaxref with each component at `variant`'s precision
    (the residual stream in float32 when `residual` is, else float64)."""
    modes = variant.modes
    stream = jnp.float32 if modes["residual"] == "32" else jnp.float64
    tags: dict[int, tuple[str, Any]] = {}  # id of a block's traced weight -> (its name, itself, kept alive)

    def block(lp: dict[str, Any], *args: Any) -> Any:
        tags.update({id(v): (k, v) for k, v in lp.items()})
        return original["_block"](lp, *args)

    def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
        return _jax_run(modes[JAX_MATMULS[tags[id(w)][0]]], jl.matmul, jl.matmul, x, w)

    def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array) -> jax.Array:
        gate = _jax_run(modes["gate_up"], jl.matmul, jl.matmul, x, w_gate)
        up = _jax_run(modes["gate_up"], jl.matmul, jl.matmul, x, w_up)
        silu_mul = lambda g, u: jax.nn.silu(g) * u  # noqa: E731 (jaxref's swiglu after its two matmuls)
        return _jax_run(modes["silu_mul"], silu_mul, silu_mul, gate, up)

    def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
        component = "norm" if id(weight) in tags else "final_norm"
        return _jax_run(modes[component], partial(jl.rms_norm, eps=eps), partial(_rms_norm64, eps=eps), x, weight)

    def lm_head(params: dict[str, Any], h: jax.Array) -> jax.Array:
        head = params["lm_head"] if "lm_head" in params else params["embed"].T
        return _jax_run(modes["lm_head"], lambda h, w: original["lm_head"]({"lm_head": w}, h),
                        lambda h, w: h @ w, h, head)

    replacements = {
        "_block": block, "matmul": matmul, "swiglu": swiglu, "rms_norm": rms_norm, "lm_head": lm_head,
        "apply_rope": lambda x, cos, sin: _jax_run(modes["rope"], jl.apply_rope, jl.apply_rope, x, cos, sin),
        "attention": lambda *a: _jax_run(modes["attention"], jl.attention, _attention64, *a),
        "rope_tables": partial(_jax_tables, modes["rope_tables"]),
    }
    original = {name: getattr(jm, name) for name in replacements}

    def logits(params: dict[str, Any], ids: jax.Array) -> jax.Array:
        params = {**params, "embed": params["embed"].astype(stream)}
        with ExitStack() as stack:
            for name, fn in replacements.items():
                stack.enter_context(mock.patch.object(jm, name, fn))
            if variant.jax_sum_block:
                stack.enter_context(mock.patch.object(jl, "SUM_BLOCK", variant.jax_sum_block))
            return jm.logits_fn(params, cfg, ids).astype(jnp.float64)

    return jax.jit(logits)


def _errors(got: np.ndarray, exact: np.ndarray) -> dict[str, float]:
    diff = np.abs(np.asarray(got, np.float64) - exact)
    return {"max_abs": float(diff.max()), "rms": float(np.sqrt(np.mean(diff**2)))}


def _ulps(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(np.asarray(a, np.float32).view(np.int32).astype(np.int64)
                      - np.asarray(b, np.float32).view(np.int32).astype(np.int64)).max())


def table_rows(cfg: ModelConfig, device: torch.device, tokens: int) -> list[dict[str, Any]]:
    """The float32 RoPE inputs directly: inverse frequencies (torch's built on `device` and on the CPU,
    as `.double()` rebuilds them, and jaxref's), and cos/sin over `tokens` positions against exact
    cos/sin of torch's CPU frequencies (and of float32 angles: the angle rounding alone)."""
    hd = cfg.head_dim or cfg.d_model // cfg.n_heads
    cpu = rope_inv_freq(hd, cfg.rope_theta, cfg.rope_scaling, device="cpu").numpy()
    on_device = rope_inv_freq(hd, cfg.rope_theta, cfg.rope_scaling, device=device).cpu().numpy()
    jax_freq = jl.rope_inv_freq(hd, cfg.rope_theta, cfg.rope_scaling)
    pos = np.arange(tokens)[None]
    exact = pos[..., None].astype(np.float64) * cpu.astype(np.float64)
    angle32 = (pos[..., None].astype(np.float32) * cpu).astype(np.float64)
    with torch.device(device):  # as the model builds it
        rotary = RotaryEmbedding(hd, cfg.rope_theta, cfg.rope_scaling)
    cos_t, sin_t = rotary(torch.from_numpy(pos).to(device), torch.float32)
    cos_j, sin_j = jl.rope_tables(jnp.asarray(pos, jnp.int32), jax_freq, jnp.float32)
    half = hd // 2

    def err(cos: Any, sin: Any) -> float:
        c, s = (np.asarray(t, np.float64)[..., :half] for t in (cos, sin))
        return float(max(np.abs(c - np.cos(exact)).max(), np.abs(s - np.sin(exact)).max()))

    return [
        {"table": f"inv_freq: torch on {device.type} vs torch on cpu (ulps)", "value": _ulps(on_device, cpu)},
        {"table": "inv_freq: jaxref vs torch on cpu (ulps)", "value": _ulps(jax_freq, cpu)},
        {"table": "cos/sin of float32 angles, exact (max abs err)", "value": err(np.cos(angle32), np.sin(angle32))},
        {"table": f"cos/sin: torch float32 on {device.type} (max abs err)", "value": err(cos_t.cpu(), sin_t.cpu())},
        {"table": f"cos/sin: jaxref float32 on {jax.devices()[0].platform} (max abs err)", "value": err(cos_j, sin_j)},
    ]


def torch_side(model: Transformer, ids: np.ndarray, device: torch.device, runs: list[Variant],
               plain32: np.ndarray) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The float64 reference logits and one row per torch variant; `model` is cast to float64."""
    ids_t = torch.from_numpy(ids).to(device)
    model.double()
    with torch.inference_mode(), torch_variant(model, Variant("all float64", dict.fromkeys(COMPONENTS, "64"))):
        exact = model(ids_t).cpu().numpy()
    rows = [{"side": "torch", "variant": "plain float32 (as bench_jaxref runs it)", **_errors(plain32, exact)}]
    for variant in runs:
        if "torch" not in variant.sides:
            continue
        t0 = time.perf_counter()
        with torch.inference_mode(), torch_variant(model, variant):
            got = model(ids_t).cpu().numpy()
        rows.append(_variant_row("torch", variant, got, exact, time.perf_counter() - t0, plain32))
    return exact, rows


def _variant_row(side: str, variant: Variant, got: np.ndarray, exact: np.ndarray, seconds: float,
                 plain: np.ndarray) -> dict[str, Any]:
    """One result row (errors against float64, run time; the all-float32 row also its distance to the
    plain float32 forward), printed as it comes."""
    row = {"side": side, "variant": variant.name, **_errors(got, exact), "s": seconds}
    if variant.name == "all float32":
        row["vs_plain"] = float(np.abs(got - plain).max())
    print(f"{side:<6} {variant.name}: {row['max_abs']:.3g}", flush=True)
    return row


def jax_side(params: Any, cfg: ModelConfig, ids: np.ndarray, exact: np.ndarray,
             runs: list[Variant]) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """jaxref's plain float32 logits and one row per jaxref variant (plus jaxref all-float64 vs torch's)."""
    ids_j = jnp.asarray(ids, jnp.int32)
    plain = np.asarray(forward(params, cfg, ids_j))
    rows = [{"side": "jax", "variant": "plain float32", **_errors(plain, exact)}]
    all64 = Variant("all float64 (vs torch float64: the two agree?)", dict.fromkeys(COMPONENTS, "64"))
    for variant in [all64, *runs]:
        if "jax" not in variant.sides:
            continue
        t0 = time.perf_counter()
        got = np.asarray(jax_variant_fn(cfg, variant)(params, ids_j))
        rows.append(_variant_row("jax", variant, got, exact, time.perf_counter() - t0, plain))
    return plain, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-3.2-1b", help="ModelConfig preset (default llama-3.2-1b)")
    parser.add_argument("--tokens", type=int, default=512, help="T of the B=1 forward (default 512)")
    parser.add_argument("--layers", type=int, default=None, help="keep only the first N layers (default all)")
    parser.add_argument("--components", nargs="+", choices=COMPONENTS, default=list(COMPONENTS),
                        help="components the exact-one and round-one sweeps vary (default all)")
    parser.add_argument("--sweeps", nargs="+", choices=SWEEPS, default=list(SWEEPS), help="default all three")
    parser.add_argument("--torch-kernels", choices=("reference", "default"), default="reference",
                        help="torch's float32 registry ops: pinned to their references (as bench_jaxref's parity "
                             "figure) or the registry's default choice")
    parser.add_argument("--out", type=Path, default=None, help="directory for the JSON (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.tokens < 1 or (args.layers is not None and args.layers < 1):
        parser.error(f"--tokens and --layers must be positive, got {args.tokens} and {args.layers}")

    jax.config.update("jax_enable_x64", True)  # float64 components; float32 arrays stay float32
    jax.config.update("jax_default_matmul_precision", "highest")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    if args.torch_kernels == "reference":
        for op in registry.ops():
            registry.pin(op, "reference")
    cfg = ModelConfig.preset(args.preset)
    if args.layers is not None:
        cfg = ModelConfig.model_validate({**cfg.model_dump(), "n_layers": args.layers})
    print(f"torch on {device}; jax {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind})")
    runs = variants(args.components, args.sweeps, cuda)

    tables = table_rows(cfg, device, args.tokens)
    torch.manual_seed(0)  # bench_jaxref's weights and tokens
    with torch.device(device):
        model = Transformer(cfg).eval()
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, args.tokens))
    with torch.inference_mode():
        plain_torch = model(torch.from_numpy(ids).to(device)).cpu().numpy()
    exact, rows = torch_side(model, ids, device, runs, plain_torch)
    state = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    if cfg.tie_embeddings:
        state.pop("lm_head.weight")
    params = from_hf_state(state, cfg)
    del state
    plain_jax, jax_rows = jax_side(params, cfg, ids, exact, runs)
    rows += jax_rows
    parity = float(np.abs(plain_jax - plain_torch).max())

    print_table(tables, title="RoPE inputs in float32")
    print_table([{k: r.get(k) for k in ("side", "variant", "max_abs", "rms", "vs_plain")} for r in rows],
                title=f"{args.preset}, {cfg.n_layers} layers, T={args.tokens}: float32 logits vs float64 "
                      f"(max|logit| {np.abs(exact).max():.3g}; jax vs torch plain float32 {parity:.3g})")
    path = write_result("probe-jaxref-error", {
        "preset": args.preset, "n_layers": cfg.n_layers, "tokens": args.tokens, "torch_kernels": args.torch_kernels,
        "jax": jax.__version__, "jax_device": jax.devices()[0].device_kind, "max_abs_logit": float(np.abs(exact).max()),
        "plain_float32_jax_vs_torch": parity, "tables": tables, "rows": rows}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
