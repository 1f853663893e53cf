"""`tessera generate` and `tessera bench`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tessera.specs import EngineConfig, ModelConfig, SamplingParams, SpeculativeConfig


def _engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--config", type=Path, default=None,
                   help="EngineConfig as YAML or JSON; the flags below override only the fields they are given for")
    g.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--num-blocks", type=int, default=None, help="KV blocks (default: sized from memory)")
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    g.add_argument("--quant", default=None, help="quantize at load: int8, int4_rtn or fp8")
    s = p.add_argument_group("speculative decoding")
    how = s.add_mutually_exclusive_group()
    how.add_argument("--draft", default=None, help="draft model directory (same vocabulary; a shallow distilled "
                     "student pays off most)")
    how.add_argument("--ngram", action="store_true", help="n-gram prompt-lookup drafting (no draft model)")
    s.add_argument("--num-speculative-tokens", type=int, default=4)


_FLAG_FIELDS = ("device", "dtype", "max_model_len", "max_num_seqs", "num_blocks", "enforce_eager")


def _config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> EngineConfig:
    """`--config` (if any), then every flag the user changed from its default; a bad value is a usage
    error naming the field."""
    try:
        return _build_config(args, parser)
    except ValueError as exc:  # pydantic's ValidationError included
        parser.error(str(exc))


def _build_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> EngineConfig:
    fields = EngineConfig.load(args.config).model_dump() if args.config else {}
    for name in _FLAG_FIELDS:
        value = getattr(args, name)
        if value != parser.get_default(name) or not args.config:
            fields[name] = value
    if args.draft or args.ngram:  # --num-speculative-tokens (default 4) applies with one of them
        fields["speculative"] = SpeculativeConfig.from_flags(
            fields.get("speculative"), draft=args.draft, ngram=args.ngram,
            num_speculative_tokens=args.num_speculative_tokens).model_dump()
    return EngineConfig.model_validate(fields)


def main_generate(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="tessera generate", description="Generate text offline from a tessera or "
                                "Hugging Face model directory (continuous batching over all prompts).")
    p.add_argument("--model", required=True, help="model directory (modelcard.json or config.json)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--n", type=int, default=1, help="completions per prompt")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON RequestOutput per line")
    _engine_args(p)
    args = p.parse_args(argv)
    from tessera.serve.llm import LLM

    llm = LLM(args.model, quant=args.quant, config=_config(args, p))
    prompts = args.prompt
    if args.chat:
        if llm.tokenizer is None:
            p.error(f"--chat needs a tokenizer; {args.model} has no tokenizer.json")
        prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": x}]) for x in prompts]
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                              seed=args.seed, n=args.n, stop=tuple(args.stop))
    for out in llm.generate(prompts, sampling):
        if args.json:
            print(out.to_json(indent=None))
            continue
        for c in out.outputs:
            print(f"--- {out.prompt!r} [{c.index}] ({len(c.token_ids)} tokens, {c.finish_reason})")
            print(c.text if llm.tokenizer is not None else " ".join(map(str, c.token_ids)))
        rate = out.metrics.acceptance_rate if out.metrics else None
        if rate is not None:
            print(f"    speculative acceptance {rate:.2f}")
    return 0


def main_bench(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="tessera bench", description="Serving throughput (offline) and latency "
                                "(Poisson arrivals) on random token ids. Full comparison with HF transformers "
                                "and roofline figures: benchmarks/bench_serve.py.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model directory")
    src.add_argument("--preset", help=f"random weights of a ModelConfig preset: {', '.join(ModelConfig.presets())}")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--input-len", type=int, nargs=2, default=(100, 1024), metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=(100, 1024), metavar=("MIN", "MAX"))
    p.add_argument("--rate", type=float, action="append", default=[], help="online arrival rate, req/s (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    _engine_args(p)
    args = p.parse_args(argv)
    import torch

    from tessera.model import Transformer
    from tessera.serve.bench import offline_throughput, online_latency, random_requests
    from tessera.serve.engine import LLMEngine, resolve_device
    from tessera.serve.llm import LLM
    from tessera.serve.loader import serving_dtype

    config = _config(args, p)
    if args.model:
        engine = LLM(args.model, quant=args.quant, config=config).engine
    else:
        device = resolve_device(config.device)
        model = Transformer(ModelConfig.preset(args.preset)).to(device=device, dtype=serving_dtype(config, device))
        engine = LLMEngine(model, None, config, model_name=args.preset)
    torch.manual_seed(0)
    half = (engine.max_model_len - 1) // 2  # so that any prompt + output fits the context

    def clip(r: tuple[int, int]) -> tuple[int, int]:
        return min(r[0], half), min(r[1], half)

    reqs = random_requests(args.num_requests, clip(args.input_len), clip(args.output_len), engine.vocab_size)
    results = {"offline": offline_throughput(engine, reqs)}
    print(json.dumps(results["offline"], indent=2))
    for rate in args.rate:
        results[f"online_{rate:g}"] = online_latency(engine, reqs, rate)
        print(json.dumps(results[f"online_{rate:g}"], indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0

