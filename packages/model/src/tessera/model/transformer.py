"""`Transformer`: the decoder-only language model (RMSNorm, RoPE, GQA, SwiGLU, optional QK-norm,
optional attention biases, tied or untied embeddings), with Hugging Face Llama/Qwen parameter names.

    model = Transformer(ModelConfig.preset("tiny-student"))
    logits = model(input_ids)                              # [B, T, vocab], causal within each row
    logits = model(ids, positions=pos, kv=cache)           # cached prefill / decode through a KVContext
    h, blocks = model.hidden_states(ids, collect=(0, 1))   # final-normed hidden + chosen block outputs
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules import module as module_hooks

from tessera.attn import KVContext, RotaryEmbedding
from tessera.kernels import registry
from tessera.model import persistent
from tessera.model.layers import DecoderLayer, RMSNorm
from tessera.specs import ModelConfig


class DecoderStack(nn.Module):
    """Embeddings, decoder layers and the final norm (HF's `LlamaModel`)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim or cfg.d_model // cfg.n_heads, cfg.rope_theta,
                                          cfg.rope_scaling)


class Transformer(nn.Module):
    """Decoder-only transformer built from a `ModelConfig`; weights initialised N(0, init_std),
    biases zero, norms one. `state_dict()` keys equal those of HF `LlamaForCausalLM` /
    `Qwen2ForCausalLM` / `Qwen3ForCausalLM` for the same shape (`lm_head.weight` is the embedding
    tensor itself when `tie_embeddings`)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = DecoderStack(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_module)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _init_module(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                kv: KVContext | None = None) -> torch.Tensor:
        """Logits `[B, T, vocab]` (the model's dtype) for `input_ids` `[B, T]` int64.

        `positions` `[B, T]` int64 (default `0..T-1` in every row) index RoPE. With `kv=None`
        attention is causal within each row; otherwise layer `i` calls `kv.attend(i, q, k, v)`, or first
        `kv.attend_rotary(i, q, k, v, cos, sin, norm)` with q and k unrotated where the context has that
        method (it returns None for a step it leaves to `attend`).
        """
        h, _ = self.hidden_states(input_ids, positions, kv)
        return self.lm_head(h)

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                      kv: KVContext | None = None,
                      collect: Sequence[int] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """`(h, collected)`: `h` `[B, T, d_model]` is the final-normed hidden state (`lm_head(h)` gives
        the logits); `collected[i]` is the output of block `i` for each `i` in `collect`.

        Raises IndexError for a block index outside `[0, n_layers)` and ValueError for a
        `positions` shape that differs from `input_ids`'.
        """
        n_layers = self.config.n_layers
        wanted = set(collect)
        bad = sorted(i for i in wanted if not 0 <= i < n_layers)
        if bad:
            raise IndexError(f"collect: block indices {bad} outside [0, n_layers={n_layers})")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        if positions is None:
            b, t = input_ids.shape
            positions = torch.arange(t, device=input_ids.device).expand(b, t)
        elif positions.shape != input_ids.shape:
            raise ValueError(f"positions shape {tuple(positions.shape)} != input_ids shape {tuple(input_ids.shape)}")
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(positions, x.dtype)
        if kv is not None and not wanted and persistent.PERSISTENT_DECODE and self._adds_deferrable():
            h = persistent.hidden(self, input_ids, x, cos, sin, kv)  # None where it cannot take the step
            if h is not None:
                return h, {}
        if not wanted and self.model.layers and self._adds_deferrable():
            # Each block's residual add runs inside the next norm (`DecoderLayer`): one launch fewer a block.
            out, h = x, None
            for layer in self.model.layers:
                out, h = layer(out, cos, sin, kv, residual=h, defer_add=True)
            final = self.model.norm
            return registry("rms_norm_residual", out, h, final.weight, final.eps)[0], {}
        collected: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, kv)
            if i in wanted:
                collected[i] = x
        return self.model.norm(x), collected

    def _adds_deferrable(self) -> bool:
        """Whether `hidden_states` may defer the blocks' residual adds: no autograd (the sharded trainers'
        hooks and the backward see the plain block outputs), and no forward hooks on a block, on a norm
        the deferral bypasses, or on every module (hooks observe block outputs and norm calls)."""
        if torch.is_grad_enabled():
            return False
        if module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks:
            return False
        watched = [self.model.norm, *self.model.layers, *(layer.input_layernorm for layer in self.model.layers)]
        return not any(m._forward_hooks or m._forward_pre_hooks for m in watched)
