"""Where a batch-1 decode step spends its time: the engine's captured CUDA graph and HF `generate`,
each under `torch.profiler`, as tables of the top kernels / host ops. A diagnosis tool for
`bench_serve.py`'s decode section, not a benchmark (profiling perturbs timings).

    source scripts/gpu-env.sh && python3 benchmarks/profile_decode.py --out $OUT
    python3 benchmarks/profile_decode.py --tiny          # CPU smoke run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result

from tessera.model import Transformer
from tessera.model.hf import export_hf
from tessera.serve.engine import LLMEngine
from tessera.specs import EngineConfig, GenerateRequest, ModelConfig, SamplingParams


def top(prof: profile, cuda: bool, n: int) -> list[dict]:
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    rows = []
    for e in sorted(prof.key_averages(), key=lambda e: -getattr(e, key))[:n]:
        rows.append({"name": e.key[:90], "calls": e.count, "self_us": getattr(e, key),
                     "cpu_us": e.self_cpu_time_total})
    return rows


def show(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    for r in rows:
        print(f"  {r['self_us']:10.0f} us  {r['calls']:6d}x  cpu {r['cpu_us']:9.0f} us  {r['name']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="qwen3-0.6b")
    p.add_argument("--steps", type=int, default=20, help="decode steps profiled")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    preset = "tiny-student" if args.tiny else args.preset
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(preset)).to(device=dev, dtype=dtype).eval()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    result: dict = {"preset": preset, "steps": args.steps}
    engine = LLMEngine(model, None, EngineConfig(max_model_len=256 if args.tiny else 2048, max_num_seqs=8,
                                                  kv_cache_memory_fraction=0.3, cuda_graph_batch_sizes=(1, 2, 4, 8)))
    prompt = tuple(range(1, 129))

    def run_engine(n: int) -> float:
        engine.add_request(GenerateRequest(request_id=str(time.perf_counter()), prompt_token_ids=prompt,
                                           sampling=SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)))
        engine.step()  # prefill
        t0 = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        return (time.perf_counter() - t0) / max(1, n - 1)

    run_engine(8)
    result["engine_step_ms"] = run_engine(64) * 1e3
    with profile(activities=acts) as prof:
        run_engine(args.steps)
    result["engine"] = top(prof, cuda, args.top)
    show(f"engine decode, {args.steps} steps ({result['engine_step_ms']:.3f} ms/step unprofiled)", result["engine"])
    if engine.runner.graphs is not None:
        g = engine.runner.graphs.graphs[1]
        with profile(activities=acts) as prof:
            for _ in range(args.steps):
                g.replay()
            torch.cuda.synchronize()
        result["graph"] = top(prof, cuda, args.top)
        show(f"graph replay x{args.steps}", result["graph"])
    engine = None  # free its KV cache before HF loads
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(model, Path(tmp) / "hf"))
    hf = hf.to(device=dev, dtype=dtype).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    result["hf_attn"] = hf.config._attn_implementation
    ids = torch.tensor([prompt], device=dev)

    @torch.inference_mode()
    def gen(n: int) -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    gen(4)
    result["hf_generate_step_ms"] = (gen(33) - gen(1)) / 32 * 1e3

    @torch.inference_mode()
    def forward_loop(n: int) -> float:
        past = None
        x = ids
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            out = hf(x, past_key_values=past, use_cache=True)
            past = out.past_key_values
            x = out.logits[:, -1:].argmax(-1)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    forward_loop(4)
    result["hf_forward_step_ms"] = (forward_loop(33) - forward_loop(1)) / 32 * 1e3
    print(f"\nHF ({result['hf_attn']}): generate {result['hf_generate_step_ms']:.2f} ms/token, "
          f"bare forward loop {result['hf_forward_step_ms']:.2f} ms/token")
    with profile(activities=acts) as prof:
        gen(args.steps)
    result["hf"] = top(prof, cuda, args.top)
    result["hf_cpu"] = top(prof, False, args.top)
    show(f"HF generate {args.steps} tokens (device time)", result["hf"])
    show(f"HF generate {args.steps} tokens (host time)", result["hf_cpu"])
    print(f"wrote {write_result('profile-decode', result, args.out)}")


if __name__ == "__main__":
    main()
