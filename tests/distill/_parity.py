"""Shared by the ZeRO-3 tests and their worker processes: a small model, its data, one training run."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tessera.model import Transformer
from tessera.specs import ModelConfig

CFG = ModelConfig(vocab_size=96, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32,
                  tie_embeddings=True)
SEQ, ROWS_PER_MICRO, ACCUM, STEPS, LR, MAX_NORM = 12, 2, 2, 10, 3e-3, 0.5


def make_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(CFG)


def batch(step: int, world: int) -> torch.Tensor:
    """The global batch of `step`: world * ACCUM * ROWS_PER_MICRO rows."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, CFG.vocab_size, (world * ACCUM * ROWS_PER_MICRO, SEQ + 1), generator=g)


def micro(ids: torch.Tensor, rank: int, world: int, m: int) -> torch.Tensor:
    """Rank `rank`'s micro-batch `m` of a global batch."""
    start = (m * world + rank) * ROWS_PER_MICRO
    return ids[start:start + ROWS_PER_MICRO]


def lm_loss(model: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
    logits = model(rows[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1))


def reference_run(world: int, adamw: bool = True) -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    """Single process, torch.optim.Adam(W) on the whole global batch: losses and parameters after each step.

    The batch gradient is summed from the same micro-batch gradients in the same order as the sharded run
    (per micro-batch over ranks in rank order, divided by the world size, then over micro-batches): Adam
    divides by sqrt(v), so an element whose gradient is near zero would turn last-bit differences of a
    differently ordered sum into visible update differences. Scaling by 1/world and 1/ACCUM (powers of two)
    is exact."""
    model = make_model()
    cls = torch.optim.AdamW if adamw else torch.optim.Adam
    opt = cls(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
    params_list = list(model.parameters())
    losses, params = [], []
    for step in range(STEPS):
        ids, total = batch(step, world), 0.0
        for m in range(ACCUM):
            summed = None
            for rank in range(world):
                loss = lm_loss(model, micro(ids, rank, world, m)) / ACCUM
                grads = torch.autograd.grad(loss, params_list)
                summed = grads if summed is None else [a + b for a, b in zip(summed, grads)]
                total += loss.item() / world
            for p, g in zip(params_list, summed):
                p.grad = g / world if p.grad is None else p.grad + g / world
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        opt.step()
        opt.zero_grad()
        losses.append(total)
        params.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return losses, params
