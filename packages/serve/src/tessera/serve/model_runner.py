"""Runs one model over one step's packed tokens against its paged KV cache.

The cache holds `num_blocks` blocks for the block manager plus one reserved block that padding lanes
point at, so nothing a padding lane reads or computes touches a real sequence (their slot is -1: they
write nothing). Only the rows that are sampled go through `lm_head`. Decode-only steps replay a CUDA
graph captured at the smallest bucketed batch size that fits (see `cuda_graphs.py`); with
`graph_tokens_per_seq` Q > 1, steps of at most Q new tokens a sequence (speculative verification, a
draft model's catch-up) replay graphs of their own, which take every row through `lm_head`.
A draft model's runner also holds a `DraftChain` (`draft_chain_steps` > 0): a greedy round's k draft
tokens in one replay, left on the device for the target's verification to read (`StepInput.device_tokens`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tessera.attn import PagedAttentionMetadata, PagedKVCache, PagedKVContext
from tessera.kernels import static_weights
from tessera.model import Transformer
from tessera.model.fusion import fuse_projections, route_decode_linears
from tessera.serve.cuda_graphs import DecodeGraphs, DraftChain
from tessera.serve.transfer import take_rows, upload
from tessera.specs import KVCacheHandle, KVCacheSpec, dtype_name

log = logging.getLogger(__name__)


def kv_cache_spec(model: Transformer, num_blocks: int, block_size: int, dtype: torch.dtype) -> KVCacheSpec:
    cfg = model.config
    head_dim = cfg.head_dim or cfg.d_model // cfg.n_heads
    return KVCacheSpec(n_layers=cfg.n_layers, n_kv_heads=cfg.n_kv_heads, head_dim=head_dim,
                       block_size=block_size, num_blocks=num_blocks, dtype=dtype_name(dtype))


@dataclass
class StepInput:
    """Sequence i feeds `tokens[i]` at positions `starts[i]...`; its handle has slots for them.
    `logit_rows` index the packed token list: the rows whose logits are returned, in that order."""

    handles: Sequence[KVCacheHandle]
    tokens: Sequence[Sequence[int]]
    starts: Sequence[int]
    logit_rows: Sequence[int]
    #: [B, >= max(len(tokens[i])) - 1] int64 on the device, or None: tokens[i][1:] are placeholders
    #: whose values are device_tokens[i, :len(tokens[i]) - 1] (draft tokens the host has not read).
    device_tokens: torch.Tensor | None = None
    #: [B] int64 on the device, or None: a decode step (one token a sequence) whose tokens are placeholders
    #: for device_first (the tokens the previous step drew, which the host has not read: overlapped decode).
    device_first: torch.Tensor | None = None

    @property
    def decode_only(self) -> bool:
        return all(len(t) == 1 for t in self.tokens)


#: Largest batch the multi-token graphs are captured for: speculative decoding serves small batches,
#: and the graphs' logits buffer holds batch x tokens_per_seq rows of the vocabulary.
MULTI_TOKEN_GRAPH_MAX_BATCH = 32


class ModelRunner:
    def __init__(self, model: Transformer, *, num_blocks: int, block_size: int, max_model_len: int,
                 dtype: torch.dtype, device: torch.device, cuda_graph_batch_sizes: Sequence[int] = (),
                 enforce_eager: bool = True, graph_tokens_per_seq: int = 1, draft_chain_steps: int = 0) -> None:
        self.model = model.eval()
        fuse_projections(self.model)  # before graph capture: q/k/v and gate/up as one GEMM each
        route_decode_linears(self.model)  # decode-shaped projections: the faster of cuBLAS and a GEMV
        self.device = device
        self.block_size = block_size
        self.null_block = num_blocks
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.cache = PagedKVCache(kv_cache_spec(model, num_blocks + 1, block_size, dtype), device)
        self.graphs: DecodeGraphs | None = None
        #: Graphs of up to `graph_tokens_per_seq` new tokens a sequence (speculative verification and
        #: draft catch-up), at batch sizes up to MULTI_TOKEN_GRAPH_MAX_BATCH.
        self.multi_graphs: DecodeGraphs | None = None
        #: A greedy draft round in one replay (or one eager pass): see `DraftChain`.
        self.chain: DraftChain | None = None
        self.graph_error: str | None = None
        small = [b for b in cuda_graph_batch_sizes if b <= MULTI_TOKEN_GRAPH_MAX_BATCH]
        if device.type == "cuda" and not enforce_eager and cuda_graph_batch_sizes:
            log.info("capturing CUDA graphs: decode at batch sizes %s%s%s", sorted(set(cuda_graph_batch_sizes)),
                     f", up to {graph_tokens_per_seq} tokens a sequence at {small}" if graph_tokens_per_seq > 1 else "",
                     f", a {draft_chain_steps}-step draft chain at {small}" if draft_chain_steps else "")
            start = time.perf_counter()
            try:
                with static_weights():  # see `forward`
                    self.graphs = DecodeGraphs(self.model, self.cache, self.null_block, self.max_blocks_per_seq,
                                               cuda_graph_batch_sizes)
                    if graph_tokens_per_seq > 1 and small:
                        self.multi_graphs = DecodeGraphs(self.model, self.cache, self.null_block,
                                                         self.max_blocks_per_seq, small,
                                                         tokens_per_seq=graph_tokens_per_seq,
                                                         max_context=max_model_len)
                    if draft_chain_steps and small:
                        self.chain = DraftChain(self.model, self.cache, self.null_block, self.max_blocks_per_seq,
                                                small, draft_chain_steps, max_context=max_model_len)
                    log.info("CUDA graphs captured in %.1f s", time.perf_counter() - start)
            except RuntimeError as exc:  # a kernel that syncs with the host cannot be captured
                self.graph_error = f"{type(exc).__name__}: {exc}"
                log.warning("CUDA graphs disabled, decoding eagerly: %s", self.graph_error)
                self.graphs = self.multi_graphs = self.chain = None
        if draft_chain_steps and self.chain is None:
            self.chain = DraftChain(self.model, self.cache, self.null_block, self.max_blocks_per_seq,
                                    small or [MULTI_TOKEN_GRAPH_MAX_BATCH], draft_chain_steps,
                                    max_context=max_model_len, graphs=False)

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @torch.inference_mode()
    def forward(self, step: StepInput) -> torch.Tensor:
        """Logits [len(step.logit_rows), vocab] in the model's dtype. Eager forwards (and graph captures
        and the draft chain) run under `static_weights()`: the model's own weights are all its GEMVs
        multiply by, so under PDL mode 3 they load their first weight tile while the previous kernel
        finishes. A graph replay launches nothing and keeps what was captured."""
        if self.graphs is not None and step.decode_only and len(step.tokens) <= self.graphs.max_batch_size:
            ids = [t[0] for t in step.tokens]
            slots = [h.slot(p) for h, p in zip(step.handles, step.starts)]
            tables = [h.block_ids for h in step.handles]
            return take_rows(self.graphs.run(ids, list(step.starts), slots, tables, device_ids=step.device_first),
                             step.logit_rows)
        if (self.multi_graphs is not None and step.device_first is None
                and self.multi_graphs.fits(step.tokens, step.starts)):
            slots = [[h.slot(p) for p in range(s, s + len(t))]
                     for h, t, s in zip(step.handles, step.tokens, step.starts)]
            tables = [h.block_ids for h in step.handles]
            return self.multi_graphs.run_tokens(step.tokens, step.starts, slots, tables,
                                                device_tokens=step.device_tokens, logit_rows=step.logit_rows)
        ids, pos, meta = self._prepare(step)
        if step.device_first is not None:
            ids[0, :len(step.tokens)] = step.device_first  # a decode step: row i is sequence i's token
        if step.device_tokens is not None:
            at, seq, col = [], [], []
            row = 0
            for i, t in enumerate(step.tokens):
                at += range(row + 1, row + len(t))
                seq += [i] * (len(t) - 1)
                col += range(len(t) - 1)
                row += len(t)
            at_t, seq_t, col_t = upload([at, seq, col], torch.int64, self.device)
            ids[0, at_t] = step.device_tokens[seq_t, col_t]
        with static_weights():
            h, _ = self.model.hidden_states(ids, pos, PagedKVContext(self.cache, meta))
            return self.model.lm_head(take_rows(h[0], step.logit_rows))

    def draft_chain(self, handles: Sequence[KVCacheHandle], catch_up: Sequence[Sequence[int]], starts: Sequence[int],
                    lookaheads: Sequence[int]) -> torch.Tensor | None:
        """A greedy draft round through `self.chain`: tokens [k, B] on the device (see `DraftChain.run`),
        or None when the chain cannot take it (no chain, too many sequences, a longer catch-up)."""
        chain = self.chain
        if chain is None or not chain.fits(catch_up, starts, lookaheads):
            return None
        slots = [[h.slot(p) for p in range(s, s + len(t) + max(a - 1, 0))]
                 for h, t, s, a in zip(handles, catch_up, starts, lookaheads)]
        with static_weights():
            return chain.run(catch_up, starts, slots, lookaheads, [h.block_ids for h in handles])

    def _prepare(self, step: StepInput) -> tuple[torch.Tensor, torch.Tensor, PagedAttentionMetadata]:
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        cu = [0]
        ctx: list[int] = []
        for h, toks, start in zip(step.handles, step.tokens, step.starts):
            end = start + len(toks)
            if end > h.num_tokens:
                raise ValueError(f"seq {h.seq_id}: tokens up to position {end} but the handle has {h.num_tokens} slots")
            ids += toks
            pos += range(start, end)
            slots += (h.slot(p) for p in range(start, end))
            cu.append(cu[-1] + len(toks))
            ctx.append(end)
        width = max(-(-c // self.block_size) for c in ctx)
        tables = [b for h in step.handles
                  for b in (*h.block_ids[:width], *[self.null_block] * (width - min(width, len(h.block_ids))))]
        # Two host-to-device copies in all (pinned and asynchronous on CUDA): the int64 inputs, the int32 ones.
        ids_t, pos_t, slots_t = upload([ids, pos, slots], torch.int64, self.device)
        ctx_t, cu_t, tables_t = upload([ctx, cu, tables], torch.int32, self.device)
        meta = PagedAttentionMetadata(
            slot_mapping=slots_t, block_tables=tables_t.view(len(step.handles), width), context_lens=ctx_t,
            cu_seqlens_q=cu_t, max_seqlen_q=max(len(x) for x in step.tokens), decode_only=step.decode_only)
        return ids_t[None], pos_t[None], meta

    @torch.inference_mode()
    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Apply copy-on-write pairs from the block manager: block dst := block src, every layer."""
        if not pairs:
            return
        src = torch.tensor([p[0] for p in pairs], device=self.device)
        dst = torch.tensor([p[1] for p in pairs], device=self.device)
        for cache in (*self.cache.k, *self.cache.v):
            cache[dst] = cache[src]
