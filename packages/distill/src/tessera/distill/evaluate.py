"""Perplexity by the shared corpora's protocol: the whole file tokenized once, scored in non-overlapping
windows of the model's context, every token but the first predicted exactly once (context resets at each
window boundary), token-level mean negative log-likelihood."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tessera.model.tokenizer import Tokenizer
from tessera.model.transformer import Transformer


@torch.no_grad()
def perplexity(model: Transformer, tokens: torch.Tensor, window: int, *, batch_size: int = 8,
               dtype: torch.dtype | None = None, progress: bool = False) -> dict[str, float]:
    """{"ppl", "nll", "tokens", "window"} of `model` on the int64 vector `tokens`. Inputs are
    `tokens[i*window : (i+1)*window]`, labels the same shifted by one; the last window may be shorter."""
    device = next(model.parameters()).device
    n = tokens.numel() - 1
    starts = list(range(0, n, window))
    nll, count = 0.0, 0
    batches = [starts[i:i + batch_size] for i in range(0, len(starts), batch_size)]
    for group in tqdm(batches, desc="perplexity", disable=not progress):
        full = [s for s in group if s + window <= n]
        rows = [(tokens[s:s + window], tokens[s + 1:s + window + 1]) for s in full]
        rows += [(tokens[s:n], tokens[s + 1:n + 1]) for s in group if s + window > n]
        for length in sorted({len(x) for x, _ in rows}):
            xs = torch.stack([x for x, _ in rows if len(x) == length]).to(device)
            ys = torch.stack([y for x, y in rows if len(x) == length]).to(device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(xs)
            nll += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ys.reshape(-1),
                                   reduction="sum").item()
            count += ys.numel()
    mean = nll / max(count, 1)
    return {"ppl": math.exp(mean), "nll": mean, "tokens": count, "window": window}


def file_perplexity(model: Transformer, tokenizer: Tokenizer, text: str, window: int, **kw) -> dict[str, float]:
    """`perplexity` of the whole `text`, tokenized once."""
    tokens = torch.tensor(tokenizer.encode(text), dtype=torch.int64)
    return perplexity(model, tokens, window, **kw)
