"""`LLMEngine`: requests in, one scheduler step at a time, cumulative outputs out.

    engine = LLMEngine(model, tokenizer, EngineConfig(...))
    engine.add_request(GenerateRequest(request_id="a", prompt="Hello", sampling=SamplingParams(max_tokens=8)))
    while engine.has_unfinished():
        for out in engine.step(): ...

Not thread-safe: one thread drives it (`AsyncEngine` runs it on its own thread).

Overlapped decode: while every running sequence is decoding (nothing waiting, no penalties), a step
launches the next step's forward and sampling on the device before it reads its own sampled tokens
back, with the next step's input tokens taken from the device. The host's work of a step (reading the
tokens, stop checks, detokenisation, outputs, the next step's inputs) then runs while the device
computes, instead of between its steps. Outputs are the same: a sequence that finished in the step
being read is dropped from the one already launched, whose token for it is discarded.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

from tessera.model import Transformer
from tessera.serve.block_manager import BlockManager
from tessera.serve.detokenizer import Decoder, IncrementalDetokenizer
from tessera.serve.errors import RequestRejected
from tessera.serve.model_runner import ModelRunner, StepInput, kv_cache_spec
from tessera.serve.sampler import (
    RowsCache,
    Sampler,
    SamplerOutput,
    SamplingRows,
    derive_seed,
    penalised,
    plain_greedy,
)
from tessera.serve.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from tessera.serve.sequence import Sequence
from tessera.serve.speculative import DraftProposer, NgramProposer, greedy_verdicts, target_rows, verify
from tessera.serve.transfer import fetch, take_rows, upload
from tessera.specs import (
    CompletionOutput,
    EngineConfig,
    GenerateRequest,
    RequestMetrics,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_usage: float
    num_preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    generation_tokens_total: int
    prompt_tokens_total: int


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: tuple[int, ...]  # a tuple once, so every step's output shares it instead of copying it
    seqs: list[Sequence]
    arrival_time: float
    final_only: bool = False  # step() reports the request once, when it finishes

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)


@dataclass(eq=False)
class _Flight:
    """A plain step launched on the device: `sampled` draw their next token from `result` (None when no
    sequence samples in the step). `host` is its copy on its way to pinned host memory, complete once
    `ready` has passed (None off CUDA, where `host` is `result`)."""

    scheduled: list[ScheduledSeq]
    sampled: list[Sequence]
    result: SamplerOutput | None = None
    host: SamplerOutput | None = None
    ready: torch.cuda.Event | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class LLMEngine:
    """Owns the block manager, scheduler, model runner(s) and sampler for one model (and an optional
    draft). The model must already sit on its device in its serving dtype; the KV cache takes that dtype."""

    def __init__(self, model: Transformer, tokenizer: Decoder | None = None, config: EngineConfig | None = None, *,
                 draft_model: Transformer | None = None, model_name: str = "model") -> None:
        self.config = config = config or EngineConfig()
        self.model_name = model_name
        self.tokenizer = tokenizer
        weight = model.model.embed_tokens.weight
        self.device, dtype = weight.device, weight.dtype
        self.vocab_size = model.config.vocab_size
        self.max_model_len = config.max_model_len or model.config.max_seq_len
        if self.max_model_len > model.config.max_seq_len:
            raise ValueError(f"max_model_len ({self.max_model_len}) exceeds the model's max_seq_len "
                             f"({model.config.max_seq_len})")
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_token_id = eos if eos is not None else model.config.eos_token_id
        spec = config.speculative
        if spec is not None and spec.method == "draft":
            if draft_model is None:
                raise ValueError(f"speculative.method='draft' but no draft model was given for {spec.draft_model!r}")
            if draft_model.config.vocab_size != self.vocab_size:
                raise ValueError(f"draft vocab_size {draft_model.config.vocab_size} != target vocab_size "
                                 f"{self.vocab_size}")
        num_lookahead = spec.num_speculative_tokens if spec is not None else 0
        bs = config.block_size
        self.num_blocks = config.num_blocks or self._auto_num_blocks(model, draft_model, dtype)
        self.bm = BlockManager(self.num_blocks, bs, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.bm, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.max_num_batched_tokens, max_waiting=config.max_waiting,
                                   enable_chunked_prefill=config.enable_chunked_prefill, num_lookahead=num_lookahead)
        runner_args = dict(num_blocks=self.num_blocks, block_size=bs, max_model_len=self.max_model_len,
                           device=self.device, cuda_graph_batch_sizes=[b for b in config.cuda_graph_batch_sizes
                                                                        if b <= config.max_num_seqs],
                           enforce_eager=config.enforce_eager)
        # Speculative rounds verify k + 1 tokens a sequence; the draft catches up on at most two.
        self.runner = ModelRunner(model, dtype=dtype, graph_tokens_per_seq=num_lookahead + 1, **runner_args)
        self.sampler = Sampler()
        self._rows = RowsCache()
        self.proposer: DraftProposer | NgramProposer | None = None
        if spec is not None and spec.method == "draft":
            assert draft_model is not None
            draft_runner = ModelRunner(draft_model, dtype=draft_model.model.embed_tokens.weight.dtype,
                                       graph_tokens_per_seq=2, draft_chain_steps=num_lookahead, **runner_args)
            self.proposer = DraftProposer(draft_runner, self.sampler, self.eos_token_id)
        elif spec is not None:
            self.proposer = NgramProposer(self.vocab_size, spec.ngram_min, spec.ngram_max, self.device)
        #: Plain greedy draft rounds go through the draft runner's `DraftChain` (one wait for the device
        #: a round); False keeps them on the general path, a wait a draft token (for comparisons).
        self.chain_rounds = True
        #: Overlapped decode (see the module docstring); False reads every step's tokens before the next
        #: step is launched (for comparisons).
        self.overlap = True
        #: Steps launched before the previous step's tokens were read (overlapped decode).
        self.overlapped_steps = 0
        self._inflight: _Flight | None = None
        self.requests: dict[str, Request] = {}
        self._rng = random.Random(config.seed)
        self._next_seq_id = 0
        self.generation_tokens_total = 0
        self.prompt_tokens_total = 0

    def _auto_num_blocks(self, model: Transformer, draft: Transformer | None, dtype: torch.dtype) -> int:
        bs = self.config.block_size
        per_block = kv_cache_spec(model, 1, bs, dtype).bytes_per_block
        if draft is not None:
            per_block += kv_cache_spec(draft, 1, bs, draft.model.embed_tokens.weight.dtype).bytes_per_block
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * self.config.kv_cache_memory_fraction)
        else:
            budget = self.config.kv_cache_bytes
        useful = self.config.max_num_seqs * -(-self.max_model_len // bs)
        blocks = min(budget // per_block, useful)
        if blocks < 1:
            raise ValueError(f"KV cache budget of {budget} bytes holds no block of {per_block} bytes")
        return blocks

    # ---- requests ------------------------------------------------------------------------------

    def add_request(self, request: GenerateRequest, *, final_only: bool = False) -> None:
        """Validate and queue. Raises RequestRejected (never servable as given) or EngineOverloaded.

        `final_only`: `step()` returns this request's output only once it has finished, instead of a
        cumulative output every step it advances (for callers that keep only the last one: building
        those outputs was about half of a decode step's host time at batch 64)."""
        ids = self.check_request(request)
        sp = request.sampling
        seed = sp.seed if sp.seed is not None else self._rng.getrandbits(63)
        arrival = request.arrival_time or time.time()
        seqs = []
        for i in range(sp.n):
            seqs.append(Sequence(seq_id=self._next_seq_id, request_id=request.request_id, prompt_token_ids=list(ids),
                                 sampling=sp, seed=derive_seed(seed, i), max_model_len=self.max_model_len, index=i,
                                 arrival_time=arrival, prompt=request.prompt))
            self._next_seq_id += 1
        self.scheduler.add(seqs)
        for s in seqs:
            if self.tokenizer is not None:
                s.detok = IncrementalDetokenizer(self.tokenizer, sp.skip_special_tokens)
        self.requests[request.request_id] = Request(request.request_id, request.prompt, tuple(ids), seqs, arrival,
                                                    final_only)
        self.prompt_tokens_total += len(ids)

    def check_request(self, request: GenerateRequest) -> list[int]:
        """The request's prompt token ids; raises RequestRejected if it can never be served."""
        if request.request_id in self.requests:
            raise RequestRejected("request_id", request.request_id, "a request with this id is already running")
        ids = self._prompt_ids(request)
        self._validate(ids, request.sampling)
        return ids

    def _prompt_ids(self, request: GenerateRequest) -> list[int]:
        if request.prompt_token_ids is not None:
            ids = list(request.prompt_token_ids)
            bad = [t for t in ids if t >= self.vocab_size]
            if bad:
                raise RequestRejected("prompt_token_ids", bad[0], f"token id outside [0, {self.vocab_size})")
            return ids
        if self.tokenizer is None:
            raise RequestRejected("prompt", request.prompt, "this model has no tokenizer; send prompt_token_ids")
        ids = self.tokenizer.encode(request.prompt)  # type: ignore[attr-defined]
        if not ids:
            raise RequestRejected("prompt", request.prompt, "the prompt is empty")
        return ids

    def _validate(self, ids: list[int], sp: SamplingParams) -> None:
        n, limit = len(ids), self.max_model_len
        if n >= limit:
            raise RequestRejected("prompt", f"{n} tokens", f"leaves no room to generate within max_model_len {limit}")
        if n + sp.max_tokens > limit:
            raise RequestRejected("max_tokens", sp.max_tokens,
                                  f"prompt ({n} tokens) + max_tokens exceeds max_model_len {limit}")
        capacity = self.num_blocks * self.config.block_size
        if self.bm.blocks_for(n + sp.max_tokens) > self.num_blocks:
            raise RequestRejected("max_tokens", sp.max_tokens,
                                  f"prompt ({n} tokens) + max_tokens exceeds the KV cache capacity "
                                  f"of {capacity} tokens")
        if not self.config.enable_chunked_prefill and n > self.config.max_num_batched_tokens:
            raise RequestRejected("prompt", f"{n} tokens", f"longer than max_num_batched_tokens "
                                  f"{self.config.max_num_batched_tokens} with chunked prefill off")

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its blocks; returns its final output (None if unknown or done)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        now = time.time()
        for s in req.seqs:
            if not s.finished:
                self.scheduler.finish(s)
                s.finish_reason, s.finished_time = "abort", now
        return self._output(req)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def stats(self) -> EngineStats:
        return EngineStats(num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
                           kv_usage=self.bm.usage, num_preemptions=self.scheduler.num_preemptions,
                           prefix_cache_queries=self.bm.prefix_queries, prefix_cache_hits=self.bm.prefix_hits,
                           generation_tokens_total=self.generation_tokens_total,
                           prompt_tokens_total=self.prompt_tokens_total)

    # ---- one step ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; cumulative outputs of every request that advanced (finished ones last time;
        a `final_only` request only when it finishes). With overlapped decode the step that advanced them
        may have been launched by the previous call, and this call may leave the next one running."""
        flight, self._inflight = self._inflight, None
        if flight is not None and all(s.finished for s in flight.sampled):
            self._land(flight)  # every sequence in it finished or was aborted since it was launched
            flight = None
        if flight is None:
            out = self.scheduler.schedule()
            if out.empty:
                return []
            self.runner.copy_blocks(out.copies)
            if self.proposer is not None:
                if isinstance(self.proposer, DraftProposer):
                    self.proposer.runner.copy_blocks(out.copies)
                touched = self._speculative_step(out)
                self._cache_blocks(out.scheduled)
                return self._outputs(touched)
            flight = self._launch(out.scheduled)
        self._inflight = self._continuation(flight)
        return self._outputs(self._land(flight))

    def _cache_blocks(self, scheduled: list[ScheduledSeq]) -> None:
        for s in scheduled:
            if s.seq.handle is not None and not s.seq.finished:
                done = s.seq.num_computed
                if isinstance(self.proposer, DraftProposer):
                    done = min(done, s.seq.num_draft_computed)
                self.bm.cache_blocks(s.seq.handle, s.seq.token_ids, done)

    def _outputs(self, touched: list[Sequence]) -> list[RequestOutput]:
        outputs = []
        for req in {self.requests[s.request_id] for s in touched if s.request_id in self.requests}:
            finished = req.finished
            if finished or not req.final_only:
                outputs.append(self._output(req))
            if finished:
                del self.requests[req.request_id]
        return outputs

    def _launch(self, scheduled: list[ScheduledSeq], device_first: torch.Tensor | None = None) -> _Flight:
        """Launch a plain step's forward and sampling without reading the tokens back. With `device_first`
        (every sequence decoding) each sequence's input token is device_first[i], the token the step
        before drew for it, which the host has not appended yet."""
        tokens, starts, rows, sampled = [], [], [], []
        n = 0
        for s in scheduled:
            seq = s.seq
            if device_first is None:
                tokens.append(seq.token_ids[seq.num_computed:seq.num_computed + s.num_new_tokens])
            else:
                tokens.append([0])
            starts.append(seq.num_computed)
            n += s.num_new_tokens
            if device_first is not None or s.samples:
                rows.append(n - 1)
                sampled.append(seq)
        logits = self.runner.forward(StepInput([s.seq.handle for s in scheduled], tokens, starts, rows,
                                               device_first=device_first))
        for s in scheduled:
            s.seq.num_computed += s.num_new_tokens
        if not sampled:
            return _Flight(scheduled, [])
        # A continuation draws the token after the one still on the device: one position further.
        rows_ = self._rows.get(sampled, self.vocab_size, self.device, self.eos_token_id,
                               ahead=0 if device_first is None else 1)
        result = self.sampler.sample(logits, rows_)
        # Read through a fenced copy: a `.tolist()` would also wait for the step launched behind this one.
        host, ready = fetch([result.token_ids, result.logprobs, result.top_ids, result.top_logprobs])
        return _Flight(scheduled, sampled, result, SamplerOutput(*host), ready)

    def _land(self, flight: _Flight) -> list[Sequence]:
        """Read a launched step's tokens (the wait for the device) and append them, skipping sequences
        that finished (or were aborted) since it was launched."""
        if flight.host is not None:
            if flight.ready is not None:
                flight.ready.synchronize()
            new = flight.host.token_ids.tolist()
            lps = self._logprob_lists(flight.host)
            for i, (seq, tok) in enumerate(zip(flight.sampled, new)):
                if not seq.finished:
                    self._append(seq, tok, lps[i] if lps else None)
        self._cache_blocks(flight.scheduled)
        return flight.sampled

    def _continuation(self, flight: _Flight) -> _Flight | None:
        """Launch the step after `flight` before its tokens are read, when that step is what the scheduler
        would make of it: every running sequence sampled in `flight` (so each decodes one token next),
        nothing waits for admission, none has penalties (which read the history the host has not seen
        yet), and the cache has a slot for each without preempting. Sequences finished since `flight`
        was launched, and those that its token brings to their length limit, are left out. None
        (nothing launched) otherwise."""
        if not self.overlap or self.proposer is not None or self.scheduler.waiting:
            return None
        seqs = flight.sampled
        live = [s for s in seqs if not s.finished]
        if not live or len(seqs) != len(flight.scheduled) or len(live) != len(self.scheduler.running):
            return None
        if any(penalised(s.sampling) for s in live):
            return None
        keep = [i for i, s in enumerate(seqs) if not s.finished and s.num_tokens + 1 < s.max_len]
        if not keep:
            return None
        nxt = [seqs[i] for i in keep]
        grows = [(s.handle, max(0, s.num_tokens + 1 - s.handle.num_tokens)) for s in nxt]
        if not self.bm.can_append_all(grows):
            return None
        for seq, (handle, grow) in zip(nxt, grows):
            if grow > 0:
                seq.handle = self.bm.append(handle, grow)
        self.runner.copy_blocks(self.bm.take_copies())
        assert flight.result is not None
        self.overlapped_steps += 1
        return self._launch([ScheduledSeq(s, 1) for s in nxt], device_first=take_rows(flight.result.token_ids, keep))

    def _speculative_step(self, out: SchedulerOutput) -> list[Sequence]:
        assert self.proposer is not None
        decodes = [s for s in out.scheduled if s.seq.is_decode]
        prefills = [s for s in out.scheduled if not s.seq.is_decode]
        if decodes and not prefills and self._chains(decodes):
            touched = self._chain_round(decodes)
            if touched is not None:
                return touched
        proposal = self.proposer.propose(decodes, prefills)
        drafts = proposal.tokens
        tokens, starts, rows = [], [], []
        n = 0
        for s, d in zip(decodes, drafts):
            tokens.append([s.seq.token_ids[-1], *d])
            starts.append(s.seq.num_computed)
            rows += range(n, n + len(d) + 1)
            n += len(d) + 1
        sampled = []
        for s in prefills:
            seq = s.seq
            tokens.append(seq.token_ids[seq.num_computed:seq.num_computed + s.num_new_tokens])
            starts.append(seq.num_computed)
            n += s.num_new_tokens
            if s.samples:
                rows.append(n - 1)
                sampled.append(seq)
        handles = [s.seq.handle for s in (*decodes, *prefills)]
        logits = self.runner.forward(StepInput(handles, tokens, starts, rows))
        n_verify = sum(len(d) + 1 for d in drafts)
        touched = self._verify(decodes, drafts, proposal.q, logits[:n_verify]) if decodes else []
        for s in prefills:
            s.seq.num_computed += s.num_new_tokens
        if sampled:
            result = self.sampler.sample(logits[n_verify:], SamplingRows.build(sampled, self.vocab_size, self.device,
                                                                                self.eos_token_id))
            lps = self._logprob_lists(result)
            for i, (seq, tok) in enumerate(zip(sampled, result.token_ids.tolist())):
                self._append(seq, tok, lps[i] if lps else None)
        return touched + sampled

    def _verify(self, decodes: list[ScheduledSeq], drafts: list[list[int]], q: torch.Tensor | None,
                logits: torch.Tensor) -> list[Sequence]:
        row_seqs, extra = target_rows(decodes, drafts)
        rows = SamplingRows.build(row_seqs, self.vocab_size, self.device, self.eos_token_id, extra)
        if rows.all_greedy:
            # Greedy: the target's argmax at every row, compared with the drafts on the host. One kernel
            # and one wait, where building [B, k + 1, V] distributions for the rejection rule takes ~20.
            row_tokens = self.sampler.process(logits, rows).argmax(-1)
            emitted_l, accepted_l = greedy_verdicts(row_tokens.tolist(), drafts)
        else:
            assert q is not None, "a sampled round needs the draft distributions"
            row_tokens, emitted_l, accepted_l = self._rejection_verdicts(decodes, drafts, q, logits, rows)
        lp_rows = None
        if rows.num_logprobs is not None:
            # Row j of a sequence emitted row_tokens[j] whenever j <= its accepted count (the rows read below).
            lp_rows = self._logprob_lists(Sampler.with_logprobs(logits, row_tokens, rows.num_logprobs))
        return self._apply_verdicts(decodes, drafts, emitted_l, accepted_l, lp_rows)

    def _chains(self, decodes: list[ScheduledSeq]) -> bool:
        """Whether a round of these decodes can go through the draft chain: a draft model with one, and
        every sequence greedy with nothing that processes its logits (no penalties, no min_tokens ban
        left, no logprobs), so that the draft's and the target's choices are plain argmaxes."""
        return (self.chain_rounds and isinstance(self.proposer, DraftProposer)
                and self.proposer.runner.chain is not None and all(plain_greedy(s.seq) for s in decodes))

    def _chain_round(self, decodes: list[ScheduledSeq]) -> list[Sequence] | None:
        """A greedy draft round with one wait for the device: the draft chain leaves its tokens on the
        device, the target's verification forward reads them there, and the drafts and the target's
        argmaxes come to the host together. None (nothing done) when the chain cannot take the round."""
        assert isinstance(self.proposer, DraftProposer)
        seqs = [s.seq for s in decodes]
        handles = [s.handle for s in seqs]
        looks = [s.num_lookahead for s in decodes]
        catch_up = [s.token_ids[s.num_draft_computed:] for s in seqs]
        chained = self.proposer.runner.draft_chain(handles, catch_up, [s.num_draft_computed for s in seqs], looks)
        if chained is None:
            return None
        for seq, a in zip(seqs, looks):
            seq.num_draft_computed = seq.num_tokens + max(a - 1, 0)
        b, k = len(seqs), chained.shape[0]
        tokens = [[seq.token_ids[-1], *[0] * a] for seq, a in zip(seqs, looks)]
        n = sum(a + 1 for a in looks)
        logits = self.runner.forward(StepInput(handles, tokens, [s.num_computed for s in seqs], range(n),
                                               device_tokens=chained.t()))
        both = torch.cat([chained.reshape(-1), logits.argmax(-1)]).tolist()  # the round's one wait
        drafts = [[both[j * b + i] for j in range(a)] for i, a in enumerate(looks)]
        emitted, accepted = greedy_verdicts(both[k * b:], drafts)
        return self._apply_verdicts(decodes, drafts, emitted, accepted, None)

    def _apply_verdicts(self, decodes: list[ScheduledSeq], drafts: list[list[int]], emitted_l: list[list[int]],
                        accepted_l: list[int], lp_rows: list | None) -> list[Sequence]:
        """Append each sequence's emitted tokens (stopping at the first that finishes it), count its
        drafts and acceptances, and roll its caches back past the rejected drafts."""
        offsets = [0]
        for d in drafts:
            offsets.append(offsets[-1] + len(d) + 1)
        for i, s in enumerate(decodes):
            seq, a = s.seq, accepted_l[i]
            base = seq.num_tokens
            seq.spec_draft_tokens += len(drafts[i])
            seq.spec_accepted_tokens += a
            for j in range(a + 1):
                self._append(seq, emitted_l[i][j], lp_rows[offsets[i] + j] if lp_rows else None)
                if seq.finished:
                    break
            if not seq.finished:
                seq.num_computed = base + a
                seq.num_draft_computed = min(seq.num_draft_computed, base + a)
                seq.handle = self.bm.truncate(seq.handle, base + a)
        return [s.seq for s in decodes]

    def _rejection_verdicts(self, decodes: list[ScheduledSeq], drafts: list[list[int]], q: torch.Tensor,
                            logits: torch.Tensor,
                            rows: SamplingRows) -> tuple[torch.Tensor, list[list[int]], list[int]]:
        """`verify` over the batch: (the token each verification row emits [rows], emitted, accepted)."""
        k = q.shape[1]
        flat_p = self.sampler.probs(logits, rows)
        b = len(decodes)
        p = torch.zeros(b, k + 1, self.vocab_size, device=self.device)
        index = [(i, j) for i, d in enumerate(drafts) for j in range(len(d) + 1)]
        bi, bj, draft_t, num_draft, seeds, first = upload(
            [[i for i, _ in index], [j for _, j in index], [t for d in drafts for t in (*d, *[0] * (k - len(d)))],
             [len(d) for d in drafts], [s.seq.seed for s in decodes], [s.seq.num_tokens for s in decodes]],
            torch.int64, self.device)
        p[bi, bj] = flat_p
        emitted, accepted = verify(p, q, draft_t.view(b, k), num_draft, seeds, first)
        both = torch.cat([emitted.reshape(-1), accepted]).tolist()  # one device-to-host wait, not two
        return emitted[bi, bj], [both[i * (k + 1):(i + 1) * (k + 1)] for i in range(b)], both[b * (k + 1):]

    @staticmethod
    def _logprob_lists(result) -> list[tuple[float, dict[int, float]]] | None:
        if result.logprobs is None:
            return None
        chosen = result.logprobs.tolist()
        ids, vals = result.top_ids.tolist(), result.top_logprobs.tolist()
        return [(c, dict(zip(i, v))) for c, i, v in zip(chosen, ids, vals)]

    # ---- output and stop conditions ------------------------------------------------------------

    def _append(self, seq: Sequence, token: int, logprob: tuple[float, dict[int, float]] | None) -> None:
        now = time.time()
        seq.token_ids.append(token)
        self.generation_tokens_total += 1
        if seq.first_token_time is None:
            seq.first_token_time = now
        sp = seq.sampling
        if logprob is not None and seq.logprobs is not None:
            top = dict(list(logprob[1].items())[: sp.logprobs or 0])
            seq.logprobs.append(TokenLogprob(token_id=token, logprob=logprob[0], top=top))
            seq.cumulative_logprob += logprob[0]
        old_len = len(seq.text)
        if seq.detok is not None:
            seq.text += seq.detok.step(seq.output_token_ids)
        reason, stop = None, None
        past_min = seq.num_output_tokens >= sp.min_tokens
        if past_min and token == self.eos_token_id and not sp.ignore_eos:
            reason = "stop"
        elif past_min and token in sp.stop_token_ids:
            reason, stop = "stop", token
        elif past_min and sp.stop:
            for s in sp.stop:
                at = seq.text.find(s, max(0, old_len - len(s) + 1))
                if at >= 0:
                    seq.text, reason, stop = seq.text[:at], "stop", s
                    break
        if reason is None and (seq.num_output_tokens >= sp.max_tokens or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None and seq.detok is not None and not isinstance(stop, str):
            seq.text += seq.detok.flush(seq.output_token_ids)
        if reason is not None:
            seq.finish_reason, seq.stop_reason, seq.finished_time = reason, stop, now
            self.scheduler.finish(seq)

    def _output(self, req: Request) -> RequestOutput:
        # Built every step for every running request from values the engine produced itself, so the
        # models are constructed without re-validation (it cost ~10 us per object at batch 256).
        outs = tuple(CompletionOutput.model_construct(
            index=s.index, text=s.text, token_ids=tuple(s.output_token_ids), finish_reason=s.finish_reason,
            stop_reason=s.stop_reason, cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
            logprobs=tuple(s.logprobs) if s.logprobs is not None else None) for s in req.seqs)
        firsts = [s.first_token_time for s in req.seqs if s.first_token_time is not None]
        finished = req.finished
        metrics = RequestMetrics.model_construct(
            arrival_time=req.arrival_time, first_token_time=min(firsts) if firsts else None,
            finished_time=max(s.finished_time or 0.0 for s in req.seqs) if finished else None,
            num_preemptions=sum(s.num_preemptions for s in req.seqs),
            num_cached_tokens=max(s.num_cached_tokens for s in req.seqs),
            spec_draft_tokens=sum(s.spec_draft_tokens for s in req.seqs),
            spec_accepted_tokens=sum(s.spec_accepted_tokens for s in req.seqs))
        return RequestOutput.model_construct(request_id=req.request_id, prompt=req.prompt,
                                             prompt_token_ids=req.prompt_token_ids,
                                             outputs=outs, finished=finished, metrics=metrics)

