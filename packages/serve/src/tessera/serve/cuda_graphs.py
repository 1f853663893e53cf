"""CUDA graphs for decode steps: one graph per bucketed batch size, all reading the same static
input buffers, captured largest first so they share one memory pool.

A step of B sequences replays the graph of the smallest bucket >= B. Lanes B.. are padding: token 0
at position 0, slot -1 (nothing written), a block table pointing only at the reserved null block and
a context of one token, so their attention reads the null block and their logits are discarded.

With `tokens_per_seq` Q > 1 the graphs take up to Q new tokens per sequence (a speculative round's
verification: the last token and k drafts; a draft model catching up on one or two tokens), through
the paged prefill kernel with every sequence's query padded to Q. A padding token writes nothing
(slot -1) and sits after the sequence's real tokens, so causality keeps it out of their attention;
the sequence's context is given as start + Q, which only adds those masked positions (their keys
come from whatever the static block table holds there, the null block or a stale entry: finite
values that the causal mask gives zero weight).
"""

from __future__ import annotations

import bisect
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from tessera.attn import PagedAttentionMetadata, PagedKVCache, PagedKVContext
from tessera.model import Transformer


class DecodeGraphs:
    def __init__(self, model: Transformer, cache: PagedKVCache, null_block: int, max_blocks_per_seq: int,
                 batch_sizes: Sequence[int], tokens_per_seq: int = 1, max_context: int | None = None) -> None:
        if tokens_per_seq < 1:
            raise ValueError(f"tokens_per_seq={tokens_per_seq} must be >= 1")
        self.sizes = sorted(set(batch_sizes))
        self.max_batch_size = self.sizes[-1]
        self.null_block = null_block
        self.q = q = tokens_per_seq
        #: The longest context a step may reach (padding included): the static block tables' width in
        #: tokens, or the caller's limit (the engine's max_model_len: positions past it have no rotary angle).
        self.max_context = min(max_blocks_per_seq * cache.spec.block_size, max_context or 1 << 62)
        dev, n = cache.device, self.max_batch_size
        self.ids = torch.zeros(1, n * q, dtype=torch.int64, device=dev)
        self.pos = torch.arange(n * q, device=dev).remainder(q)[None]
        self.slots = torch.full((n * q,), -1, dtype=torch.int64, device=dev)
        self.tables = torch.full((n, max_blocks_per_seq), null_block, dtype=torch.int32, device=dev)
        self.ctx = torch.full((n,), q, dtype=torch.int32, device=dev)
        self.cu = torch.arange(n + 1, dtype=torch.int32, device=dev) * q
        self.logits = torch.empty(n * q, model.config.vocab_size, dtype=model.lm_head.weight.dtype, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        pool = None
        with torch.inference_mode():
            for bs in reversed(self.sizes):
                meta = PagedAttentionMetadata(self.slots[:bs * q], self.tables[:bs], self.ctx[:bs], self.cu[:bs + 1],
                                              max_seqlen_q=q, decode_only=q == 1)
                kv = PagedKVContext(cache, meta)

                def run(bs: int = bs, kv: PagedKVContext = kv) -> None:
                    h, _ = model.hidden_states(self.ids[:, :bs * q], self.pos[:, :bs * q], kv)
                    self.logits[:bs * q] = model.lm_head(h[0])

                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    run()  # warm-up: lazy initialisation and autotuning must not happen during capture
                    check_capturable(run)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    run()
                pool = graph.pool()
                self.graphs[bs] = graph
        torch.cuda.synchronize()

    def fits(self, tokens: Sequence[Sequence[int]], starts: Sequence[int]) -> bool:
        """Whether a step of these new tokens (per sequence) and start positions can replay a graph."""
        return (len(tokens) <= self.max_batch_size and all(len(t) <= self.q for t in tokens)
                and all(s + self.q <= self.max_context for s in starts))

    def run_tokens(self, tokens: Sequence[Sequence[int]], starts: Sequence[int], slots: Sequence[Sequence[int]],
                   tables: Sequence[Sequence[int]]) -> torch.Tensor:
        """Logits [sum of len(tokens[i]), vocab], in the order of the tokens, for up to Q new tokens per
        sequence (see `fits`); sequence i's tokens sit at positions starts[i], starts[i] + 1, ..."""
        b, q = len(tokens), self.q
        bs = self.sizes[bisect.bisect_left(self.sizes, b)]
        width = max(len(t) for t in tables)
        ids = [0] * (b * q)
        slot_row = [-1] * (b * q)
        rows = []
        for i, (toks, sl) in enumerate(zip(tokens, slots)):
            ids[i * q:i * q + len(toks)] = toks
            slot_row[i * q:i * q + len(toks)] = sl
            rows += range(i * q, i * q + len(toks))
        host, host32 = host_inputs(ids, slot_row, [s + j for s in starts for j in range(q)], [s + q for s in starts],
                                   tables, width, self.null_block)
        self.ids[0, :b * q].copy_(host[0], non_blocking=True)
        self.slots[:b * q].copy_(host[1], non_blocking=True)
        self.pos[0, :b * q].copy_(host[2], non_blocking=True)
        self.ctx[:b].copy_(host32[:b], non_blocking=True)
        self.tables[:b, :width].copy_(host32[b:].view(b, width), non_blocking=True)
        if bs > b:
            self.ids[0, b * q:bs * q] = 0
            self.pos[0, b * q:bs * q] = torch.arange(q, device=self.pos.device).repeat(bs - b)
            self.slots[b * q:bs * q] = -1
            self.ctx[b:bs] = q
            self.tables[b:bs, 0] = self.null_block
        self.graphs[bs].replay()
        return self.logits[rows] if len(rows) < bs * q else self.logits[:bs * q]

    def run(self, ids: list[int], positions: list[int], slots: list[int],
            tables: Sequence[Sequence[int]]) -> torch.Tensor:
        """Logits [B, vocab] for one decode token per sequence (B <= max_batch_size; Q == 1 graphs)."""
        b = len(ids)
        bs = self.sizes[bisect.bisect_left(self.sizes, b)]
        width = max(len(t) for t in tables)
        host, host32 = host_inputs(ids, slots, positions, [p + 1 for p in positions], tables, width, self.null_block)
        self.ids[0, :b].copy_(host[0], non_blocking=True)
        self.slots[:b].copy_(host[1], non_blocking=True)
        self.pos[0, :b].copy_(host[2], non_blocking=True)
        self.ctx[:b].copy_(host32[:b], non_blocking=True)
        self.tables[:b, :width].copy_(host32[b:].view(b, width), non_blocking=True)
        if bs > b:
            self.ids[0, b:bs] = 0
            self.pos[0, b:bs] = 0
            self.slots[b:bs] = -1
            self.ctx[b:bs] = 1
            self.tables[b:bs, 0] = self.null_block
        self.graphs[bs].replay()
        return self.logits[:b]


def host_inputs(ids: Sequence[int], slots: Sequence[int], positions: Sequence[int], context_lens: Sequence[int],
                tables: Sequence[Sequence[int]], width: int, null_block: int,
                pin: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """A replay's inputs in two host tensors: int64 [3, N] (ids, slots, positions) and int32 [B + B * width]
    (context lengths, then each block table padded to `width` with the null block). Pinned by default, so
    that copying them into the graph's buffers is asynchronous: from pageable memory the host would stage
    every copy itself."""
    host = torch.tensor([list(ids), list(slots), list(positions)], dtype=torch.int64, pin_memory=pin)
    flat = [*context_lens, *(b for t in tables for b in (*t, *[null_block] * (width - len(t))))]
    return host, torch.tensor(flat, dtype=torch.int32, pin_memory=pin)


def check_capturable(run: Callable[[], object]) -> None:
    """Run `run()` once more with host syncs raising, so that an op that cannot be captured (one that
    reads a device value on the host, e.g. a reference kernel chosen because the fast one refuses the
    shapes) is named with where it sits, instead of the capture failing with a generic error."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    except RuntimeError as exc:
        frames = traceback.extract_tb(exc.__traceback__)[-3:]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
        raise RuntimeError(f"{str(exc).splitlines()[0]} at {where}") from exc
    finally:
        torch.cuda.set_sync_debug_mode("default")
