"""The kernel catalogue (`KernelSpec` per op name) and the `KernelRegistry` that dispatches to backends.

Pure Python: the registry stores callables and their `supports(*args, **kwargs)` checks, which
return a list of reasons the backend cannot run (empty = it can). Backends are tried in order of
priority; `reference` (plain torch) is the ground truth and always supports everything it is given.

Pins (`registry.pin(op, backend)`, or `TESSERA_KERNELS="op=backend,op2=backend"`) force a backend
for an op; a pinned backend that cannot run raises rather than silently falling back.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import NonNegativeFloat

from tessera.specs.base import Spec
from tessera.specs.tensor import TensorSpec

REFERENCE = "reference"
ENV_PINS = "TESSERA_KERNELS"


class Tolerance(Spec):
    SCHEMA_VERSION: ClassVar[int] = 1
    schema_version: Literal[1] = 1
    atol: NonNegativeFloat
    rtol: NonNegativeFloat


class KernelSpec(Spec):
    """One op's contract: argument and result tensors, per-dtype tolerances, version."""

    SCHEMA_VERSION: ClassVar[int] = 1
    schema_version: Literal[1] = 1
    name: str
    version: int = 1
    description: str
    args: tuple[TensorSpec, ...]
    results: tuple[TensorSpec, ...]
    tolerances: dict[str, Tolerance]

    def tolerance(self, dtype: str) -> Tolerance:
        try:
            return self.tolerances[dtype]
        except KeyError:
            known = sorted(self.tolerances)
            raise KeyError(f"op {self.name!r} has no tolerance for dtype {dtype!r}; has {known}") from None


class UnknownOpError(LookupError):
    """No op of that name is catalogued or registered."""


class KernelUnavailableError(LookupError):
    """No backend (or not the forced one) can run the op on these inputs; lists every reason."""


Supports = Callable[..., list[str]]


def _always(*args: Any, **kwargs: Any) -> list[str]:
    return []


@dataclass(frozen=True)
class KernelImpl:
    """A registered implementation: call it like the op."""

    op: str
    backend: str
    fn: Callable[..., Any]
    supports: Supports = _always
    priority: int = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


@dataclass
class KernelRegistry:
    """Op name -> backends. `get(op, *example_inputs)` returns the best `KernelImpl` for them."""

    catalogue: dict[str, KernelSpec] = field(default_factory=dict)
    _impls: dict[str, dict[str, KernelImpl]] = field(default_factory=dict)
    _pins: dict[str, str] = field(default_factory=dict)
    # Dispatch runs on every op call (hundreds per decode step): keep it to dict lookups.
    _order: dict[str, list[KernelImpl]] = field(default_factory=dict, repr=False)
    _env_pins: tuple[str, dict[str, str]] = field(default=("", {}), repr=False)

    def register(self, op: str, backend: str, fn: Callable[..., Any], *,
                 supports: Supports | None = None, priority: int = 0) -> KernelImpl:
        """Register `fn` as `backend` for `op`. Higher priority is preferred; the reference is last resort."""
        if op not in self.catalogue:
            known = sorted(self.catalogue)
            raise UnknownOpError(f"cannot register {backend!r} for unknown op {op!r}; catalogued: {known}")
        impl = KernelImpl(op, backend, fn, supports or _always, -10**9 if backend == REFERENCE else priority)
        self._impls.setdefault(op, {})[backend] = impl
        self._order.pop(op, None)
        return impl

    def ops(self) -> list[str]:
        return sorted(self.catalogue)

    def backends(self, op: str) -> list[str]:
        """Registered backends of `op`, best first."""
        return [impl.backend for impl in self._ordered(op)]

    def _ordered(self, op: str) -> list[KernelImpl]:
        order = self._order.get(op)
        if order is None:
            order = sorted(self._impls_of(op).values(), key=lambda impl: -impl.priority)
            self._order[op] = order
        return order

    def pin(self, op: str, backend: str | None) -> None:
        """Force `backend` for `op` (None removes the pin). Takes precedence over TESSERA_KERNELS."""
        self._impls_of(op)
        if backend is None:
            self._pins.pop(op, None)
        else:
            self._pins[op] = backend

    def pins(self) -> dict[str, str]:
        """Effective pins: TESSERA_KERNELS first, then those set with `pin`."""
        return dict(self._effective_pins())

    def _effective_pins(self) -> dict[str, str]:
        text = os.environ.get(ENV_PINS, "")
        if text != self._env_pins[0]:  # parse only when the variable changed
            self._env_pins = (text, parse_pins(text))
        return {**self._env_pins[1], **self._pins} if self._pins else self._env_pins[1]

    def get(self, op: str, *args: Any, backend: str | None = None, **kwargs: Any) -> KernelImpl:
        """Best backend of `op` that supports the given example inputs (none given: device-free checks).

        `backend=` forces one. Raises `UnknownOpError` for an unknown op and `KernelUnavailableError`
        (listing each backend's reasons) when no allowed backend can run.
        """
        forced = backend or self._effective_pins().get(op)
        if forced is not None:
            impls = self._impls_of(op)
            if forced not in impls:
                raise KernelUnavailableError(
                    f"op {op!r} has no backend {forced!r}; registered: {self.backends(op)}"
                )
            reasons = impls[forced].supports(*args, **kwargs)
            if reasons:
                raise KernelUnavailableError(f"op {op!r}: backend {forced!r} cannot run: {'; '.join(reasons)}")
            return impls[forced]
        why: dict[str, list[str]] = {}
        for impl in self._ordered(op):
            reasons = impl.supports(*args, **kwargs)
            if not reasons:
                return impl
            why[impl.backend] = reasons
        detail = "; ".join(f"{b}: {', '.join(r)}" for b, r in why.items())
        raise KernelUnavailableError(f"op {op!r}: no backend can run these inputs ({detail})")

    def __call__(self, op: str, *args: Any, **kwargs: Any) -> Any:
        """Dispatch: pick the best backend for these inputs and run it."""
        return self.get(op, *args, **kwargs)(*args, **kwargs)

    def table(self, backends: Sequence[str] | None = None) -> list[dict[str, str]]:
        """One row per op: for each backend, 'yes', the reasons it cannot run here, or '-' if not registered."""
        cols = list(backends) if backends else sorted({b for i in self._impls.values() for b in i}, key=_col_order)
        rows = []
        for op in self.ops():
            row = {"op": op}
            for b in cols:
                impl = self._impls.get(op, {}).get(b)
                if impl is None:
                    row[b] = "-"
                else:
                    reasons = impl.supports()
                    row[b] = "yes" if not reasons else "no: " + "; ".join(reasons)
            rows.append(row)
        return rows

    def _impls_of(self, op: str) -> dict[str, KernelImpl]:
        if op not in self.catalogue:
            raise UnknownOpError(f"unknown op {op!r}; known ops: {sorted(self.catalogue)}")
        return self._impls.get(op, {})


def _col_order(backend: str) -> tuple[int, str]:
    return (0 if backend == REFERENCE else 1, backend)


def parse_pins(text: str) -> dict[str, str]:
    """Parse 'op=backend,op2=backend' (whitespace allowed); raises ValueError naming a bad entry."""
    pins = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        op, sep, backend = entry.partition("=")
        if not sep or not op.strip() or not backend.strip():
            raise ValueError(f"{ENV_PINS}: entry {entry!r} is not of the form op=backend")
        pins[op.strip()] = backend.strip()
    return pins


def _t(name: str, *dims: int | str, dtypes: tuple[str, ...] = ()) -> TensorSpec:
    return TensorSpec(name=name, dims=dims, dtypes=dtypes)


_FLOAT = ("float32", "bfloat16", "float16")
_HALF = ("bfloat16", "float16")
_TOL_NORM = {"float32": Tolerance(atol=1e-5, rtol=1e-5), "bfloat16": Tolerance(atol=2e-2, rtol=2e-2),
             "float16": Tolerance(atol=2e-3, rtol=2e-3)}
_TOL_MM = {"float32": Tolerance(atol=1e-4, rtol=1e-4), "bfloat16": Tolerance(atol=3e-2, rtol=3e-2),
           "float16": Tolerance(atol=1e-2, rtol=1e-2)}
_TOL_ATTN = {"float32": Tolerance(atol=1e-4, rtol=1e-4), "bfloat16": Tolerance(atol=2e-2, rtol=2e-2),
             "float16": Tolerance(atol=5e-3, rtol=5e-3)}
_TOL_ROPE = {"float32": Tolerance(atol=1e-5, rtol=1e-5), "bfloat16": Tolerance(atol=1e-2, rtol=1e-2),
             "float16": Tolerance(atol=1e-3, rtol=1e-3)}
_TOL_EXACT = {d: Tolerance(atol=0.0, rtol=0.0) for d in (*_FLOAT, "float8_e4m3fn")}

# The paged decode ops' shared arguments: one query token (and new k/v row) a sequence, the caches, where the new
# rows go, and each sequence's blocks and length.
_DECODE_Q = _t("q", "B", "Hq", "D", dtypes=_FLOAT)
_DECODE_KV = (_t("k", "B", "Hkv", "D", dtypes=_FLOAT), _t("v", "B", "Hkv", "D", dtypes=_FLOAT))
_CACHES = (_t("k_cache", "NB", "BS", "Hkv", "D", dtypes=_FLOAT), _t("v_cache", "NB", "BS", "Hkv", "D", dtypes=_FLOAT))
_SLOTS = _t("slot_mapping", "B", dtypes=("int64",))
_TABLES = (_t("block_tables", "B", "MB", dtypes=("int32",)), _t("context_lens", "B", dtypes=("int32",)))
_DECODE_O = (_t("o", "B", "Hq", "D", dtypes=_FLOAT),)

def _gated(plain: KernelSpec) -> KernelSpec:
    """`<plain>_gated`: the same matmul of silu_mul(gu[:, :K], gu[:, K:]), SwiGLU's down projection reading a
    fused gate/up output gu [M, 2K] (the gated decode GEMVs skip the separate silu_mul launch)."""
    call = plain.description.rsplit(". ", 1)[-1].replace("(x, ", "_gated(gu, ", 1).replace("x's dtype", "gu's dtype")
    return KernelSpec(name=plain.name + "_gated",
                      description=f"{plain.name} of silu_mul(gu[:, :K], gu[:, K:]) for a fused gate/up output gu "
                      f"[M, 2K]. {call}",
                      args=(_t("gu", "M", "GU", dtypes=plain.args[0].dtypes), *plain.args[1:]),
                      results=plain.results, tolerances=plain.tolerances)


def _normed(plain: KernelSpec) -> KernelSpec:
    """`<plain>_normed`: the same matmul of rms_norm_residual(x, residual, weight, eps)'s output, also returning
    h = x + residual: a decoder layer's residual add and norm before its q/k/v or gate/up projection (the
    normalised decode GEMVs skip the separate norm launch)."""
    call = plain.description.rsplit(". ", 1)[-1].replace("(x, ", "_normed(x, residual, weight, ", 1)
    call = call.replace(") -> y", ", eps) -> (y", 1) + ", h)"
    x = plain.args[0]
    return KernelSpec(name=plain.name + "_normed",
                      description=f"{plain.name} of the output of rms_norm_residual(x, residual, weight, eps), and "
                      f"h = x + residual. {call}",
                      args=(x, _t("residual", "M", "K", dtypes=x.dtypes), _t("weight", "K", dtypes=_FLOAT),
                            *plain.args[1:]),
                      results=(*plain.results, _t("h", "M", "K", dtypes=x.dtypes)), tolerances=plain.tolerances)


def _swiglu(plain: KernelSpec) -> KernelSpec:
    """`<plain>_swiglu`: silu_mul of the two halves of the product with a fused gate/up weight (gate rows first):
    SwiGLU's gate/up projection storing the down projection's input (the decode GEMV computes both halves of
    an output in one block and skips the separate silu_mul launch)."""
    call = plain.description.rsplit(". ", 1)[-1].replace("(x, ", "_swiglu(x, ", 1).replace("-> y", "-> a", 1)
    return KernelSpec(name=plain.name + "_swiglu",
                      description=f"silu_mul(y[:, :N], y[:, N:]) of y = {plain.name} with a fused gate/up weight of "
                      f"2N rows (gate rows first). {call}",
                      args=(plain.args[0], *(_t(a.name, "N2", *a.dims[1:], dtypes=a.dtypes) for a in plain.args[1:])),
                      results=(_t("a", "M", "N", dtypes=plain.results[0].dtypes),), tolerances=plain.tolerances)


def _qkv_rope(plain: KernelSpec) -> KernelSpec:
    """`<plain>_qkv_rope`: a decode step's fused q/k/v projection with its rope and cache write (the decode GEMV
    rotates q and k and writes k and v at the tokens' slots in its epilogue, saving the rope and cache-write
    launches)."""
    call = plain.description.rsplit(". ", 1)[-1].split(" -> ")[0]
    weights = call[call.index("(x, ") + 4:-1]
    return KernelSpec(name=plain.name + "_qkv_rope",
                      description=f"A decode step's fused q/k/v projection with its rope and cache write: of y = "
                      f"{call} [M, (Hq + 2 Hkv) D], the q and k heads rotated by rope (cos/sin [M, D], the rows of the "
                      "tokens' positions) and the rotated k and v rows written at slot_mapping as kv_cache.write "
                      f"writes them. {plain.name}_qkv_rope(x, {weights}, cos, sin, k_cache, v_cache, slot_mapping, "
                      "n_q_heads, n_kv_heads) -> q [M, Hq, D], and the caches written in place",
                      args=(*plain.args, _t("cos", "M", "D", dtypes=_FLOAT), _t("sin", "M", "D", dtypes=_FLOAT),
                            *_CACHES, _t("slot_mapping", "M", dtypes=("int64",))),
                      results=(_t("q", "M", "Hq", "D", dtypes=plain.results[0].dtypes),),
                      tolerances=plain.tolerances)


CATALOGUE: tuple[KernelSpec, ...] = (
    KernelSpec(
        name="rms_norm", description="y = x / sqrt(mean(x^2, -1) + eps) * weight, computed in float32. "
        "rms_norm(x, weight, eps) -> y",
        args=(_t("x", "...", "D", dtypes=_FLOAT), _t("weight", "D", dtypes=_FLOAT)),
        results=(_t("y", "...", "D", dtypes=_FLOAT),), tolerances=_TOL_NORM),
    KernelSpec(
        name="rms_norm_residual", description="h = x + residual; y = rms_norm(h). "
        "rms_norm_residual(x, residual, weight, eps) -> (y, h)",
        args=(_t("x", "...", "D", dtypes=_FLOAT), _t("residual", "...", "D", dtypes=_FLOAT),
              _t("weight", "D", dtypes=_FLOAT)),
        results=(_t("y", "...", "D", dtypes=_FLOAT), _t("h", "...", "D", dtypes=_FLOAT)), tolerances=_TOL_NORM),
    KernelSpec(
        name="rope", description="Rotary embedding of q and k in the rotate_half layout, float32 math: "
        "x * cos + cat(-x2, x1) * sin with x = cat(x1, x2) split at D/2 and cos/sin broadcast over heads. "
        "rope(q, k, cos, sin) -> (q_rot, k_rot)",
        args=(_t("q", "N", "Hq", "D", dtypes=_FLOAT), _t("k", "N", "Hkv", "D", dtypes=_FLOAT),
              _t("cos", "N", "D", dtypes=_FLOAT), _t("sin", "N", "D", dtypes=_FLOAT)),
        results=(_t("q_rot", "N", "Hq", "D", dtypes=_FLOAT), _t("k_rot", "N", "Hkv", "D", dtypes=_FLOAT)),
        tolerances=_TOL_ROPE),
    KernelSpec(
        name="rope_qk_norm", description="Per-head RMSNorm of q and k over D (Qwen3's QK-norm), then rope, in float32 "
        "and rounded once (the normed values are not rounded before the rotation). "
        "rope_qk_norm(q, k, cos, sin, q_weight, k_weight, eps) -> (q_rot, k_rot)",
        args=(_t("q", "N", "Hq", "D", dtypes=_FLOAT), _t("k", "N", "Hkv", "D", dtypes=_FLOAT),
              _t("cos", "N", "D", dtypes=_FLOAT), _t("sin", "N", "D", dtypes=_FLOAT),
              _t("q_weight", "D", dtypes=_FLOAT), _t("k_weight", "D", dtypes=_FLOAT)),
        results=(_t("q_rot", "N", "Hq", "D", dtypes=_FLOAT), _t("k_rot", "N", "Hkv", "D", dtypes=_FLOAT)),
        tolerances=_TOL_NORM),
    KernelSpec(
        name="swiglu", description="silu(x @ w_gate.T) * (x @ w_up.T). swiglu(x, w_gate, w_up) -> y",
        args=(_t("x", "M", "K", dtypes=_FLOAT), _t("w_gate", "N", "K", dtypes=_FLOAT),
              _t("w_up", "N", "K", dtypes=_FLOAT)),
        results=(_t("y", "M", "N", dtypes=_FLOAT),), tolerances=_TOL_MM),
    KernelSpec(
        name="silu_mul", description="SwiGLU's gating on already-projected halves, as torch's eager ops compute it: "
        "silu(gate) in float32 rounded to gate's dtype, times up, rounded again (gate and up may be column slices "
        "of one fused gate/up output). silu_mul(gate, up) -> y",
        args=(_t("gate", "M", "F", dtypes=_FLOAT), _t("up", "M", "F", dtypes=_FLOAT)),
        results=(_t("y", "M", "F", dtypes=_FLOAT),), tolerances=_TOL_NORM),
    KernelSpec(
        name="attention.prefill",
        description="Causal (or full) attention over a packed variable-length batch; sequence i owns rows "
        "cu_seqlens[i]:cu_seqlens[i+1]. GQA: query head h reads kv head h // (Hq // Hkv). "
        "attention.prefill(q, k, v, cu_seqlens, max_seqlen, causal=True, scale=None) -> o",
        args=(_t("q", "N", "Hq", "D", dtypes=_FLOAT), _t("k", "N", "Hkv", "D", dtypes=_FLOAT),
              _t("v", "N", "Hkv", "D", dtypes=_FLOAT), _t("cu_seqlens", "B1", dtypes=("int32", "int64"))),
        results=(_t("o", "N", "Hq", "D", dtypes=_FLOAT),), tolerances=_TOL_ATTN),
    KernelSpec(
        name="attention.prefill_paged",
        description="Attention of new query tokens against a paged cache that already holds them: sequence i "
        "owns query rows cu_seqlens_q[i]:cu_seqlens_q[i+1], which are the last tokens of its context_lens[i] "
        "cached tokens; causal. attention.prefill_paged(q, k_cache, v_cache, block_tables, cu_seqlens_q, "
        "context_lens, max_seqlen_q, scale=None) -> o",
        args=(_t("q", "N", "Hq", "D", dtypes=_FLOAT), _t("k_cache", "NB", "BS", "Hkv", "D", dtypes=_FLOAT),
              _t("v_cache", "NB", "BS", "Hkv", "D", dtypes=_FLOAT),
              _t("block_tables", "B", "MB", dtypes=("int32",)), _t("cu_seqlens_q", "B1", dtypes=("int32",)),
              _t("context_lens", "B", dtypes=("int32",))),
        results=(_t("o", "N", "Hq", "D", dtypes=_FLOAT),), tolerances=_TOL_ATTN),
    KernelSpec(
        name="attention.decode_paged",
        description="One query token per sequence against its paged cache of context_lens[i] tokens. "
        "attention.decode_paged(q, k_cache, v_cache, block_tables, context_lens, scale=None) -> o",
        args=(_DECODE_Q, *_CACHES, *_TABLES), results=_DECODE_O, tolerances=_TOL_ATTN),
    KernelSpec(
        name="attention.decode_paged_write",
        description="kv_cache.write(k, v, k_cache, v_cache, slot_mapping), then attention.decode_paged: a decode "
        "step's new k/v rows (one a sequence) enter the cache and the query attends to it, in one op. "
        "slot_mapping[i] is the slot of sequence i's position context_lens[i] - 1, or < 0 (nothing written). "
        "attention.decode_paged_write(q, k, v, k_cache, v_cache, slot_mapping, block_tables, context_lens, "
        "scale=None) -> o, and the caches written in place",
        args=(_DECODE_Q, *_DECODE_KV, *_CACHES, _SLOTS, *_TABLES), results=_DECODE_O, tolerances=_TOL_ATTN),
    KernelSpec(
        name="attention.decode_paged_rope",
        description="rope(q, k, cos, sin) (rope_qk_norm with q_weight and k_weight), then "
        "attention.decode_paged_write with the rotated q and k: a decode step's rotation, cache write and "
        "attention in one op; cos/sin are the rows of the sequences' positions. "
        "attention.decode_paged_rope(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, block_tables, "
        "context_lens, q_weight=None, k_weight=None, eps=1e-6, scale=None) -> o, and the caches written in place",
        args=(_DECODE_Q, *_DECODE_KV, _t("cos", "B", "D", dtypes=_FLOAT), _t("sin", "B", "D", dtypes=_FLOAT),
              *_CACHES, _SLOTS, *_TABLES), results=_DECODE_O, tolerances=_TOL_ATTN),
    KernelSpec(
        name="kv_cache.write",
        description="Scatter new k/v rows into the cache by slot (block * block_size + offset); slot < 0 is "
        "skipped. In place. kv_cache.write(k, v, k_cache, v_cache, slot_mapping) -> None",
        args=(_t("k", "N", "Hkv", "D", dtypes=_FLOAT), _t("v", "N", "Hkv", "D", dtypes=_FLOAT),
              *_CACHES, _t("slot_mapping", "N", dtypes=("int64",))),
        results=(), tolerances=_TOL_EXACT),
    KernelSpec(
        name="matmul.dense",
        description="x @ w.T with w [N, K] in x's dtype: F.linear without a bias. Its fast backend serves "
        "decode shapes (M <= 16, half dtypes), where cuBLAS leaves narrow projections far below the copy "
        "ceiling. matmul.dense(x, w) -> y (x's dtype)",
        args=(_t("x", "M", "K", dtypes=_FLOAT), _t("w", "N", "K", dtypes=_FLOAT)),
        results=(_t("y", "M", "N", dtypes=_FLOAT),), tolerances=_TOL_MM),
    KernelSpec(
        name="matmul.int8_weight_only",
        description="x @ (w_q * scale[:, None]).T with int8 w_q [N, K] and per-output-channel scale [N]. "
        "matmul.int8_weight_only(x, w_q, scale) -> y (x's dtype)",
        args=(_t("x", "M", "K", dtypes=_FLOAT), _t("w_q", "N", "K", dtypes=("int8",)),
              _t("scale", "N", dtypes=_FLOAT)),
        results=(_t("y", "M", "N", dtypes=_FLOAT),), tolerances=_TOL_MM),
    KernelSpec(
        name="matmul.int4_awq",
        description="x @ W.T with W[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G]; q packed two per "
        "byte along K in qweight [N, K // 2] uint8, even k in the low nibble. "
        "matmul.int4_awq(x, qweight, scales, zeros, group_size) -> y (x's dtype)",
        args=(_t("x", "M", "K", dtypes=_FLOAT), _t("qweight", "N", "K2", dtypes=("uint8",)),
              _t("scales", "N", "G", dtypes=_FLOAT), _t("zeros", "N", "G", dtypes=_FLOAT)),
        results=(_t("y", "M", "N", dtypes=_FLOAT),), tolerances=_TOL_MM),
    KernelSpec(
        name="matmul.fp8",
        description="E4M3 matmul: x is quantized per row (dynamic scale amax/448), w_q [N, K] float8_e4m3fn "
        "with w_scale of shape [1] (per tensor) or [N] (per row); accumulates in float32. "
        "matmul.fp8(x, w_q, w_scale) -> y (x's dtype)",
        args=(_t("x", "M", "K", dtypes=(*_HALF, "float32")), _t("w_q", "N", "K", dtypes=("float8_e4m3fn",)),
              _t("w_scale", "S", dtypes=("float32",))),
        results=(_t("y", "M", "N", dtypes=_FLOAT),), tolerances=_TOL_MM),
)
_DECODE_MATMULS = ("matmul.dense", "matmul.int8_weight_only", "matmul.int4_awq")
CATALOGUE += tuple(_gated(spec) for spec in CATALOGUE if spec.name in _DECODE_MATMULS)
CATALOGUE += tuple(_normed(spec) for spec in CATALOGUE if spec.name in _DECODE_MATMULS)
CATALOGUE += tuple(_swiglu(spec) for spec in CATALOGUE if spec.name == "matmul.int4_awq")
CATALOGUE += tuple(_qkv_rope(spec) for spec in CATALOGUE if spec.name in ("matmul.int8_weight_only", "matmul.int4_awq"))
