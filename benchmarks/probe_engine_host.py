"""The engine's host time per step: scheduling, block bookkeeping, sampling, stop checks and outputs,
with the model's forward replaced by a stub. What a GPU decode step pays on the CPU beside its graph
replay. A diagnosis, not a benchmark with a target: host speed varies between machines, and on a GPU
the host also waits on copies and syncs that a CPU run does not have.

The stub's logits put all mass on a successor in a 64-token cycle, and every prompt is that cycle, so
n-gram lookup drafts are always right (acceptance 1.0): a round's host time without rejected drafts.
The draft mode uses the target as its own draft (the stub serves both), also accepting everything;
its greedy rounds go through the draft chain (whose forward is stubbed the same way) up to the chain's
largest batch, and "draft-rounds" turns the chain off (a round-by-round draft loop).
Each configuration runs `--repeats` times and reports the fastest step time (this shares a 2-core VM).

    python3 benchmarks/probe_engine_host.py                       # CPU, about a minute
    python3 benchmarks/probe_engine_host.py --batch 1 256 --tokens 400
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_result

from tessera.model import Transformer
from tessera.serve import model_runner
from tessera.serve.engine import LLMEngine
from tessera.specs import EngineConfig, GenerateRequest, ModelConfig, SamplingParams, SpeculativeConfig

CYCLE = range(5, 69)


def successors(vocab: int) -> torch.Tensor:
    """The stub's next token for each token: the cycle's successor inside it, itself outside."""
    succ = torch.arange(vocab)
    succ[CYCLE.start:CYCLE.stop] = torch.tensor([*CYCLE[1:], CYCLE[0]])
    return succ


def stub_forward(vocab: int):
    succ = successors(vocab)

    def forward(self, step) -> torch.Tensor:
        flat = torch.tensor([t for toks in step.tokens for t in toks])
        nxt = succ[flat[list(step.logit_rows)]]
        out = torch.zeros(len(step.logit_rows), vocab)
        out[torch.arange(len(nxt)), nxt] = 1.0
        return out

    return forward


def stub_chain(vocab: int):
    """`DraftChain._forward` on the stub's successor rule: draft j is the successor of draft j - 1."""
    succ = successors(vocab)

    def forward(self, bs: int) -> None:
        tok = succ[self.ids0[0, self.last[:bs]]]
        for j in range(self.k):
            self.out[j, :bs] = tok
            tok = succ[tok]

    return forward


def measure(model: Transformer, mode: str, batch: int, final_only: bool, tokens: int, repeats: int) -> dict | None:
    spec = {"ngram": SpeculativeConfig(method="ngram", num_speculative_tokens=4),
            "draft": SpeculativeConfig(method="draft", draft_model="self", num_speculative_tokens=4)}.get(
                mode.removesuffix("-rounds"))
    engine = LLMEngine(model, None, EngineConfig(max_model_len=4096, max_num_seqs=256, max_num_batched_tokens=16384,
                                                 kv_cache_bytes=2**29, speculative=spec),
                       draft_model=model if mode.startswith("draft") else None)
    if mode == "draft-rounds":
        if not hasattr(engine, "chain_rounds"):
            return None  # an engine from before the draft chain
        engine.chain_rounds = False
    if final_only and "final_only" not in inspect.signature(engine.add_request).parameters:
        return None  # an engine from before final_only
    extra = {"final_only": True} if final_only else {}
    prompt = tuple(CYCLE) * 4
    run_id = iter(range(1 << 30))

    def run(n: int) -> int:
        base = next(run_id)
        for i in range(batch):
            engine.add_request(GenerateRequest(request_id=f"{base}-{i}", prompt_token_ids=prompt,
                                               sampling=SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)),
                               **extra)
        steps = 0
        while engine.has_unfinished():
            engine.step()
            steps += 1
        return steps

    run(16)  # warm-up
    best, steps = float("inf"), 0
    for _ in range(repeats):
        start = time.perf_counter()
        steps = run(tokens)
        best = min(best, (time.perf_counter() - start) / steps)
    return {"mode": mode, "batch": batch, "final_only": final_only, "steps": steps,
            "host_ms_per_step": best * 1e3, "host_us_per_token": best * 1e6 * steps / (tokens * batch)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64], help="sequences decoding together")
    parser.add_argument("--tokens", type=int, default=200, help="new tokens per sequence per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per configuration (fastest reported)")
    parser.add_argument("--out", type=Path, default=None, help="directory for the JSON result")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny-student").model_copy(update={"max_seq_len": 4096})
    model = Transformer(cfg).eval()
    model_runner.ModelRunner.forward = stub_forward(cfg.vocab_size)
    if hasattr(model_runner, "DraftChain"):
        model_runner.DraftChain._forward = stub_chain(cfg.vocab_size)
    rows = []
    for batch in args.batch:
        for mode, final_only in (("plain", False), ("plain", True), ("ngram", False), ("draft", False),
                                 ("draft-rounds", False)):
            row = measure(model, mode, batch, final_only, args.tokens, args.repeats)
            if row is not None:
                rows.append(row)
                print(f"{mode} batch {batch}{' final_only' if final_only else ''}: "
                      f"{row['host_ms_per_step']:.3f} ms/step", flush=True)
    print_table(rows, title="engine host time per step, forward stubbed")
    path = write_result("probe-engine-host", {"rows": rows, "tokens": args.tokens, "repeats": args.repeats,
                                              "prompt_tokens": len(CYCLE) * 4}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
