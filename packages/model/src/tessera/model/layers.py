"""The blocks of the decoder: RMSNorm, attention, SwiGLU MLP, and the pre-norm decoder layer.

Module and parameter names follow Hugging Face Llama/Qwen so that `state_dict()` keys match theirs.
Every projection is called as a module, so a quantized linear with the same call signature can
replace it in place.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
from torch import nn

from tessera.attn import KVContext, causal_attention
from tessera.kernels import registry
from tessera.specs import ModelConfig

if TYPE_CHECKING:
    from tessera.model.fusion import FusedProjections


#: Whether a chained block's norms may run inside its fused projections (`forward_normed`). Off by default:
#: on the H200 a batch-1 decode graph replayed 1.7% faster with each norm a launch of its own, which PDL
#: overlaps (benchmarks/results/serve-decode-normed-nvidia-h200-2026-12-05.json); `TESSERA_FUSED_NORM=1`, or
#: setting it True, turns it on.
FUSED_NORMS = os.environ.get("TESSERA_FUSED_NORM", "0") == "1"
#: Whether a fused gate/up projection with a one-op SwiGLU (`FusedProjections.has_swiglu`: int4 AWQ, whose decode
#: GEMV stores silu_mul) uses it. On by default; `TESSERA_FUSED_SWIGLU=0`, or setting it False, runs the
#: projection and then silu_mul (for comparisons). Read at each call: a CUDA graph keeps what was in force when
#: it was captured.
FUSED_SWIGLU = os.environ.get("TESSERA_FUSED_SWIGLU", "1") != "0"
#: Whether a decode step's fused q/k/v projection with a one-op rope and cache write (`FusedProjections.
#: has_qkv_rope`: int8 and int4 AWQ, whose decode GEMVs do both in their epilogue) uses it, where the KV context offers
#: `decode_cache` and the model has no QK-norm. Off by default (batch-1 steps were slower with it on an H100,
#: docs/kernels.md); `TESSERA_FUSED_QKV_ROPE=1`, or setting it True, turns it on. Read at each call.
FUSED_QKV_ROPE = os.environ.get("TESSERA_FUSED_QKV_ROPE", "0") == "1"


def _norm_target(module: nn.Module, fused: FusedProjections | None,
                 *parts: nn.Module) -> FusedProjections | None:
    """`fused` where a chained block's norm may run inside it (`FUSED_NORMS` on, `parts` still fused and
    active, no hook on `module`, which must see the normalised input); else None."""
    if not FUSED_NORMS or fused is None or module._forward_hooks or module._forward_pre_hooks:
        return None
    return fused if fused.active(*parts) else None


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up over [..., F] halves as the registry op `silu_mul` (one launch on a GPU)."""
    lead, f = gate.shape[:-1], gate.shape[-1]
    return registry("silu_mul", gate.reshape(-1, f), up.reshape(-1, f)).view(*lead, f)


class RMSNorm(nn.Module):
    """`x / sqrt(mean(x^2) + eps) * weight` over the last dim `[..., dim]`, via registry op `rms_norm`."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return registry("rms_norm", x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class Attention(nn.Module):
    """Grouped-query self-attention: `n_heads` query heads share `n_kv_heads` key/value heads.

    RoPE (after QK-norm when the config has it) is one registry op over q and k together; a KV context
    with `attend_rotary` (a paged decode step) takes q and k unrotated and does the rotation, the cache
    write and the attention in one op instead.
    `tessera.model.fusion.fuse_projections` may set `qkv` so that inference runs q/k/v as one GEMM.
    """

    qkv: FusedProjections | None = None

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.head_dim or cfg.d_model // cfg.n_heads
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(cfg.d_model, q_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.d_model, kv_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.d_model, kv_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q_dim, cfg.d_model, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv: KVContext | None = None) -> torch.Tensor:
        if self.qkv is not None and self.qkv.active(self.q_proj, self.k_proj, self.v_proj):
            o = self._attend_rope_projected(x, cos, sin, kv)
            if o is not None:
                return o
            q, k, v = self.qkv(x)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self._attend(q, k, v, cos, sin, kv)

    def forward_normed(self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm, cos: torch.Tensor,
                       sin: torch.Tensor, kv: KVContext | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`(self(y, cos, sin, kv), h)` for `y, h = rms_norm_residual(x, residual)` under `norm`'s weight: with
        q/k/v fused, the norm goes to the fused projection (`matmul_normed`: one launch at a decode step)."""
        target = _norm_target(self, self.qkv, self.q_proj, self.k_proj, self.v_proj)
        if target is None or self._rope_cache(target, x, kv) is not None:
            # no fused projection, or one that rotates and writes the cache itself (`forward` takes it): the norm
            # is a launch of its own
            y, h = registry("rms_norm_residual", x, residual, norm.weight, norm.eps)
            return self(y, cos, sin, kv), h
        qkv, h = target.matmul_normed(x, residual, norm.weight, norm.eps)
        q, k, v = qkv.split(target.sizes, dim=-1)
        return self._attend(q, k, v, cos, sin, kv), h

    def _rope_cache(self, qkv: FusedProjections, x: torch.Tensor,
                    kv: KVContext | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The caches and slots where `qkv` may rotate and write this step's k and v itself: with the switch on,
        no QK-norm, a projection that `has_qkv_rope` and a context whose `decode_cache` takes the step."""
        if not FUSED_QKV_ROPE or self.qk_norm or kv is None or not qkv.has_qkv_rope():
            return None
        decode_cache = getattr(kv, "decode_cache", None)
        return None if decode_cache is None else decode_cache(self.layer_idx, x.shape[0] * x.shape[1])

    def _attend_rope_projected(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                               kv: KVContext | None) -> torch.Tensor | None:
        """A decode step's attention with q/k/v, rope and the cache write as one op (`_rope_cache`), then the
        context's `attend_cached`; None where `_rope_cache` is None."""
        cache = self._rope_cache(self.qkv, x, kv)
        if cache is None:
            return None
        b, t, _ = x.shape
        n, hd = b * t, self.head_dim
        q = self.qkv.qkv_rope(x.reshape(n, -1), cos.reshape(n, hd), sin.reshape(n, hd), *cache, self.n_heads,
                              self.n_kv_heads)
        o = kv.attend_cached(self.layer_idx, q)
        return self.o_proj(o.reshape(b, t, self.n_heads * hd))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv: KVContext | None) -> torch.Tensor:
        b, t, _ = q.shape
        # The rope ops take token rows [B*T, H, D]; these views keep the fused projection's strides.
        n, hd = b * t, self.head_dim
        q, k = q.view(n, self.n_heads, hd), k.view(n, self.n_kv_heads, hd)
        cos, sin = cos.reshape(n, hd), sin.reshape(n, hd)
        rotary = getattr(kv, "attend_rotary", None)
        if rotary is not None:  # a context that may rotate, store and attend in one op (a decode step)
            norm = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if self.qk_norm else None
            o = rotary(self.layer_idx, q, k, v.view(n, self.n_kv_heads, hd), cos, sin, norm)
            if o is not None:
                return self.o_proj(o.reshape(b, t, self.n_heads * hd))
        if self.qk_norm:
            q, k = registry("rope_qk_norm", q, k, cos, sin, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)
        else:
            q, k = registry("rope", q, k, cos, sin)
        q, k = q.view(b, t, self.n_heads, hd), k.view(b, t, self.n_kv_heads, hd)
        v = v.view(b, t, self.n_kv_heads, hd)
        o = causal_attention(q, k, v) if kv is None else kv.attend(self.layer_idx, q, k, v)
        return self.o_proj(o.reshape(b, t, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: `down(silu(gate(x)) * up(x))`; `fuse_projections` may set `gate_up` (one GEMM for both).

    With gate/up fused, a fused projection that has `swiglu(x)` (int4 AWQ) returns silu_mul(gate, up) from one
    op, whose decode GEMV stores it: one launch fewer (with fused norms on, its norm stays a launch of its own),
    and the down projection is called as a module. Otherwise a down projection that offers `forward_gated(gu)`
    (the quantized linears; a plain one once `route_decode_linears` has run) takes the fused output as it is
    and applies silu_mul itself, which its decode GEMVs do while loading x: one launch fewer too. Not past a
    forward hook on the down projection, which must see silu_mul's output."""

    gate_up: FusedProjections | None = None

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None and self.gate_up.active(self.gate_proj, self.up_proj):
            if FUSED_SWIGLU and self.gate_up.has_swiglu():
                return self.down_proj(self.gate_up.swiglu(x))
            return self._down_fused(self.gate_up.matmul(x))
        return self._down(self.gate_proj(x), self.up_proj(x))

    def forward_normed(self, x: torch.Tensor, residual: torch.Tensor,
                       norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """`(self(y), h)` for `y, h = rms_norm_residual(x, residual)` under `norm`'s weight: with gate/up fused,
        the norm goes to the fused projection (`matmul_normed`: one launch at a decode step)."""
        target = _norm_target(self, self.gate_up, self.gate_proj, self.up_proj)
        if target is None or (FUSED_SWIGLU and target.has_swiglu()):
            # no fused projection, or one that stores silu_mul (`forward` takes it): the norm is a launch
            y, h = registry("rms_norm_residual", x, residual, norm.weight, norm.eps)
            return self(y), h
        gu, h = target.matmul_normed(x, residual, norm.weight, norm.eps)
        return self._down_fused(gu), h

    def _down_fused(self, gu: torch.Tensor) -> torch.Tensor:
        down = self.down_proj
        gated = getattr(down, "forward_gated", None)
        if gated is not None and not (down._forward_hooks or down._forward_pre_hooks):
            return gated(gu)
        gate, up = gu.split(self.gate_up.sizes, dim=-1)
        return self._down(gate, up)

    def _down(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(gate, up))


class DecoderLayer(nn.Module):
    """Pre-norm block: `h = x + attn(norm(x)); out = h + mlp(norm(h))`, the add and the second norm
    in one registry op (`rms_norm_residual`), or inside the fused gate/up projection where it runs as one
    launch (`MLP.forward_normed`; likewise the first norm, for a chained block, in q/k/v's).

    Inference may chain blocks without materialising their outputs: with `defer_add` a block returns
    `(mlp_out, h)`, whose sum is its output, and the next block takes that pair as `(x, residual)`, so
    the sum runs inside its first norm (`rms_norm_residual`) instead of in a launch of its own. The
    values are the same: the fused op rounds the sum to the input dtype before normalising, as the add
    would."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVContext | None = None,
                residual: torch.Tensor | None = None,
                defer_add: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        first = self.input_layernorm
        if residual is None:
            h_in, attn = x, self.self_attn(first(x), cos, sin, kv)
        else:  # the previous block's deferred add: its output is x + residual
            attn, h_in = self.self_attn.forward_normed(x, residual, first, cos, sin, kv)
        out, h = self.mlp.forward_normed(attn, h_in, self.post_attention_layernorm)
        return (out, h) if defer_add else h + out
