"""`tessera demo`: the whole job on one machine, from nothing to answers over HTTP, then a table of figures.

    tessera demo                                   # the default pipeline (configs/demo.yaml), CPU-sized
    tessera demo --data notes.txt --out runs/mine  # your own text
    tessera demo --preset-scale real --device cuda # the same pipeline at real size, on a GPU
    tessera demo --config my_pipeline.yaml         # your own pipeline file (a PipelineConfig)

No file is downloaded: the default corpus is the docstrings of the Python standard library.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from tessera.specs.pipeline import PipelineConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tessera demo",
        description="Pretrain a teacher on a text corpus, distill a student from it, quantize the student, "
                    "serve the teacher with the student as speculative draft, answer a completion and a streaming "
                    "chat over HTTP on loopback, and print perplexities, acceptance rate, speedup, throughput and "
                    "where every artifact is. Defaults: the pipeline of configs/demo.yaml on the built-in corpus "
                    "(the Python standard library's docstrings); about 5 minutes on two CPU cores.")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--config", type=Path, help="a PipelineConfig as YAML or JSON (see docs/pipeline.md)")
    source.add_argument("--preset-scale", choices=PipelineConfig.presets(),
                        help="a built-in pipeline: tiny (seconds), small (the default), real (the 40M/6M pair, "
                             "for a GPU)")
    p.add_argument("--data", nargs="+", metavar="PATH", help="text files to train on instead of the built-in corpus")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: the pipeline's, auto)")
    p.add_argument("--out", help="output directory (default: the pipeline's output_dir, runs/demo)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: the pipeline's; automatic)")
    p.add_argument("--print-config", action="store_true", help="print the resolved pipeline as YAML and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def resolve(args: argparse.Namespace) -> PipelineConfig:
    """The pipeline from --config / --preset-scale (default: `PipelineConfig()`), with --data, --device and
    --out applied."""
    if args.config is not None:
        cfg = PipelineConfig.load(args.config)
    else:
        cfg = PipelineConfig.preset(args.preset_scale or "small")
    changes: dict[str, Any] = {}
    if args.data:
        changes["data"] = list(args.data)
    if args.device:
        changes["device"] = args.device
    if args.out:
        changes["output_dir"] = args.out
    if args.threads:
        changes["threads"] = args.threads
    return PipelineConfig.model_validate({**cfg.model_dump(mode="json"), **changes}) if changes else cfg


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r: tuple[str, ...]) -> str:
        return "  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return [line(header), "  " + "  ".join("-" * w for w in widths), *map(line, rows)]


def _mb(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def format_summary(s: dict[str, Any]) -> str:
    """The human-readable report of a `run_pipeline` summary."""
    ppl, serving, http = s["perplexity"], s["serving"], s["http"]
    threads = f"{s['threads']} torch thread" + ("s" if s["threads"] != 1 else "")
    out = [f"Tessera demo: {s['seconds'] / 60:.1f} min on {s['device']} ({threads}; "
           f"{os.cpu_count()} CPU cores, load now {os.getloadavg()[0]:.1f})", ""]
    rows = [(name.replace("_", " "), f"{r['params'] / 1e6:.2f}M", _mb(r["checkpoint_bytes"]), f"{r['ppl']:.2f}")
            for name, r in ppl.items()]
    out += ["Held-out perplexity", *_table(rows, ("model", "params", "checkpoint", "ppl"))]
    ev = s["eval"]
    out += [f"  {ev['tokens']:,} tokens of {s['data']['heldout_documents']:,} held-out documents (of "
            f"{s['data']['documents']:,}; never trained on), {ev['tokenizer']}, window {ev['window']}", ""]
    rows = []
    for key, label in (("teacher", "teacher"), ("speculative", "teacher + draft"),
                       ("quantized_student", "quantized student")):
        r = serving.get(key)
        if r is None:
            continue
        extra = ""
        if key == "speculative":
            extra = (f"acceptance {r['acceptance_rate']:.2f}, speedup {r['speedup']:.2f}x, "
                     f"same text as teacher: {'yes' if r['same_text_as_teacher'] else 'NO'}")
        rows.append((label, f"{r['tokens']}", f"{r['seconds']:.2f}", f"{r['tokens_per_s']:.1f}", extra))
    out += [f"Generation ({len(serving['prompts'])} prompts x {serving['max_tokens']} tokens, greedy, batch 1)",
            *_table(rows, ("engine", "tokens", "seconds", "tokens/s", "")), ""]
    comp, chat = http["completion"], http["chat"]
    out += [f"HTTP gateway {http['url']} (model {http['model']}; stopped cleanly: "
            f"{'yes' if http['server_stopped'] and http['engine_stopped'] else 'NO'})",
            f"  completion {comp['status']}: {comp['completion_tokens']} tokens in {comp['seconds']:.2f} s, "
            f"agrees with offline greedy: {'yes' if comp['matches_offline_greedy'] else 'NO'}",
            f"  streaming chat 200: {chat['chunks']} events in {chat['seconds']:.2f} s"
            + (f", first token after {chat['first_token_seconds']:.2f} s" if chat["first_token_seconds"] else ""), ""]
    rows = []
    for stage in ("teacher", "student"):
        r = s[stage]
        if "steps" in r:
            rows.append((stage, str(r["steps"]), f"{r['loss']:.3f}", f"{r['tokens_per_s']:,.0f}",
                         f"{r['seconds']:.0f}"))
    if rows:
        out += ["Training", *_table(rows, ("stage", "steps", "last loss", "tokens/s", "seconds")), ""]
    width = max(map(len, s["artifacts"]))
    out += ["Artifacts", *(f"  {k:<{width}}  {v}" for k, v in s["artifacts"].items())]
    return "\n".join(out)


def main_demo(argv: list[str] | None = None) -> int:
    """Entry point of `tessera demo`; returns the exit status (2 for a usage error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = resolve(args)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    t0 = time.perf_counter()
    print(f"tessera demo: pipeline -> {cfg.output_dir} (device {cfg.device})", flush=True)
    from tessera.pipeline import run_pipeline
    from tessera.pipeline_data import RunMismatch

    try:
        summary = run_pipeline(cfg, progress=not args.no_progress, say=lambda text: print(text, flush=True))
    except (RunMismatch, FileNotFoundError, ValueError) as exc:
        print(f"tessera demo: {exc}", file=sys.stderr)
        return 2
    summary["seconds"] = time.perf_counter() - t0
    print("\n" + format_summary(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main_demo())
