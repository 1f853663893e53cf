"""Transformer forward speed: tessera vs Hugging Face `transformers` on the same weights.

Prefill: one forward over `[B, T]` tokens (no cache), tokens/s and achieved FLOP/s as a fraction of a
measured bf16 matmul ceiling. Decode: one token per sequence over a paged cache of `context` tokens
(tessera `PagedKVContext`) vs HF's `DynamicCache`; the time per step and the bytes a step must read
(weights + KV) over a measured device-copy bandwidth. The registry backend that ran each op is listed,
and the max |logit| difference to HF confirms both ran the same model.

    source scripts/gpu-env.sh && python3 benchmarks/bench_model.py --out $OUT   # H200, ~2 min
    python3 benchmarks/bench_model.py --tiny                                    # CPU smoke run, seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import measure_ceilings, median_seconds, print_table, write_result

from tessera.attn import PagedAttentionMetadata, PagedKVCache, PagedKVContext
from tessera.kernels import registry
from tessera.model import Transformer
from tessera.specs import KVCacheHandle, KVCacheSpec, ModelConfig


def hf_model(cfg: ModelConfig, state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype):
    import transformers

    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        intermediate_size=cfg.d_ff, rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.max_seq_len,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
        rope_scaling=None if cfg.rope_scaling is None else {
            "rope_type": cfg.rope_scaling.type, "factor": cfg.rope_scaling.factor,
            "low_freq_factor": cfg.rope_scaling.low_freq_factor,
            "high_freq_factor": cfg.rope_scaling.high_freq_factor,
            "original_max_position_embeddings": cfg.rope_scaling.original_max_position_embeddings},
        attn_implementation="sdpa")
    with torch.device(device):
        model = transformers.LlamaForCausalLM(hf_cfg).to(dtype)
    model.load_state_dict(state)  # tessera's names are HF's: a key mismatch fails here
    return model.eval()


def flops_per_token(cfg: ModelConfig, context: int) -> float:
    """Matmul FLOPs of one token: 2 x (non-embedding params + lm_head) plus attention scores and values."""
    linear = cfg.num_params(include_embeddings=False) + cfg.vocab_size * cfg.d_model
    attn = 2 * cfg.n_layers * cfg.n_heads * cfg.head_dim * context
    return 2 * linear + 2 * attn


def paged_steps(cfg: ModelConfig, batch: int, context: int, steps: int, block_size: int,
                device: torch.device, dtype: torch.dtype):
    """A paged cache holding `batch` sequences of `context` tokens (random block order) and the
    metadata of `steps` decode steps after it."""
    per_seq = -(-(context + steps) // block_size)
    spec = KVCacheSpec(n_layers=cfg.n_layers, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                       block_size=block_size, num_blocks=batch * per_seq, dtype=str(dtype).removeprefix("torch."))
    cache = PagedKVCache(spec, device)
    for layer in range(cfg.n_layers):
        cache.k[layer].normal_()
        cache.v[layer].normal_()
    order = torch.randperm(batch * per_seq).tolist()
    tables = [tuple(order[i * per_seq:(i + 1) * per_seq]) for i in range(batch)]
    metas = []
    for s in range(steps):
        handles = [KVCacheHandle(seq_id=i, block_ids=tables[i], num_tokens=context + s + 1, block_size=block_size)
                   for i in range(batch)]
        metas.append(PagedAttentionMetadata.from_handles(handles, [1] * batch, device=device))
    return cache, metas


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None,
                        help="ModelConfig preset (default llama-3.2-1b; tiny-student with --tiny)")
    parser.add_argument("--prefill", default=None, help="B x T shapes, e.g. 1x2048,4x512")
    parser.add_argument("--decode-batch", type=int, default=None, help="sequences per decode step")
    parser.add_argument("--context", type=int, default=None, help="cached tokens per sequence before decoding")
    parser.add_argument("--steps", type=int, default=None, help="timed decode steps")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--tiny", action="store_true", help="small shapes, fp32, CPU allowed: a smoke run")
    parser.add_argument("--out", type=Path, default=None, help="directory for the JSON result")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda and not args.tiny else torch.float32
    cfg = ModelConfig.preset(args.preset or ("tiny-student" if args.tiny else "llama-3.2-1b"))
    prefill = [tuple(map(int, s.split("x"))) for s in (args.prefill or ("2x64" if args.tiny else "1x2048,8x512")
                                                         ).split(",")]
    batch = args.decode_batch or (4 if args.tiny else 32)
    context = args.context or (48 if args.tiny else 1024)
    steps = args.steps or (8 if args.tiny else 64)
    repeats, warmup = (3, 1) if args.tiny else (20, 3)

    torch.manual_seed(0)
    peak = measure_ceilings(device, cuda, args.tiny)
    with torch.device(device):
        ours = Transformer(cfg).to(dtype).eval()
    theirs = hf_model(cfg, ours.state_dict(), device, dtype)

    rows = []
    with torch.inference_mode():
        for b, t in prefill:
            ids = torch.randint(0, cfg.vocab_size, (b, t), device=device)
            diff = (ours(ids).float() - theirs(ids).logits.float()).abs().max().item()
            ours_s = median_seconds(lambda ids=ids: ours(ids), repeats, warmup, cuda)
            hf_s = median_seconds(lambda ids=ids: theirs(ids), repeats, warmup, cuda)
            flops = b * t * flops_per_token(cfg, t // 2)
            rows.append({"phase": "prefill", "shape": f"{b}x{t}", "tessera_ms": ours_s * 1e3, "hf_ms": hf_s * 1e3,
                         "hf/tessera": hf_s / ours_s, "tessera_tok_s": b * t / ours_s,
                         "frac_mm_peak": flops / ours_s / peak["bf16_mm_flops"], "max_logit_diff": diff})

        cache, metas = paged_steps(cfg, batch, context, steps, args.block_size, device, dtype)
        step_ids = torch.randint(0, cfg.vocab_size, (1, batch), device=device)
        positions = [torch.full((1, batch), context + s, device=device) for s in range(steps)]
        ours_times = []
        for s in range(steps):
            ctx = PagedKVContext(cache, metas[s])
            step = lambda ctx=ctx, s=s: ours(step_ids, positions=positions[s], kv=ctx)  # noqa: E731
            ours_times.append(median_seconds(step, 1, 0, cuda))
        hf_times = hf_decode_times(theirs, cfg, batch, context, steps, device, cuda)
        ours_s, hf_s = statistics.median(ours_times[1:]), statistics.median(hf_times[1:])
        elt = torch.tensor([], dtype=dtype).element_size()
        kv_bytes = 2 * cfg.n_layers * batch * (context + steps // 2) * cfg.n_kv_heads * cfg.head_dim * elt
        step_bytes = (cfg.num_params(include_embeddings=False) + cfg.vocab_size * cfg.d_model) * elt + kv_bytes
        rows.append({"phase": "decode", "shape": f"{batch}x1 @ctx {context}", "tessera_ms": ours_s * 1e3,
                     "hf_ms": hf_s * 1e3, "hf/tessera": hf_s / ours_s, "tessera_tok_s": batch / ours_s,
                     "frac_bw_peak": step_bytes / ours_s / peak["copy_bytes_per_s"], "max_logit_diff": None})

    backends = {op: registry.get(op, *example).backend for op, example in op_examples(cfg, device, dtype).items()}
    print_table(rows, title=f"{cfg.n_layers}-layer {args.preset or 'default'} ({cfg.num_params() / 1e6:,.0f}M params), "
                f"{str(dtype).removeprefix('torch.')} on {device}")
    print_table([{"op": k, "backend": v} for k, v in backends.items()], title="registry backends used")
    print_table([{"ceiling": k, "value": v} for k, v in peak.items()], title="measured ceilings")
    path = write_result("model", {"config": cfg.model_dump(mode="json"), "dtype": str(dtype), "rows": rows,
                                  "backends": backends, "ceilings": peak, "tiny": args.tiny}, args.out)
    print(f"\nwrote {path}")
    return 0


def hf_decode_times(model, cfg: ModelConfig, batch: int, context: int, steps: int, device: torch.device,
                    cuda: bool) -> list[float]:
    """Per-step seconds of HF decoding after a `context`-token prefill (DynamicCache)."""
    ids = torch.randint(0, cfg.vocab_size, (batch, context), device=device)
    out = model(ids, use_cache=True)
    cache = out.past_key_values
    step = torch.randint(0, cfg.vocab_size, (batch, 1), device=device)
    times = []
    for _ in range(steps):
        def run(cache=cache):
            return model(step, past_key_values=cache, use_cache=True)
        times.append(median_seconds(run, 1, 0, cuda))
    return times


def op_examples(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> dict[str, tuple]:
    """Small example inputs on the benchmark's device, to ask the registry which backend it picks."""
    hd, hq, hkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    q = torch.zeros(4, hq, hd, device=device, dtype=dtype)
    kv = torch.zeros(4, hkv, hd, device=device, dtype=dtype)
    k_cache = torch.zeros(2, 16, hkv, hd, device=device, dtype=dtype)
    tables = torch.zeros(2, 1, dtype=torch.int32, device=device)
    lens = torch.tensor([2, 2], dtype=torch.int32, device=device)
    cu = torch.tensor([0, 2, 4], dtype=torch.int32, device=device)
    x = torch.zeros(4, cfg.d_model, device=device, dtype=dtype)
    w = torch.ones(cfg.d_model, device=device, dtype=dtype)
    return {
        "rms_norm": (x, w, cfg.norm_eps),
        "attention.prefill": (q, kv, kv, cu, 2),
        "kv_cache.write": (kv, kv, k_cache, k_cache, torch.arange(4, device=device)),
        "attention.decode_paged": (q[:2], k_cache, k_cache, tables, lens),
        "attention.prefill_paged": (q, k_cache, k_cache, tables, cu, lens, 2),
    }


if __name__ == "__main__":
    raise SystemExit(main())
