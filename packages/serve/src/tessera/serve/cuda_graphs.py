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

`DraftChain` is a greedy draft model's whole proposal in one replay: the catch-up step and k - 1
decode steps, each fed the previous step's argmax on the device (see its docstring).
"""

from __future__ import annotations

import bisect
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from tessera.attn import PagedAttentionMetadata, PagedKVCache, PagedKVContext
from tessera.model import Transformer
from tessera.serve.transfer import take_rows


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

                self.graphs[bs], pool = capture(run, pool)
        torch.cuda.synchronize()

    def fits(self, tokens: Sequence[Sequence[int]], starts: Sequence[int]) -> bool:
        """Whether a step of these new tokens (per sequence) and start positions can replay a graph."""
        return (len(tokens) <= self.max_batch_size and all(len(t) <= self.q for t in tokens)
                and all(s + self.q <= self.max_context for s in starts))

    def run_tokens(self, tokens: Sequence[Sequence[int]], starts: Sequence[int], slots: Sequence[Sequence[int]],
                   tables: Sequence[Sequence[int]], device_tokens: torch.Tensor | None = None,
                   logit_rows: Sequence[int] | None = None) -> torch.Tensor:
        """Logits [sum of len(tokens[i]), vocab], in the order of the tokens, for up to Q new tokens per
        sequence (see `fits`); sequence i's tokens sit at positions starts[i], starts[i] + 1, ...
        `logit_rows` (indices into the packed tokens) selects and orders the rows returned, in one gather.
        With `device_tokens` [B, >= 1] on the device, tokens[i][1:] are placeholders for
        device_tokens[i, :len(tokens[i]) - 1] (copied on the device; what lands past a sequence's
        tokens sits on padding rows, which nothing reads)."""
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
        if device_tokens is not None:
            m = min(q - 1, device_tokens.shape[1])
            self.ids[0, :b * q].view(b, q)[:, 1:1 + m].copy_(device_tokens[:, :m])
        if bs > b:
            self.ids[0, b * q:bs * q] = 0
            self.pos[0, b * q:bs * q] = torch.arange(q, device=self.pos.device).repeat(bs - b)
            self.slots[b * q:bs * q] = -1
            self.ctx[b:bs] = q
            self.tables[b:bs, 0] = self.null_block
        self.graphs[bs].replay()
        if logit_rows is not None:
            rows = [rows[r] for r in logit_rows]
        return take_rows(self.logits[:bs * q], rows)

    def run(self, ids: list[int], positions: list[int], slots: list[int], tables: Sequence[Sequence[int]],
            device_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, vocab] for one decode token per sequence (B <= max_batch_size; Q == 1 graphs). With
        `device_ids` [B] int64 on the device, `ids` are placeholders for them (copied on the device)."""
        b = len(ids)
        bs = self.sizes[bisect.bisect_left(self.sizes, b)]
        width = max(len(t) for t in tables)
        host, host32 = host_inputs(ids, slots, positions, [p + 1 for p in positions], tables, width, self.null_block)
        self.ids[0, :b].copy_(host[0], non_blocking=True)
        self.slots[:b].copy_(host[1], non_blocking=True)
        self.pos[0, :b].copy_(host[2], non_blocking=True)
        self.ctx[:b].copy_(host32[:b], non_blocking=True)
        self.tables[:b, :width].copy_(host32[b:].view(b, width), non_blocking=True)
        if device_ids is not None:
            self.ids[0, :b].copy_(device_ids)
        if bs > b:
            self.ids[0, b:bs] = 0
            self.pos[0, b:bs] = 0
            self.slots[b:bs] = -1
            self.ctx[b:bs] = 1
            self.tables[b:bs, 0] = self.null_block
        self.graphs[bs].replay()
        return self.logits[:b]


def capture(run: Callable[[], object], pool=None) -> tuple[torch.cuda.CUDAGraph, object]:
    """(graph, memory pool) of `run()` captured after a warm-up run on a side stream (lazy
    initialisation and autotuning must not happen inside a capture), sharing `pool` when given."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
        check_capturable(run)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        run()
    return graph, graph.pool()


class DraftChain:
    """A greedy draft model's k tokens for every sequence of a batch, computed without the host
    reading any of them: a catch-up step of one or two tokens a sequence (what the target emitted
    last round that the draft has not seen), whose argmax at each sequence's last token is draft 0,
    then k - 1 single-token decode steps, step j fed the argmaxes of step j - 1. The draft tokens
    stay in `out [k, B]` on the device, where the target's verification reads them, so a speculative
    round waits for the device once, after verification, instead of once a draft token.

    Every input of a round (token ids and positions, cache slots, context lengths, block tables) is
    known to the host beforehand; they go in two buffers (int64 and int32), one host-to-device copy
    each. With `graphs` the whole chain replays as one CUDA graph per bucketed batch size; without,
    it runs the same code eagerly (on CPU, and where capture failed).

    Lanes: the catch-up step gives each sequence two query rows (a second, padding row when it has
    one token: slot -1, after the real row so causality hides it, as in the multi-token graphs). A
    decode step past a sequence's own lookahead, and every step of a bucket's padding lanes, is a
    dead lane: slot -1 (writes nothing), position 0, context 1. Padding lanes' block tables point at
    the null block; a dead lane of a real sequence reads its first cached key. Their argmaxes are
    discarded.
    """

    CATCH_UP = 2  # query rows a sequence in the catch-up step

    def __init__(self, model: Transformer, cache: PagedKVCache, null_block: int, max_blocks_per_seq: int,
                 batch_sizes: Sequence[int], steps: int, max_context: int | None = None,
                 graphs: bool = True) -> None:
        if steps < 1:
            raise ValueError(f"steps={steps} must be >= 1")
        if not batch_sizes or min(batch_sizes) < 1:
            raise ValueError(f"batch_sizes={list(batch_sizes)} must be positive and not empty")
        self.model, self.cache = model, cache
        self.k = k = steps
        self.sizes = sorted(set(batch_sizes))
        self.max_batch_size = n = self.sizes[-1]
        self.null_block = null_block
        self.width = w = max_blocks_per_seq
        self.max_context = min(max_blocks_per_seq * cache.spec.block_size, max_context or 1 << 62)
        q, dev = self.CATCH_UP, cache.device
        # int64: catch-up ids, slots, positions [n * q] each; last real catch-up row [n]; positions and
        # slots of decode steps 1..k-1 [(k - 1) * n] each. int32: contexts [k * n]; block tables [n * w].
        self.sizes64 = [n * q, n * q, n * q, n, (k - 1) * n, (k - 1) * n]
        self.sizes32 = [k * n, n * w]
        self.in64 = torch.zeros(sum(self.sizes64), dtype=torch.int64, device=dev)
        self.in32 = torch.zeros(sum(self.sizes32), dtype=torch.int32, device=dev)
        ids0, slots0, pos0, self.last, pos, slots = self.in64.split(self.sizes64)
        self.ids0, self.slots0, self.pos0 = ids0[None], slots0, pos0[None]
        self.pos, self.slots = pos.view(k - 1, n), slots.view(k - 1, n)
        ctx, tables = self.in32.split(self.sizes32)
        self.ctx, self.tables = ctx.view(k, n), tables.view(n, w)
        self.cu_catch_up = torch.arange(n + 1, dtype=torch.int32, device=dev) * q
        self.cu_decode = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.out = torch.zeros(k, n, dtype=torch.int64, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if graphs:
            pool = None
            with torch.inference_mode():
                for bs in reversed(self.sizes):
                    self.graphs[bs], pool = capture(lambda bs=bs: self._forward(bs), pool)
            torch.cuda.synchronize()

    def _forward(self, bs: int) -> None:
        model, q = self.model, self.CATCH_UP
        meta = PagedAttentionMetadata(self.slots0[:bs * q], self.tables[:bs], self.ctx[0, :bs],
                                      self.cu_catch_up[:bs + 1], max_seqlen_q=q, decode_only=False)
        h, _ = model.hidden_states(self.ids0[:, :bs * q], self.pos0[:, :bs * q], PagedKVContext(self.cache, meta))
        tok = model.lm_head(h[0].index_select(0, self.last[:bs])).argmax(-1)
        self.out[0, :bs] = tok
        for j in range(1, self.k):
            meta = PagedAttentionMetadata(self.slots[j - 1, :bs], self.tables[:bs], self.ctx[j, :bs],
                                          self.cu_decode[:bs + 1], max_seqlen_q=1, decode_only=True)
            h, _ = model.hidden_states(tok[None], self.pos[j - 1:j, :bs], PagedKVContext(self.cache, meta))
            tok = model.lm_head(h[0]).argmax(-1)
            self.out[j, :bs] = tok

    def fits(self, catch_up: Sequence[Sequence[int]], starts: Sequence[int], lookaheads: Sequence[int]) -> bool:
        """Whether a round of these catch-up tokens (per sequence), start positions and lookaheads can run."""
        return (0 < len(catch_up) <= self.max_batch_size and all(1 <= len(t) <= self.CATCH_UP for t in catch_up)
                and all(0 <= a <= self.k for a in lookaheads)
                and all(s + self.CATCH_UP <= self.max_context and s + len(t) + max(a - 1, 0) <= self.max_context
                        for t, s, a in zip(catch_up, starts, lookaheads)))

    def run(self, catch_up: Sequence[Sequence[int]], starts: Sequence[int], slots: Sequence[Sequence[int]],
            lookaheads: Sequence[int], tables: Sequence[Sequence[int]]) -> torch.Tensor:
        """Draft tokens [k, B] on the device (column i: sequence i's; rows past lookaheads[i] are
        meaningless). Sequence i feeds `catch_up[i]` (one or two tokens) at positions starts[i]...,
        then its drafts 0..lookaheads[i] - 2 at the positions after them; `slots[i]` holds the cache
        slot of each of those positions, in order. See `fits` for what a round may hold."""
        b, q, k, n, w = len(catch_up), self.CATCH_UP, self.k, self.max_batch_size, self.width
        bs = self.sizes[bisect.bisect_left(self.sizes, b)] if self.graphs else b
        ids0, slots0 = [0] * (n * q), [-1] * (n * q)
        pos0 = [0, 1] * n
        last = list(range(0, n * q, q))
        pos, dslots = [0] * ((k - 1) * n), [-1] * ((k - 1) * n)
        ctx = [1] * (k * n)
        ctx[:n] = [q] * n
        flat = [self.null_block] * (bs * w)  # block tables come last in in32: only bs rows are copied
        for i, (toks, start, sl, a, table) in enumerate(zip(catch_up, starts, slots, lookaheads, tables)):
            m = len(toks)
            ids0[i * q:i * q + m] = toks
            slots0[i * q:i * q + m] = sl[:m]
            pos0[i * q:i * q + q] = range(start, start + q)
            last[i] = i * q + m - 1
            ctx[i] = start + q
            nxt = start + m  # position of draft 0, fed in decode step 1
            for j in range(1, a):
                pos[(j - 1) * n + i] = nxt + j - 1
                dslots[(j - 1) * n + i] = sl[m + j - 1]
                ctx[j * n + i] = nxt + j
            flat[i * w:i * w + len(table)] = table
        pin = self.in64.device.type == "cuda"
        host64 = torch.tensor([*ids0, *slots0, *pos0, *last, *pos, *dslots], dtype=torch.int64, pin_memory=pin)
        host32 = torch.tensor([*ctx, *flat], dtype=torch.int32, pin_memory=pin)
        self.in64.copy_(host64, non_blocking=pin)
        self.in32[:host32.numel()].copy_(host32, non_blocking=pin)
        if self.graphs:
            self.graphs[bs].replay()
        else:
            with torch.inference_mode():
                self._forward(bs)
        return self.out[:, :b]


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
