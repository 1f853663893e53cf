"""Interpretability: activation capture, a logit lens, attention patterns and an induction-head score.

    with capture(model, ["model.layers.0.mlp", "model.norm"]) as acts:
        model(ids)
    lens = logit_lens(model, ids)                    # [n_layers, B, T, vocab] log-probabilities
    scores = induction_scores(model, seq_len=16)     # [n_layers, n_heads]

The attention op is fused (it never materialises the probabilities), so `attention_patterns` captures
each layer's RoPE'd, QK-normed queries and keys at the model's `KVContext` seam, lets the model's own
attention compute the output, and recomputes `softmax(q k^T / sqrt(D))` from what it captured.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from tessera.attn import causal_attention
from tessera.model.transformer import Transformer


@contextmanager
def capture(model: nn.Module, names: Sequence[str], *, detach: bool = True) -> Iterator[dict[str, Any]]:
    """Record the output of each named submodule (`model.named_modules()` names) during the forwards
    run inside the block; the dict maps name -> output of that module's last call (a tensor, or
    whatever the module returns). Hooks are removed on exit. Raises KeyError naming unknown modules."""
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise KeyError(f"no module named {unknown} in {type(model).__name__}")
    store: dict[str, Any] = {}

    def hook_for(name: str) -> Callable[[nn.Module, tuple, Any], None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            store[name] = output.detach() if detach and isinstance(output, torch.Tensor) else output
        return hook

    handles = [modules[n].register_forward_hook(hook_for(n)) for n in names]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def logit_lens(model: Transformer, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Per-layer next-token log-probabilities `[n_layers, B, T, vocab]` float32: the output of block
    `i` read out through the final norm and `lm_head`. Row `n_layers - 1` is the model's own output."""
    layers = range(model.config.n_layers)
    _, blocks = model.hidden_states(input_ids, positions, collect=layers)
    return torch.stack([model.lm_head(model.model.norm(blocks[i])).float().log_softmax(-1) for i in layers])


class _QKCapture:
    """A `KVContext` that keeps each layer's q and k and attends exactly as the model does without one."""

    def __init__(self) -> None:
        self.q: dict[int, torch.Tensor] = {}
        self.k: dict[int, torch.Tensor] = {}

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.q[layer], self.k[layer] = q.detach(), k.detach()
        return causal_attention(q, k, v)


def causal_attention_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Causal attention probabilities `[B, Hq, T, T]` float32 from q `[B, T, Hq, D]` and k `[B, T, Hkv, D]`
    (query head h reads kv head `h // (Hq // Hkv)`, scale `D ** -0.5`)."""
    t, hq, d = q.shape[1], q.shape[2], q.shape[3]
    k = k.repeat_interleave(hq // k.shape[2], dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * d**-0.5
    future = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    return scores.masked_fill(future, float("-inf")).softmax(-1)


@torch.no_grad()
def attention_patterns(model: Transformer, input_ids: torch.Tensor,
                       positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(logits, probs)`: the model's logits `[B, T, vocab]` and every layer's attention probabilities
    `probs` `[n_layers, B, n_heads, T, T]` float32 (row = query, column = key, causal)."""
    qk = _QKCapture()
    logits = model(input_ids, positions, kv=qk)
    probs = torch.stack([causal_attention_probs(qk.q[i], qk.k[i]) for i in range(model.config.n_layers)])
    return logits, probs


def repeated_random_tokens(batch: int, seq_len: int, vocab_size: int, *, generator: torch.Generator | None = None,
                           device: torch.device | str = "cpu") -> torch.Tensor:
    """`[batch, 2 * seq_len]` int64: `seq_len` distinct random tokens, then the same tokens again (so each
    token of the second half has exactly one earlier occurrence). Raises ValueError if
    `seq_len > vocab_size`."""
    if seq_len > vocab_size:
        raise ValueError(f"seq_len ({seq_len}) distinct tokens cannot come from vocab_size={vocab_size}")
    keys = torch.rand(batch, vocab_size, generator=generator)
    first = keys.argsort(dim=1)[:, :seq_len]
    return torch.cat([first, first], dim=1).to(device)


def induction_score_from_probs(probs: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Mean attention from each second-half query (position `seq_len + i`, token `r_i`) to the key just
    after the token's first occurrence (position `i + 1`), averaged over the batch:
    `probs` `[..., B, H, 2L, 2L]` -> `[..., H]`."""
    stripe = probs.diagonal(offset=1 - seq_len, dim1=-2, dim2=-1)  # entries (q, q - L + 1) for q >= L - 1
    return stripe[..., 1:].mean(dim=(-1, -3))  # drop q = L - 1, which is still in the first half


@torch.no_grad()
def induction_scores(model: Transformer, *, seq_len: int = 16, batch: int = 16,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Induction score `[n_layers, n_heads]` in [0, 1] of every head on `batch` repeated random
    sequences (`repeated_random_tokens`): ~1 for a head that attends to the token after the previous
    occurrence of the current token, ~1/position for a head that attends uniformly."""
    device = next(model.parameters()).device
    ids = repeated_random_tokens(batch, seq_len, model.config.vocab_size, generator=generator, device=device)
    _, probs = attention_patterns(model, ids)
    return induction_score_from_probs(probs, seq_len)
