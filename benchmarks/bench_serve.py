"""Serving: tessera-serve vs Hugging Face `transformers` generate on the same weights, in one run.

Sections (each with its HF peer measured here, or stated as absent):
  decode   batch-1 decode tokens/s, and weight bytes per step over the measured copy bandwidth
           (roofline fraction), end to end through the engine (overlapped decode, its default, and
           step by step) and for the captured graph alone; HF generate with its dynamic and static caches.
  graphs   CUDA-graph decode == eager decode token for token; target-as-own-draft acceptance on the
           graph path.
  offline  N requests, input and output lengths uniform in [100, 1024], random ids, ignore_eos:
           output tokens/s vs HF generate at its best static batch size (HF runs one batch per size).
  online   Poisson arrivals at several rates: TTFT, TPOT, ITL p50/p99; HF peer: one request at a time
           (generate per request, FCFS) on a few requests at the lowest rate.
  spec     batch-1 speculative decoding: draft models (--draft, one or more; default a smaller random
           one), the target as its own draft, n-gram lookup; speedup over plain decode and acceptance;
           HF peer: assisted generation with the same drafts.

    source scripts/gpu-env.sh && python3 benchmarks/bench_serve.py --out $OUT      # H200, ~5 min
    python3 benchmarks/bench_serve.py --tiny                                       # CPU smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import measure_ceilings, median_seconds, persistent_variant, print_table, require_positive, write_result

from tessera.kernels import dense
from tessera.model import Transformer, persistent
from tessera.model.hf import export_hf
from tessera.serve.bench import BenchRequest, offline_throughput, online_latency, random_requests
from tessera.serve.engine import LLMEngine
from tessera.serve.loader import load_for_serving
from tessera.specs import EngineConfig, GenerateRequest, ModelConfig, SamplingParams, SpeculativeConfig


def sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()






def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads: every distinct parameter once (a tied embedding is the lm_head)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def make_engine(model: Transformer, args: argparse.Namespace, draft: Transformer | None = None,
                **cfg: Any) -> LLMEngine:
    base = dict(max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=8192,
                kv_cache_memory_fraction=0.6, kv_cache_bytes=2**28)
    base.update(cfg)
    return LLMEngine(model, None, EngineConfig(**base), draft_model=draft)


def generate_one(engine: LLMEngine, prompt: list[int], n: int, rid: str) -> tuple[list[int], float, Any]:
    """Greedy generation of n tokens; returns (tokens, decode tokens/s after the first token, metrics)."""
    engine.add_request(GenerateRequest(request_id=rid, prompt_token_ids=tuple(prompt),
                                       sampling=SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)))
    first = None
    out = None
    while engine.has_unfinished():
        for o in engine.step():
            if first is None and o.outputs[0].token_ids:
                first = time.perf_counter()
            out = o
    end = time.perf_counter()
    tokens = list(out.outputs[0].token_ids)
    return tokens, (len(tokens) - 1) / (end - first), out.metrics


# ---- Hugging Face peers ------------------------------------------------------------------------------

def hf_from(model: Transformer, workdir: Path, name: str, device: torch.device, dtype: torch.dtype):
    import transformers

    path = export_hf(model, workdir / name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).to(device=device, dtype=dtype).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf


@torch.inference_mode()
def hf_generate(hf, prompts: list[list[int]], new_tokens: int, cuda: bool, **kw: Any) -> float:
    """Seconds for one static batch (left-padded), generating exactly `new_tokens` per row."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts], device=hf.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=hf.device)
    sync(cuda)
    t0 = time.perf_counter()
    hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, **kw)
    sync(cuda)
    return time.perf_counter() - t0


def _token_stamps():
    """A `transformers` streamer that records when each generated token is handed over."""
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: torch.Tensor) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    return Stamps()


def hf_decode_tok_s(hf, prompt: list[int], n: int, cuda: bool, **kw: Any) -> float:
    """Decode tokens/s from the first generated token to the last. The warm-up generates the same
    number of tokens, so a static cache of that size (and any compilation `transformers` does for it)
    exists before the timed call."""
    hf_generate(hf, [prompt], n, cuda, **kw)
    stamps = _token_stamps()
    hf_generate(hf, [prompt], n, cuda, streamer=stamps, **kw)
    times = stamps.times[1:]  # the first put is the prompt
    return (len(times) - 1) / (times[-1] - times[0])


# ---- sections ------------------------------------------------------------------------------------------

def section_decode(model, hf, args, ceil, cuda, rows, results) -> None:
    prompt = random_requests(1, (args.decode_prompt, args.decode_prompt), (1, 1), model.config.vocab_size, 1)[0]
    engine = make_engine(model, args)
    generate_one(engine, prompt.prompt_token_ids, 16, "warm")
    rates = [generate_one(engine, prompt.prompt_token_ids, args.decode_tokens, f"d{i}")[1] for i in range(3)]
    ours = statistics.median(rates)
    overlapped = engine.overlapped_steps
    engine.overlap = False  # the same engine reading each step's tokens before launching the next
    serial = statistics.median(generate_one(engine, prompt.prompt_token_ids, args.decode_tokens, f"s{i}")[1]
                               for i in range(3))
    engine.overlap = True
    wbytes = weight_bytes(model)
    roof = ceil["copy_bytes_per_s"] / wbytes
    res: dict[str, Any] = {"weight_bytes": wbytes, "roofline_tok_s": roof, "engine_tok_s": ours,
                           "engine_roofline_fraction": ours / roof, "engine_overlapped_steps": overlapped,
                           "engine_step_by_step_tok_s": serial, "graph_error": engine.runner.graph_error}
    rows.append({"what": "batch-1 decode, engine", "tok/s": ours, "roofline": ours / roof})
    rows.append({"what": "batch-1 decode, engine step by step", "tok/s": serial, "roofline": serial / roof})
    graphs = engine.runner.graphs
    if graphs is not None:
        step = median_seconds(lambda: graphs.graphs[1].replay(), 50, 5, cuda)
        res.update(graph_step_ms=step * 1e3, graph_roofline_fraction=(1 / step) / roof)
        res["decode_projections"] = dense.choices()  # cuBLAS or the GEMV kernel, per projection shape
        rows.append({"what": "batch-1 decode, graph replay only", "tok/s": 1 / step, "roofline": (1 / step) / roof})
        if args.pdl_modes:
            from tessera.kernels.triton import pdl

            res["pdl_mode"] = pdl.mode()
            res["graph_by_pdl_mode"] = by_mode = {}
            for mode in dict.fromkeys(args.pdl_modes):  # graphs keep the mode they were captured in
                previous = pdl.set_mode(mode)
                try:
                    other = make_engine(model, args, max_num_seqs=1, cuda_graph_batch_sizes=(1,))
                    replay = other.runner.graphs.graphs[1].replay
                    mode_step = median_seconds(replay, 50, 5, cuda)
                finally:
                    pdl.set_mode(previous)
                del other
                free_memory()
                by_mode[mode] = {"graph_step_ms": mode_step * 1e3, "tok_s": 1 / mode_step,
                                 "roofline_fraction": (1 / mode_step) / roof}
                rows.append({"what": f"batch-1 decode, graph replay, PDL mode {mode}", "tok/s": 1 / mode_step,
                             "roofline": (1 / mode_step) / roof})
        # The same graph with a fusion switched the other way, its effect in this process: the decode step's
        # rope, KV write and paged decode in one launch (`attention.decode_paged_rope`) or three, each
        # chained norm inside the q/k/v and gate/up GEMVs or a launch of its own, and every decoder layer in
        # one persistent launch (`tessera.model.persistent`). All three are off by default.
        from tessera.attn import paged_cache
        from tessera.model import layers

        # (module, switch, JSON key and row label with it on, the same with it off)
        for module, flag, on, off in (
                (paged_cache, "FUSED_DECODE", ("fused_decode", "rope/write/decode fused"),
                 ("unfused_decode", "rope/write/decode unfused")),
                (layers, "FUSED_NORMS", ("fused_norms", "norms fused"), ("unfused_norms", "norms unfused")),
                (persistent, "PERSISTENT_DECODE", ("persistent", "layers in one persistent launch"),
                 ("per_op", "layers launched per op"))):
            default = getattr(module, flag)
            key, label = off if default else on
            setattr(module, flag, not default)
            other = None
            try:
                other = make_engine(model, args, max_num_seqs=1, cuda_graph_batch_sizes=(1,))
                step = median_seconds(other.runner.graphs.graphs[1].replay, 50, 5, cuda)
                failures, engine_rate, ran = 0, None, None
                if flag == "PERSISTENT_DECODE":  # and the engine end to end, as the headline figure
                    generate_one(other, prompt.prompt_token_ids, 16, "pwarm")
                    engine_rate = statistics.median(
                        generate_one(other, prompt.prompt_token_ids, args.decode_tokens, f"p{i}")[1]
                        for i in range(3))
                    failures = persistent.barrier_failures(model)
                    # whether the launch was built (persistent.reasons refuses a step it cannot take, which
                    # then runs per op: a figure that would be the default's under another name)
                    ran = persistent.launch_built(other.runner.cache)
            except Exception as exc:  # an experimental path that fails is reported, not fatal to the run
                if flag != "PERSISTENT_DECODE":
                    raise
                res[f"graph_{key}_error"] = repr(exc)
                continue
            finally:
                setattr(module, flag, default)
                del other
                free_memory()
            res[f"graph_{key}"] = {"graph_step_ms": step * 1e3, "tok_s": 1 / step,
                                   "roofline_fraction": (1 / step) / roof}
            if failures:
                res[f"graph_{key}"]["barrier_failures"] = failures
            if ran is not None:
                res[f"graph_{key}"]["launch_ran"] = ran
            rows.append({"what": f"batch-1 decode, graph replay, {label}", "tok/s": 1 / step,
                         "roofline": (1 / step) / roof})
            if engine_rate is not None:
                res[f"engine_{key}_tok_s"] = engine_rate
                rows.append({"what": f"batch-1 decode, engine, {label}", "tok/s": engine_rate,
                             "roofline": engine_rate / roof})
        # the persistent launch's tuning variants (`persistent.OPTIONS`), graph replay only, beside its default
        if "graph_persistent" in res and args.persistent_variants:
            res["graph_persistent_variants"] = variants = {}
            saved = persistent.PERSISTENT_DECODE, persistent.OPTIONS
            for text in args.persistent_variants:
                persistent.PERSISTENT_DECODE, persistent.OPTIONS = True, persistent.parse_options(text)
                other = None
                try:
                    other = make_engine(model, args, max_num_seqs=1, cuda_graph_batch_sizes=(1,))
                    step = median_seconds(other.runner.graphs.graphs[1].replay, 50, 5, cuda)
                    variants[text] = {"graph_step_ms": step * 1e3, "tok_s": 1 / step,
                                      "roofline_fraction": (1 / step) / roof,
                                      "barrier_failures": persistent.barrier_failures(model),
                                      "launch_ran": persistent.launch_built(other.runner.cache)}
                    if persistent.OPTIONS.get("TIMED"):  # where the last replay's time went, phase by phase
                        variants[text]["phase_profile"] = profile = persistent.phase_profile(model)
                        print(f"persistent {text}: phase profile {json.dumps(profile)}", flush=True)
                    rows.append({"what": f"batch-1 decode, graph replay, persistent {text}", "tok/s": 1 / step,
                                 "roofline": (1 / step) / roof})
                except Exception as exc:  # reported, not fatal, as the default launch's error
                    variants[text] = {"error": repr(exc)}
                finally:
                    persistent.PERSISTENT_DECODE, persistent.OPTIONS = saved
                    del other
                    free_memory()
    if hf is not None:
        modes = (("dynamic", {}), ("static", {"cache_implementation": "static"}))
        for mode, kw in (m for m in modes if m[0] in args.hf_decode_modes):
            try:
                tok_s = hf_decode_tok_s(hf, prompt.prompt_token_ids, args.decode_tokens, cuda, **kw)
            except Exception as exc:  # an HF cache mode this version cannot run is reported, not fatal
                res[f"hf_{mode}_error"] = repr(exc)
                continue
            res[f"hf_{mode}_tok_s"] = tok_s
            rows.append({"what": f"batch-1 decode, HF {mode} cache", "tok/s": tok_s, "roofline": tok_s / roof})
        best = max((v for k, v in res.items() if k.startswith("hf_") and k.endswith("_tok_s")), default=None)
        if best:
            res["speedup_vs_hf_best"] = ours / best
    results["decode"] = res
    del engine
    free_memory()


def section_graphs(model, args, cuda, rows, results) -> None:
    prompts = [r.prompt_token_ids for r in random_requests(4, (16, 64), (1, 1), model.config.vocab_size, 2)]
    n = args.graph_tokens
    eager = make_engine(model, args, enforce_eager=True, max_num_seqs=8)
    want = [generate_one(eager, p, n, f"e{i}")[0] for i, p in enumerate(prompts)]
    del eager
    free_memory()
    graph = make_engine(model, args, max_num_seqs=8)
    got = [generate_one(graph, p, n, f"g{i}")[0] for i, p in enumerate(prompts)]
    graphs_on = graph.runner.graphs is not None
    del graph
    free_memory()
    spec = SpeculativeConfig(method="draft", draft_model="self", num_speculative_tokens=args.spec_tokens)
    selfdraft = make_engine(model, args, draft=model, max_num_seqs=8, speculative=spec)
    metrics = [generate_one(selfdraft, p, n, f"s{i}")[2] for i, p in enumerate(prompts)]
    draft_graphs = selfdraft.proposer.runner.graphs is not None
    del selfdraft
    free_memory()
    same = sum(a == b for a, b in zip(want, got))
    acc = sum(m.spec_accepted_tokens for m in metrics) / max(1, sum(m.spec_draft_tokens for m in metrics))
    results["graphs"] = {"cuda_graphs": graphs_on, "sequences_equal": same, "sequences": len(prompts),
                         "tokens_each": n, "self_draft_acceptance": acc, "draft_used_graphs": draft_graphs}
    rows.append({"what": f"graph == eager ({'graphs' if graphs_on else 'no graphs: eager both'})",
                 "tok/s": None, "roofline": None, "note": f"{same}/{len(prompts)} sequences equal"})
    rows.append({"what": "self-draft acceptance", "tok/s": None, "roofline": None, "note": f"{acc:.3f}"})


def section_offline(model, hf, args, ceil, cuda, rows, results) -> None:
    reqs = random_requests(args.num_requests, args.lengths, args.lengths, model.config.vocab_size, 3)
    engine = make_engine(model, args)
    offline_throughput(engine, reqs[: min(8, len(reqs))], progress=False)  # warm-up
    res = offline_throughput(engine, reqs)
    cfg = model.config
    flops_per_token = 2 * cfg.num_params(include_embeddings=False) + 2 * cfg.vocab_size * cfg.d_model
    res["mfu"] = res["total_tok_s"] * flops_per_token / ceil["bf16_mm_flops"]
    rows.append({"what": f"offline {len(reqs)} requests, engine", "tok/s": res["output_tok_s"], "roofline": None,
                 "note": f"{res['preemptions']} preemptions, MFU {res['mfu']:.2f}"})
    results["offline"] = res
    del engine
    free_memory()
    if hf is None:
        return
    hf_res = {}
    for bs in args.hf_batch_sizes:
        batch = reqs[:bs]
        new = max(r.max_tokens for r in batch)
        try:
            seconds = hf_generate(hf, [r.prompt_token_ids for r in batch], new, cuda)
        except torch.OutOfMemoryError as exc:
            hf_res[f"bs{bs}_error"] = repr(exc)
            free_memory()
            continue
        useful = sum(r.max_tokens for r in batch)
        hf_res[f"bs{bs}"] = {"requests": len(batch), "seconds": seconds, "output_tok_s": useful / seconds}
        rows.append({"what": f"offline HF static batch {bs} ({len(batch)} requests)", "tok/s": useful / seconds,
                     "roofline": None})
    best = max((v["output_tok_s"] for v in hf_res.values() if isinstance(v, dict)), default=None)
    if best:
        hf_res["best_output_tok_s"] = best
        res["speedup_vs_hf_best"] = res["output_tok_s"] / best
    results["offline_hf"] = hf_res


def section_online(model, hf, args, cuda, rows, results) -> None:
    reqs = random_requests(args.online_requests, args.lengths, args.lengths, model.config.vocab_size, 4)
    engine = make_engine(model, args)
    out = []
    for rate in args.rates:
        r = online_latency(engine, reqs, rate)
        out.append(r)
        rows.append({"what": f"online {rate:g} req/s, engine", "tok/s": r["output_tok_s"], "roofline": None,
                     "note": f"TTFT {r['ttft_ms_p50']:.0f}/{r['ttft_ms_p99']:.0f} TPOT {r['tpot_ms_p50']:.1f}/"
                             f"{r['tpot_ms_p99']:.1f} ITL {r['itl_ms_p50']:.1f}/{r['itl_ms_p99']:.1f} ms p50/p99"})
    results["online"] = out
    del engine
    free_memory()
    if hf is not None and args.hf_online_requests:
        results["online_hf"] = hf_online(hf, reqs[: args.hf_online_requests], min(args.rates), cuda)
        r = results["online_hf"]
        n_hf = len(reqs[: args.hf_online_requests])
        rows.append({"what": f"online {min(args.rates):g} req/s, HF one at a time ({n_hf} requests)",
                     "tok/s": r["output_tok_s"], "roofline": None,
                     "note": f"TTFT {r['ttft_ms_p50']:.0f}/{r['ttft_ms_p99']:.0f} TPOT {r['tpot_ms_p50']:.1f}/"
                             f"{r['tpot_ms_p99']:.1f} ms p50/p99"})


def hf_online(hf, reqs: list[BenchRequest], rate: float, cuda: bool) -> dict[str, float]:
    """HF generate serving requests one at a time in arrival order (a streamer marks token times)."""
    import random

    rng = random.Random(0)
    t, arrivals = 0.0, []
    for _ in reqs:
        t += rng.expovariate(rate)
        arrivals.append(t)
    start = time.perf_counter()
    ttft, tpot, tokens = [], [], 0
    for arrival, r in zip(arrivals, reqs):
        wait = start + arrival - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        stamps = _token_stamps()
        ids = torch.tensor([r.prompt_token_ids], device=hf.device)
        with torch.inference_mode():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=r.max_tokens, do_sample=False,
                        streamer=stamps)
        sync(cuda)
        times = stamps.times[1:]  # the first put is the prompt
        ttft.append((times[0] - (start + arrival)) * 1e3)
        if len(times) > 1:
            tpot.append((times[-1] - times[0]) * 1e3 / (len(times) - 1))
        tokens += len(times)
    seconds = time.perf_counter() - start

    def pct(v: list[float], q: int) -> float:
        if len(v) < 2:
            return v[0] if v else float("nan")
        return statistics.quantiles(v, n=100, method="inclusive")[q - 1]

    return {"rate_req_s": rate, "requests": len(reqs), "seconds": seconds, "output_tok_s": tokens / seconds,
            "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99), "tpot_ms_p50": pct(tpot, 50),
            "tpot_ms_p99": pct(tpot, 99)}


def section_spec(model, drafts, hf, hf_drafts, args, cuda, rows, results, tokenizer=None, save=None) -> None:
    """Batch-1 speculative decoding against plain decode in the same process. `drafts`: (name, model)
    pairs, each measured with the draft chain and round by round (and at the --spec-sweep k's), each
    against HF assisted generation with the same draft when `hf_drafts` holds its HF copy. `save()`,
    when given, writes the results so far after each variant (a long run cut short keeps them)."""
    count = args.spec_prompts
    if args.spec_prompt_file:
        if tokenizer is None:
            raise SystemExit("--spec-prompt-file needs a --target checkpoint with a tokenizer.json")
        ids = tokenizer.encode(args.spec_prompt_file.read_text())
        if len(ids) < args.decode_prompt * count:
            raise SystemExit(f"--spec-prompt-file {args.spec_prompt_file}: {len(ids)} tokens, fewer than "
                             f"--spec-prompts {count} x the prompt's {args.decode_prompt}")
        # prompt j starts at the j-th of `count` evenly spaced offsets (prompt 0 at the file's start)
        stride = len(ids) // count
        prompts = [ids[j * stride:j * stride + args.decode_prompt] for j in range(count)]
        results["spec_prompt"] = (f"{count} prompt(s) of {args.decode_prompt} tokens of {args.spec_prompt_file}, "
                                  f"at token offsets {[j * stride for j in range(count)]}")
    else:
        prompts = [r.prompt_token_ids for r in random_requests(count, (args.decode_prompt, args.decode_prompt),
                                                               (1, 1), model.config.vocab_size, 5)]
    n, reps = args.spec_new_tokens, args.spec_repeats

    def timed(eng: LLMEngine) -> tuple[list[list[int]], float, list[float], list[float | None], float | None]:
        """Warm up, then `reps` passes over the prompts, n tokens each, one request at a time. Returns
        (each prompt's tokens, median over passes of the pass's decode tok/s (its tokens after each
        first token over their time), every pass's tok/s, each prompt's acceptance, overall acceptance)."""
        generate_one(eng, prompts[0], 16, "w")
        speeds, outs, drafted, accepted, per_prompt = [], [], 0, 0, []
        for r in range(reps):
            tokens, secs = 0, 0.0
            for j, p in enumerate(prompts):
                toks, tok_s, m = generate_one(eng, p, n, f"s{r}-{j}")
                tokens, secs = tokens + len(toks) - 1, secs + (len(toks) - 1) / tok_s
                if r == 0:
                    outs.append(toks)
                    drafted, accepted = drafted + m.spec_draft_tokens, accepted + m.spec_accepted_tokens
                    per_prompt.append(m.acceptance_rate)
            speeds.append(tokens / secs)
        return outs, statistics.median(speeds), speeds, per_prompt, accepted / drafted if drafted else None

    # Batch 1 throughout: engines capture only the batch-1 graphs, which also keeps the start-up tuning of
    # the decode GEMVs to the row counts a batch-1 round uses.
    base = make_engine(model, args, max_num_seqs=1)
    plain_tokens, plain, plain_runs, _, _ = timed(base)
    print(f"spec: plain decode {plain:.0f} tok/s", flush=True)
    del base
    free_memory()
    out = {"plain_tok_s": plain, "plain_tok_s_runs": plain_runs, "new_tokens": n, "k": args.spec_tokens,
           "repeats": reps, "prompts": count,
           "statistic": "median over repeats of a pass over the prompts, one batch-1 generation each; a pass's "
                        "tok/s is its decode tokens (after each first token) over their time"}
    results["speculative"] = out
    rows.append({"what": "batch-1 plain decode (spec baseline)", "tok/s": plain, "roofline": None})
    # A draft model's greedy rounds run as one draft chain (one wait for the device a round); the
    # "round by round" rows turn that off (a wait a draft token), as before the chain existed.
    variants = []
    for draft_name, draft in drafts:
        variants += [(f"draft ({draft_name})", "draft", draft, True),
                     (f"draft ({draft_name}), round by round", "draft", draft, False)]
    variants += [("target as own draft", "draft", model, True),
                 ("target as own draft, round by round", "draft", model, False),
                 ("n-gram lookup", "ngram", None, True)]
    variants = [(label, method, d, chained, args.spec_tokens) for label, method, d, chained in variants]
    # --spec-sweep: each draft model's chain rounds at other k as well (the best k depends on the pair)
    variants += [(f"draft ({draft_name}), k={k}", "draft", draft, True, k) for draft_name, draft in drafts
                 for k in args.spec_sweep if k != args.spec_tokens]
    for label, method, d, chained, k in variants:
        spec = SpeculativeConfig(method=method, draft_model="d" if method == "draft" else None,
                                 num_speculative_tokens=k)
        eng = make_engine(model, args, draft=d, max_num_seqs=1, speculative=spec)
        eng.chain_rounds = chained
        tokens, tok_s, speeds, per_prompt, acceptance = timed(eng)
        del eng
        free_memory()
        differ = [next((i for i, (a, b) in enumerate(zip(t, pt)) if a != b), None)
                  for t, pt in zip(tokens, plain_tokens)]
        out[label] = {"tok_s": tok_s, "tok_s_runs": speeds, "speedup": tok_s / plain,
                      "acceptance": acceptance, "acceptance_per_prompt": per_prompt,
                      "same_as_plain_greedy": tokens == plain_tokens,
                      "first_difference": differ if count > 1 else differ[0]}
        out[label]["k"] = k
        rows.append({"what": f"spec k={k}: {label.removesuffix(f', k={k}')}", "tok/s": tok_s, "roofline": None,
                     "note": f"speedup {tok_s / plain:.2f}x, acceptance {acceptance or 0:.2f}, "
                             f"greedy-equal {tokens == plain_tokens}"})
        print(f"spec: {label}: {tok_s:.0f} tok/s, {rows[-1]['note']}", flush=True)
        if save is not None:
            save()
    if hf is not None and hf_drafts:
        try:
            # one prompt (the first): HF's generate is too slow here for the whole set
            base_s = hf_generate(hf, [prompts[0]], n, cuda)
            for (draft_name, _), hf_draft in zip(drafts, hf_drafts):
                assisted_s = hf_generate(hf, [prompts[0]], n, cuda, assistant_model=hf_draft)
                key = "hf" if draft_name == drafts[0][0] else f"hf ({draft_name})"
                out[key] = {"plain_tok_s": n / base_s, "assisted_tok_s": n / assisted_s,
                            "speedup": base_s / assisted_s, "draft": draft_name, "prompts": 1}
                rows.append({"what": f"HF assisted generation ({draft_name})", "tok/s": n / assisted_s,
                             "roofline": None,
                             "note": f"speedup {base_s / assisted_s:.2f}x over HF plain {n / base_s:.0f} tok/s"})
        except Exception as exc:  # reported, the rest of the run stands
            out["hf_error"] = repr(exc)


SECTIONS = ("decode", "graphs", "offline", "online", "spec")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny model, seconds")
    p.add_argument("--out", type=Path, default=None, help="results directory (default benchmarks/results)")
    p.add_argument("--preset", default="qwen3-0.6b", help="target shape when --target is not given (random weights)")
    p.add_argument("--target", default=None, help="target model directory (default: random --preset weights)")
    p.add_argument("--draft", nargs="+", default=None, metavar="DIR",
                   help="draft model directories; spec measures each (default: a random model of 1/7 the "
                        "target's layers)")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--online-requests", type=int, default=64)
    p.add_argument("--hf-online-requests", type=int, default=3)
    p.add_argument("--rates", type=float, nargs="+", default=[4.0, 16.0, 64.0])
    p.add_argument("--hf-batch-sizes", type=int, nargs="+", default=[32, 128])
    p.add_argument("--spec-tokens", type=int, default=4)
    p.add_argument("--spec-sweep", type=int, nargs="+", default=[], metavar="K",
                   help="also measure the draft model's chain rounds at these numbers of draft tokens")
    p.add_argument("--spec-repeats", type=int, default=3,
                   help="timed generations per speculative variant and for its baseline; the median is reported")
    p.add_argument("--spec-prompts", type=int, default=1, metavar="N",
                   help="spec: prompts per pass, generated one after another (from N evenly spaced offsets of "
                        "--spec-prompt-file, or random); tok/s and acceptance cover them all")
    p.add_argument("--spec-prompt-file", type=Path, default=None,
                   help="spec: take the prompt from this text file through the target's tokenizer (default: "
                        "random ids)")
    p.add_argument("--skip-hf", action="store_true", help="no transformers peers")
    p.add_argument("--hf-decode-modes", nargs="+", default=["dynamic", "static"], choices=["dynamic", "static"],
                   help="HF cache modes timed in the decode section (static compiles on its first call)")
    p.add_argument("--decode-tokens", type=int, default=None, help="tokens per timed batch-1 decode (default 256)")
    p.add_argument("--pdl-modes", type=int, nargs="+", default=[], choices=(0, 1, 2, 3, 4), metavar="MODE",
                   help="decode: also capture the batch-1 graph in these PDL modes (docs/kernels.md) and time its "
                        "replay, in the same process with the same tuned kernels (GPU only)")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS,
                   help="which sections to run, in this order (default: all)")
    p.add_argument("--persistent-variants", nargs="*", default=["DEPTH=2"], type=persistent_variant,
                   metavar="KEY=VALUE[,KEY=VALUE]",
                   help="decode: also time the persistent launch's graph with these tunings (tessera.model."
                        f"persistent.TUNABLE: {', '.join(persistent.TUNABLE)}; default: DEPTH=2; none: no values)")
    args = p.parse_args()
    if args.draft and len(set(args.draft)) < len(args.draft):
        p.error(f"--draft: a directory is named twice in {args.draft}")
    require_positive(p, args, "spec_prompts", "spec_repeats", "spec_tokens")
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.tiny:
        args.preset, args.num_requests, args.online_requests, args.hf_online_requests = "tiny-student", 12, 8, 2
        args.rates, args.hf_batch_sizes = [20.0], [4, 12]
        args.lengths, args.max_model_len, args.max_num_seqs = (8, 32), 128, 16
        args.decode_prompt, args.decode_tokens, args.graph_tokens, args.spec_new_tokens = 16, 24, 12, 24
        torch.set_num_threads(1)
    else:
        args.lengths, args.max_model_len, args.max_num_seqs = (100, 1024), 2048, 256
        args.decode_prompt, args.graph_tokens, args.spec_new_tokens = 128, 64, 256
        args.decode_tokens = args.decode_tokens or 256
    torch.manual_seed(0)
    if args.target:
        model, tokenizer = load_for_serving(args.target, device=device, dtype=dtype)
        target_name = args.target
    else:
        model = Transformer(ModelConfig.preset(args.preset)).to(device=device, dtype=dtype).eval()
        target_name, tokenizer = f"{args.preset} (random weights)", None
    if args.draft:
        drafts = [(path, load_for_serving(path, device=device, dtype=dtype)[0]) for path in args.draft]
    else:
        cfg = model.config.model_copy(update={"n_layers": max(1, model.config.n_layers // 7)})
        drafts = [(f"{cfg.n_layers}-layer random", Transformer(cfg).to(device=device, dtype=dtype).eval())]
    for path, draft in drafts:
        if draft.config.vocab_size != model.config.vocab_size:
            raise SystemExit(f"--draft {path}: vocab_size {draft.config.vocab_size} differs from the target's "
                             f"{model.config.vocab_size}")
    # A checkpoint trained on short windows (the distill pair: 512) caps the engine's context.
    context = min(model.config.max_seq_len, *(d.config.max_seq_len for _, d in drafts))
    if args.max_model_len > context:
        args.max_model_len = context
        args.lengths = tuple(min(v, context // 2) for v in args.lengths)
        args.decode_prompt = min(args.decode_prompt, context // 4)
        args.spec_new_tokens = min(args.spec_new_tokens,
                                   context - args.decode_prompt - max(args.spec_tokens, *args.spec_sweep) - 1)
    ceil = measure_ceilings(device, cuda, args.tiny)
    results: dict[str, Any] = {"target": target_name, "draft": ", ".join(name for name, _ in drafts),
                               "dtype": str(dtype).removeprefix("torch."),
                               "ceilings": ceil}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        hf, hf_drafts = None, []
        if not args.skip_hf:
            hf = hf_from(model, Path(tmp), "target", device, dtype)
            hf_drafts = [hf_from(d, Path(tmp), f"draft{i}", device, dtype) for i, (_, d) in enumerate(drafts)]
            import transformers

            results["transformers"] = transformers.__version__
        t0 = time.perf_counter()
        sections = {
            "decode": lambda: section_decode(model, hf, args, ceil, cuda, rows, results),
            "graphs": lambda: section_graphs(model, args, cuda, rows, results),
            "offline": lambda: section_offline(model, hf, args, ceil, cuda, rows, results),
            "online": lambda: section_online(model, hf, args, cuda, rows, results),
            "spec": lambda: section_spec(model, drafts, hf, hf_drafts, args, cuda, rows, results, tokenizer,
                                         save=lambda: write_result("serve", results, args.out)),
        }
        title = (f"tessera-serve vs transformers: {target_name}, {results['dtype']}, copy "
                 f"{ceil['copy_bytes_per_s'] / 1e9:.0f} GB/s, mm {ceil['bf16_mm_flops'] / 1e12:.0f} TFLOP/s")
        for name in args.sections:
            start = time.perf_counter()
            sections[name]()
            results.setdefault("section_seconds", {})[name] = time.perf_counter() - start
            results["seconds"] = time.perf_counter() - t0
            # report as each section ends, so a run cut short still leaves what it measured
            table = [{"what": r["what"], "tok/s": r.get("tok/s"), "roofline": r.get("roofline"),
                      "note": r.get("note", "")} for r in rows]
            print_table(table, title=f"{title} (after {name}, {results['seconds']:.0f}s)")
            path = write_result("serve", results, args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
