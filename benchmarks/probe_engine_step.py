"""Where a batch-1 engine decode step spends its wall time, with the real model: the host phases of
`LLMEngine.step` (scheduling, the forward's input preparation and graph launch, the sampler's launches,
the wait for the sampled token, appending it, outputs) beside the device time of the forward and the
sampler (CUDA events). `bench_serve.py` reports graph replay and the engine end to end; their
difference is what this attributes. A diagnosis, not a benchmark: the timers add a few microseconds a
phase.

    source scripts/gpu-env.sh && python3 benchmarks/probe_engine_step.py --out $OUT   # Qwen3-0.6B shape, bf16
    python3 benchmarks/probe_engine_step.py --tiny                                     # CPU smoke run, seconds

Phases, per decode step (mean over the timed steps):
- `schedule`: `Scheduler.schedule` (with overlapped decode, the engine's default, a steady decode
  skips it: each step launches the next one itself);
- `forward`: `ModelRunner.forward` as the host sees it (inputs copied, graph replay launched; on a CPU,
  the whole forward);
- `sample`: `Sampler.sample` (launches only, on a GPU);
- `wait`: the rest of `_land`, chiefly the wait for the step's sampled ids;
- `append`: `_append` (stop checks, detokenisation);
- `cache_blocks`: `BlockManager.cache_blocks` (hashing filled blocks into the prefix cache);
- `outputs`: `_output` (the request's cumulative `RequestOutput`);
- `other`: the rest of `step`.

`--no-overlap` reads each step's tokens before launching the next (`LLMEngine.overlap = False`): every
phase then adds to the step's wall time, where overlapped decode hides them behind the device's work.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, require_positive, write_result

from tessera.model import Transformer
from tessera.serve.engine import LLMEngine
from tessera.specs import EngineConfig, GenerateRequest, ModelConfig, SamplingParams

PHASES = ("schedule", "forward", "sample", "wait", "append", "cache_blocks", "outputs", "other")


class PhaseTimer:
    """Accumulates host seconds per phase while `on`; wraps bound methods in place."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.on = False

    def wrap(self, owner: object, name: str, phase: str) -> None:
        inner: Callable[..., Any] = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                if self.on:
                    self.totals[phase] += time.perf_counter() - start

        setattr(owner, name, timed)


def probe(model: Transformer, device: str, prompt_len: int, tokens: int, repeats: int,
          graphs: bool, overlap: bool = True) -> dict[str, Any]:
    cfg = EngineConfig(device=device, dtype="bfloat16" if device == "cuda" else "float32",
                       max_model_len=prompt_len + tokens + 16, max_num_seqs=8, max_num_batched_tokens=8192,
                       kv_cache_memory_fraction=0.6, kv_cache_bytes=2**28, enforce_eager=not graphs,
                       cuda_graph_batch_sizes=(1, 2, 4, 8))
    engine = LLMEngine(model, None, cfg)
    engine.overlap = overlap
    timer = PhaseTimer()
    timer.wrap(engine.scheduler, "schedule", "schedule")
    timer.wrap(engine.runner, "forward", "forward")
    timer.wrap(engine.sampler, "sample", "sample")
    timer.wrap(engine, "_append", "append")
    timer.wrap(engine.bm, "cache_blocks", "cache_blocks")
    timer.wrap(engine, "_output", "outputs")
    timer.wrap(engine, "_land", "land")
    timer.wrap(engine, "step", "step")
    cuda = device == "cuda"
    device_ms: list[float] = []
    if cuda:  # device time of forward + sampler: events around them, read after the step
        forward, sample = engine.runner.forward, engine.sampler.sample
        marks: list[torch.cuda.Event] = []

        def forward_marked(*args: Any, **kwargs: Any) -> Any:
            marks.append(torch.cuda.Event(enable_timing=True))
            marks[-1].record()
            return forward(*args, **kwargs)

        def sample_marked(*args: Any, **kwargs: Any) -> Any:
            out = sample(*args, **kwargs)
            marks.append(torch.cuda.Event(enable_timing=True))
            marks[-1].record()
            return out

        engine.runner.forward, engine.sampler.sample = forward_marked, sample_marked

    prompt = tuple(range(10, 10 + prompt_len))
    walls: list[float] = []
    steps = 0
    for r in range(repeats + 1):  # the first run warms up (graphs, tuning, allocator)
        engine.add_request(GenerateRequest(request_id=f"r{r}", prompt_token_ids=prompt,
                                           sampling=SamplingParams(temperature=0, max_tokens=tokens,
                                                                   ignore_eos=True)))
        engine.step()  # the prefill and the first token, not timed
        timer.on = r > 0
        if cuda:
            marks.clear()
        start = time.perf_counter()
        n = 0
        while engine.has_unfinished():
            engine.step()
            n += 1
        if r > 0:
            walls.append((time.perf_counter() - start) / n)
            steps += n
            if cuda:
                torch.cuda.synchronize()
                device_ms += [a.elapsed_time(b) for a, b in zip(marks[::2], marks[1::2])]
        timer.on = False
    t = timer.totals
    per = {k: 1e6 * v / steps for k, v in t.items()}
    phases = {
        "schedule": per.get("schedule", 0.0), "forward": per.get("forward", 0.0),
        "sample": per.get("sample", 0.0), "append": per.get("append", 0.0),
        "wait": per.get("land", 0.0) - per.get("append", 0.0) - per.get("cache_blocks", 0.0),
        "cache_blocks": per.get("cache_blocks", 0.0), "outputs": per.get("outputs", 0.0),
        "other": (per.get("step", 0.0) - per.get("schedule", 0.0) - per.get("forward", 0.0) - per.get("sample", 0.0)
                  - per.get("land", 0.0) - per.get("outputs", 0.0)),
    }
    res = {"steps": steps, "overlap": overlap, "overlapped_steps": engine.overlapped_steps,
           "step_wall_us_median": 1e6 * statistics.median(walls),
           "step_us_mean_instrumented": per.get("step", 0.0), "phases_us": phases}
    if device_ms:
        res["device_forward_sample_us_median"] = 1e3 * statistics.median(device_ms)
        res["host_not_overlapped_us"] = res["step_wall_us_median"] - res["device_forward_sample_us_median"]
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen3-0.6b", help="ModelConfig preset (random weights)")
    parser.add_argument("--tiny", action="store_true", help="tiny-student on the CPU, eager: checks the bookkeeping")
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (random ids)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens generated per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up run")
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs (default: graphs on a GPU)")
    parser.add_argument("--no-overlap", action="store_true",
                        help="read each step's tokens before launching the next (default: overlapped decode)")
    parser.add_argument("--out", type=Path, default=None, help="directory for the JSON result")
    args = parser.parse_args(argv)
    require_positive(parser, args, "prompt_len", "tokens", "repeats")
    cuda = torch.cuda.is_available() and not args.tiny
    device = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny-student" if args.tiny else args.preset)
    if args.tiny:
        args.prompt_len, args.tokens = min(args.prompt_len, 16), min(args.tokens, 16)
    model = Transformer(cfg).eval()
    res = probe(model, device, args.prompt_len, args.tokens, args.repeats, graphs=cuda and not args.eager,
                overlap=not args.no_overlap)
    rows = [{"phase": p, "host_us_per_step": res["phases_us"][p]} for p in PHASES]
    name = "tiny-student" if args.tiny else args.preset
    print_table(rows, title=f"engine decode step, batch 1, {name} on {device}, "
                            f"{'overlapped' if res['overlap'] else 'step by step'}: median step "
                            f"{res['step_wall_us_median']:.1f} us")
    if "device_forward_sample_us_median" in res:
        print(f"device time of forward + sampler: {res['device_forward_sample_us_median']:.1f} us a step; "
              f"wall time not covered by it: {res['host_not_overlapped_us']:.1f} us")
    stem = "probe-engine-step" + ("-tiny" if args.tiny else "") + ("-no-overlap" if args.no_overlap else "")
    path = write_result(stem,
                        {"preset": name, "prompt_len": args.prompt_len,
                         "tokens": args.tokens, "repeats": args.repeats, "graphs": cuda and not args.eager,
                         **res}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
