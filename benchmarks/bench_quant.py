"""Quantization quality and speed, every method against the float model measured in the same run.

    python benchmarks/bench_quant.py --quality MODEL_DIR     # WikiText-2 test perplexity per method
    python benchmarks/bench_quant.py --speed                 # Llama-3.2-1B shape on the GPU
    python benchmarks/bench_quant.py --speed --tiny          # a small shape on CPU, in seconds

Quality: float, int8, FP8, RTN-int4 and AWQ-int4 copies of one checkpoint scored with the protocol
of ../shared/data/README.md (whole test file tokenized once with the model's tokenizer, non-
overlapping windows of the context length, token-level); RTN and AWQ int4 at each `--group-size`;
AWQ calibrates on `--calib-samples` windows spread over wikitext-2/valid.txt (never the test split).
Checks: int8 <= +0.5%, FP8 <= +1% over float, AWQ's increase <= 0.7x RTN's at each group size.

Speed: decode-step latency (one token per row against a FlatKVCache holding `--context` tokens,
CUDA-graphed) at batch 1 and 16, prefill tokens/s, and weight memory for bf16, int8, AWQ-int4 and
FP8 (random weights; AWQ calibrates on random tokens, so only its speed is meaningful), every model
with q/k/v and gate/up fused into one matmul each as the serving engine runs them (`--no-fuse`:
separate projections). Each row
states its ratio to bf16 and its fraction of the ceilings this script measures (device copy
bandwidth, bf16 torch.mm FLOP/s). Targets: int8 >= 1.5x and AWQ >= 2x bf16 decode at batch 1,
FP8 prefill >= 1.3x bf16.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import persistent_variant, print_table, write_result
from torch import nn

from tessera.attn import FlatKVCache, paged_cache
from tessera.kernels import dense, registry, shape_choice, static_weights
from tessera.model import Transformer, fuse_projections, layers, persistent
from tessera.model.fusion import route_decode_linears
from tessera.quant import QuantLinear, quantize
from tessera.serve.cuda_graphs import check_capturable
from tessera.specs import ModelConfig, QuantConfig

try:
    from tessera.kernels.triton import pdl
    from tessera.kernels.triton.quant_matmul import cuda_gemv_choices, gated_choices, normed_choices, rope_choices
except ImportError:  # no triton: the decode kernels have no PDL modes, nothing is gated, normalised or rotated
    pdl = None

    def rope_choices() -> dict:
        return {}

    def gated_choices() -> dict:
        return {}

    def normed_choices() -> dict:
        return {}

    def cuda_gemv_choices() -> dict:
        return {}

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
QUALITY_METHODS = ("int8", "fp8", "int4_rtn", "awq")
SPEED_METHODS = ("int8", "awq", "fp8")
TINY = dict(vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=256, max_seq_len=128,
            tie_embeddings=True)


# ---------------------------------------------------------------- quality

def group_sizes_for(model: nn.Module, wanted: list[int] | None) -> list[int]:
    """`wanted` (each must divide every decoder linear's in_features), or the largest of 128/64/32 that does."""
    ins = {m.in_features for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    fits = [g for g in (128, 64, 32) if all(k % g == 0 for k in ins)]
    if wanted:
        bad = [g for g in wanted if g not in fits]
        if bad:
            raise SystemExit(f"--group-size {bad} does not divide the layers' in_features {sorted(ins)}")
        return wanted
    if not fits:
        raise SystemExit(f"no int4 group size in (128, 64, 32) divides the layers' in_features {sorted(ins)}")
    return fits[:1]


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, window: int, batch: int, max_windows: int | None) -> float:
    """Token-level perplexity over non-overlapping `window`-token windows of `ids` (the tail is dropped)."""
    n = ids.numel() // window
    if max_windows:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"{ids.numel()} tokens do not fill one window of {window}")
    windows = ids[: n * window].view(n, window)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for chunk in windows.split(batch):
        chunk = chunk.to(device)
        logits = model(chunk[:, :-1]).float()
        nll += float(F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum"))
        count += chunk[:, 1:].numel()
    return math.exp(nll / count)


def calibration_windows(ids: torch.Tensor, samples: int, seq_len: int) -> torch.Tensor:
    """`samples` windows [n, seq_len] spread evenly over `ids` (every article of the file, not its first pages)."""
    n_windows = ids.numel() // seq_len
    if n_windows == 0:
        raise SystemExit(f"calibration text holds {ids.numel()} tokens, less than one window of {seq_len}")
    picks = torch.linspace(0, n_windows - 1, min(samples, n_windows)).round().long()
    return ids[: n_windows * seq_len].view(n_windows, seq_len)[picks]


def quality(args: argparse.Namespace) -> dict:
    from tessera.model import load_model

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model, tok = load_model(args.quality, device=device, dtype=dtype)
    if tok is None:
        raise SystemExit(f"{args.quality} has no tokenizer.json; perplexity needs the model's tokenizer")
    model.eval()
    window = args.window or model.config.max_seq_len
    test_path = args.data / "wikitext-2" / "test.txt"
    calib_path = args.calib_data or args.data / "wikitext-2" / "valid.txt"
    if calib_path.resolve() == test_path.resolve():
        raise SystemExit(f"--calib-data {calib_path} is the test split; calibrate on other text")
    test_ids = torch.tensor(tok.encode(test_path.read_text()))
    calib_len = min(args.calib_seq_len, model.config.max_seq_len)
    calib = calibration_windows(torch.tensor(tok.encode(calib_path.read_text())), args.calib_samples, calib_len)
    groups = group_sizes_for(model, args.group_size)
    configs = {"int8": QuantConfig(method="int8"), "fp8": QuantConfig(method="fp8")}
    for g in groups:
        configs[f"int4_rtn_g{g}"] = QuantConfig(method="int4_rtn", group_size=g)
        configs[f"awq_g{g}"] = QuantConfig(method="awq", group_size=g, calib_samples=calib.shape[0],
                                           calib_seq_len=calib_len)
    ppl = {"float": perplexity(model, test_ids, window, args.batch, args.max_windows)}
    seconds = {}
    for method, cfg in configs.items():
        t0 = time.perf_counter()
        q = quantize(copy.deepcopy(model), cfg, calib if cfg.method == "awq" else None, progress=not args.no_progress)
        seconds[method] = time.perf_counter() - t0
        ppl[method] = perplexity(q, test_ids, window, args.batch, args.max_windows)
        print(f"  {method}: perplexity {ppl[method]:.4f} (quantized in {seconds[method]:.0f} s)", flush=True)
        del q
    rise = {m: ppl[m] / ppl["float"] - 1 for m in configs}
    checks = {"int8 <= +0.5%": rise["int8"] <= 0.005, "fp8 <= +1%": rise["fp8"] <= 0.01}
    awq_over_rtn = {}
    for g in groups:
        rtn = rise[f"int4_rtn_g{g}"]
        awq_over_rtn[g] = rise[f"awq_g{g}"] / rtn if rtn > 0 else None
        checks[f"awq rise <= 0.7x rtn rise (group {g})"] = rise[f"awq_g{g}"] <= 0.7 * rtn
    rows = [{"method": m, "perplexity": p, "rise %": 100 * (p / ppl["float"] - 1),
             "vs rtn": awq_over_rtn.get(int(m.split("_g")[-1])) if m.startswith("awq") else None}
            for m, p in ppl.items()]
    n_tokens = min(test_ids.numel() // window, args.max_windows or 1 << 62) * window
    print_table(rows, f"WikiText-2 test perplexity ({args.dtype or dtype}, window {window}, {n_tokens} tokens, "
                      f"tokenizer {tok.vocab_size} BPE of {args.quality}; AWQ calibrated on {calib.shape[0]}x"
                      f"{calib_len} tokens of {calib_path.name})")
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    return {"quality": {"model": str(args.quality), "window": window, "tokens": n_tokens, "dtype": str(dtype),
                        "group_sizes": groups, "calibration": {"file": str(calib_path), "windows": calib.shape[0],
                                                               "seq_len": calib_len, "tokens": calib.numel()},
                        "configs": {m: c.model_dump() for m, c in configs.items()},
                        "perplexity": ppl, "rise": rise, "quantize_seconds": seconds, "checks": checks,
                        "awq_over_rtn": awq_over_rtn}}


# ---------------------------------------------------------------- speed

class Timer:
    """Median milliseconds of `fn` over `reps` runs after `warmup`: CUDA events on a GPU, perf_counter else."""

    def __init__(self, device: torch.device, warmup: int, reps: int) -> None:
        self.cuda = device.type == "cuda"
        self.warmup, self.reps = warmup, reps

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.reps):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times)


def ceilings(device: torch.device, timer: Timer, tiny: bool) -> dict[str, float]:
    """Measured peaks: device copy bandwidth (bytes/s, read + write) and bf16 (fp32 on CPU) mm FLOP/s."""
    n_bytes = (64 << 20) if tiny else (2 << 30)
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = timer(lambda: dst.copy_(src))
    n = 512 if tiny else 8192
    mm_dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=mm_dtype)
    b = torch.randn(n, n, device=device, dtype=mm_dtype)
    mm_ms = timer(lambda: a @ b)
    return {"bandwidth": 2 * n_bytes / (copy_ms * 1e-3), "flops": 2 * n**3 / (mm_ms * 1e-3)}


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of every stored tensor (tied ones once), and of the decoder layers' linears alone."""
    seen: set[int] = set()
    total = linears = 0
    for name, t in model.state_dict(keep_vars=True).items():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
        if ".layers." in name and "proj" in name:
            linears += t.numel() * t.element_size()
    return {"total": total, "linears": linears}


def step_bytes(model: nn.Module, cfg: ModelConfig, batch: int, context: int, dtype: torch.dtype) -> int:
    """Bytes one decode step must read: every weight except the embedding table (only `batch` rows of
    it are gathered, unless it is also the float lm_head), plus the KV cache."""
    sizes = weight_bytes(model)["total"]
    emb = model.model.embed_tokens.weight
    if not (cfg.tie_embeddings and isinstance(model.lm_head, nn.Linear)):
        sizes -= emb.numel() * emb.element_size()
    head_dim = cfg.head_dim or cfg.d_model // cfg.n_heads
    kv = 2 * cfg.n_layers * batch * context * cfg.n_kv_heads * head_dim * torch.finfo(dtype).bits // 8
    return sizes + kv


def decode_step(model: Transformer, batch: int, context: int, dtype: torch.dtype,
                use_graph: bool) -> tuple[Callable[[], object], bool]:
    """One decode step (batch rows, one token each, `context` tokens cached) as a callable, replayed
    from a CUDA graph when `use_graph` and capture works, and whether it is. Each call repeats the
    step at the same position, so every call does identical work."""
    cfg = model.config
    device = next(model.parameters()).device
    cache = FlatKVCache(cfg, batch, context + 1, dtype=dtype, device=device)
    gen = torch.Generator(device="cpu").manual_seed(batch)
    prompt = torch.randint(0, cfg.vocab_size, (batch, context), generator=gen).to(device)
    model(prompt, positions=cache.positions(context), kv=cache)
    cache.advance(context)
    tok = torch.randint(0, cfg.vocab_size, (batch, 1), generator=gen).to(device)
    pos = cache.positions(1)

    def step() -> torch.Tensor:
        with static_weights():  # as the serving engine runs its forwards (early weights under PDL mode 3)
            return model(tok, positions=pos, kv=cache)

    if use_graph:
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):  # autotuning and lazy init happen here, outside the capture
                    step()
                check_capturable(step)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            return graph.replay, True
        except RuntimeError as exc:
            print(f"  (CUDA graph capture failed, timing eagerly: {str(exc).splitlines()[0]})")
    return step, False


def decode_ms(model: Transformer, batch: int, context: int, dtype: torch.dtype, timer: Timer,
              use_graph: bool) -> tuple[float, bool]:
    """Median latency of one decode step (`decode_step`) and whether it ran from a CUDA graph."""
    step, graphed = decode_step(model, batch, context, dtype, use_graph)
    return timer(step), graphed


def decode_ms_in_mode(mode: int, model: Transformer, batch: int, context: int, dtype: torch.dtype, timer: Timer,
                      use_graph: bool) -> float:
    """`decode_ms` with the decode kernels launched in PDL mode `mode` (`tessera.kernels.triton.pdl`)."""
    previous = pdl.set_mode(mode)
    try:
        return decode_ms(model, batch, context, dtype, timer, use_graph)[0]
    finally:
        pdl.set_mode(previous)


def prefill_ms(model: Transformer, batch: int, length: int, timer: Timer) -> float:
    """Median latency of a prefill of `batch` x `length` tokens (hidden states, then last-token logits)."""
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)

    def run() -> torch.Tensor:
        h, _ = model.hidden_states(ids)
        return model.lm_head(h[:, -1])

    return timer(run)


def backends(model: nn.Module, dtype: torch.dtype, batch: int) -> str:
    """Which registry backend each quantized op resolves to for an input of `batch` rows; at decode sizes also
    how many of the op's timed one-row shapes run the CUDA tensor-core GEMV inside it (`cuda_gemv_choices`)."""
    picked = {}
    for mod in model.modules():
        if isinstance(mod, QuantLinear) and mod.op not in picked:
            x = torch.zeros(batch, mod.in_features, dtype=dtype, device=next(mod.buffers()).device)
            picked[mod.op] = registry.get(mod.op, x, *mod._op_args()).backend
    choices = cuda_gemv_choices() if batch == 1 else {}
    labels = []
    for op, backend in picked.items():
        name = op.split(".")[-1]
        fmt = {"int8_weight_only": "int8", "int4_awq": "int4"}.get(name)
        timed = [c["backend"] for label, c in choices.items() if fmt and label.startswith(f"{fmt} M<=1 ")]
        cuda = f" (cuda GEMV at {timed.count('cuda')}/{len(timed)} shapes)" if timed else ""
        labels.append(f"{name}={backend}{cuda}")
    return ",".join(labels) or "-"


def linear_flops_per_token(cfg: ModelConfig) -> int:
    hd = cfg.head_dim or cfg.d_model // cfg.n_heads
    per_layer = cfg.d_model * (cfg.n_heads + 2 * cfg.n_kv_heads) * hd + cfg.n_heads * hd * cfg.d_model
    per_layer += 3 * cfg.d_model * cfg.d_ff
    return 2 * cfg.n_layers * per_layer


@torch.inference_mode()
def speed(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    tiny = args.tiny
    cfg = ModelConfig(**TINY) if tiny else ModelConfig.preset("llama-3.2-1b")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    timer = Timer(device, warmup=1 if tiny else 5, reps=3 if tiny else args.reps)
    peak = ceilings(device, timer, tiny)
    context, pre_b, pre_t = (16, 1, 32) if tiny else (args.context, args.prefill_batch, args.prefill_len)
    torch.manual_seed(0)
    with torch.device(device):
        base = Transformer(cfg).to(dtype).eval()
    calib = torch.randint(0, cfg.vocab_size, (2 if tiny else 16, 32 if tiny else 256))
    # gpt-fast's convention: the output projection is quantized too (it is a fifth of this shape's
    # weights); --float-lm-head keeps it in the float dtype, as the quality configs do.
    skip = ("lm_head",) if args.float_lm_head else ()
    configs = {"int8": QuantConfig(method="int8", skip=skip), "fp8": QuantConfig(method="fp8", skip=skip),
               "awq": QuantConfig(method="awq", skip=skip, n_grid=5 if tiny else 20, clip_grid=10 if tiny else 20,
                                  calib_samples=calib.shape[0], calib_seq_len=calib.shape[1])}
    label = "fp32" if dtype == torch.float32 else "bf16"
    rows, results = [], {}
    graphed = device.type == "cuda" and not args.no_graph
    use_modes = pdl is not None  # on a CPU the modes change nothing; --tiny --pdl-modes checks the bookkeeping
    other_modes = [m for m in dict.fromkeys(args.pdl_modes) if m != pdl.mode()] if use_modes else []
    for method in (label, *args.methods):
        t0 = time.perf_counter()
        model = base if method == label else quantize(copy.deepcopy(base), configs[method], calib, progress=False)
        if not args.no_fuse:
            fuse_projections(model)
        route_decode_linears(model)  # float projections: the faster of cuBLAS and the GEMV per decode shape
        print(f"  {method}: quantized in {time.perf_counter() - t0:.1f} s", flush=True)
        entry: dict = {"weight_bytes": weight_bytes(model)}
        for b in (1, 16):
            ms, g = decode_ms(model, b, context, dtype, timer, graphed)
            if other_modes:  # the same step in the other PDL modes: same process, same tuned configs
                entry[f"decode_b{b}_ms_by_pdl_mode"] = {
                    pdl.mode(): ms, **{m: decode_ms_in_mode(m, model, b, context, dtype, timer, graphed)
                                       for m in other_modes}}
            entry[f"decode_b{b}_ms"] = ms
            entry[f"decode_b{b}_graphed"] = g
            # the epilogue fusions switched the other way one at a time: same process, same tuned configs
            for wanted, flag, has, what in (
                    (args.compare_swiglu, "FUSED_SWIGLU", lambda m: getattr(m, "gate_up", None) is not None
                     and m.gate_up.has_swiglu(), "swiglu"),
                    (args.compare_qkv_rope, "FUSED_QKV_ROPE", lambda m: getattr(m, "qkv", None) is not None
                     and m.qkv.has_qkv_rope(), "qkv_rope")):
                if not (wanted and any(has(m) for m in model.modules())):
                    continue
                state = getattr(layers, flag)
                setattr(layers, flag, not state)
                try:
                    other = decode_ms(model, b, context, dtype, timer, graphed)[0]
                finally:
                    setattr(layers, flag, state)
                entry[f"decode_b{b}_ms_{'without' if state else 'with'}_{what}"] = other
                on, off = (ms, other) if state else (other, ms)
                print(f"  {method}: decode b{b} {on:.3f} ms with the {what} GEMV, {off:.3f} ms without", flush=True)
            if args.compare_fusion_always:  # every fused decode launch that agrees, whatever its time alone
                previous = shape_choice.DECODE_FUSION
                shape_choice.DECODE_FUSION = "always"
                try:
                    always = decode_ms(model, b, context, dtype, timer, graphed)[0]
                finally:
                    shape_choice.DECODE_FUSION = previous
                entry[f"decode_b{b}_ms_fusion_always"] = always
                print(f"  {method}: decode b{b} {ms:.3f} ms with fusions chosen by time, {always:.3f} ms with every "
                      "fusion", flush=True)
            moved = step_bytes(model, cfg, b, context, dtype)
            entry[f"decode_b{b}_bw_fraction"] = moved / (ms * 1e-3) / peak["bandwidth"]
        if args.persistent:  # batch 1 with every decoder layer in one launch (tessera.model.persistent)
            with torch.inference_mode():
                probe = FlatKVCache(cfg, 1, 2, dtype=dtype, device=device)
                entry["persistent_reasons"] = persistent.reasons(model, torch.zeros(1, 1, dtype=torch.long,
                                                                                    device=device), probe)
            previous = persistent.PERSISTENT_DECODE, persistent.OPTIONS
            entry["decode_b1_ms_persistent_variants"] = variants = {}
            # the default launch (""), then each tuning variant (`persistent.OPTIONS`)
            for text in ["", *args.persistent_variants]:
                persistent.PERSISTENT_DECODE, persistent.OPTIONS = True, persistent.parse_options(text)
                try:
                    variants[text] = decode_ms(model, 1, context, dtype, timer, graphed)[0]
                    failures = persistent.barrier_failures(model)
                    if failures:
                        entry.setdefault("persistent_barrier_failures", {})[text] = failures
                except Exception as exc:  # an experimental path that fails is reported, not fatal to the run
                    entry.setdefault("persistent_error", {})[text] = repr(exc)
                    variants[text] = None
                finally:
                    persistent.PERSISTENT_DECODE, persistent.OPTIONS = previous
            entry["decode_b1_ms_persistent"] = variants.pop("")
        ms = prefill_ms(model, pre_b, pre_t, timer)
        entry["prefill_tokens_per_s"] = pre_b * pre_t / (ms * 1e-3)
        hd = cfg.head_dim or cfg.d_model // cfg.n_heads
        flops = linear_flops_per_token(cfg) * pre_b * pre_t + 2 * cfg.n_layers * pre_b * pre_t**2 * cfg.n_heads * hd
        entry["prefill_flops_fraction"] = flops / (ms * 1e-3) / peak["flops"]
        entry["backends"] = backends(model, dtype, 1) + " / " + backends(model, dtype, pre_b * pre_t)
        results[method] = entry
        print(f"  {method}: decode b1 {entry['decode_b1_ms']:.3f} ms, b16 {entry['decode_b16_ms']:.3f} ms, "
              f"prefill {entry['prefill_tokens_per_s']:.0f} tok/s ({entry['backends']})", flush=True)
        if model is not base:
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    ref = results[label]
    for method, e in results.items():
        e["decode_b1_speedup"] = ref["decode_b1_ms"] / e["decode_b1_ms"]
        e["decode_b16_speedup"] = ref["decode_b16_ms"] / e["decode_b16_ms"]
        e["prefill_speedup"] = e["prefill_tokens_per_s"] / ref["prefill_tokens_per_s"]
        for b in (1, 16):  # both sides with every fusion (--compare-fusion-always)
            if f"decode_b{b}_ms_fusion_always" in e:
                e[f"decode_b{b}_speedup_fusion_always"] = (ref[f"decode_b{b}_ms_fusion_always"]
                                                          / e[f"decode_b{b}_ms_fusion_always"])
        rows.append({
            "method": method, "weights MiB": e["weight_bytes"]["total"] / 2**20,
            "b1 ms": e["decode_b1_ms"], "b1 x": e["decode_b1_speedup"], "b1 %BW": 100 * e["decode_b1_bw_fraction"],
            "b16 ms": e["decode_b16_ms"], "b16 x": e["decode_b16_speedup"],
            "b16 %BW": 100 * e["decode_b16_bw_fraction"],
            "prefill tok/s": e["prefill_tokens_per_s"], "prefill x": e["prefill_speedup"],
            "prefill %FLOP": 100 * e["prefill_flops_fraction"], "backends (b1 / prefill)": e["backends"],
        })
    targets = {"int8": ("decode b1 >= 1.5x", "decode_b1_speedup", 1.5),
               "awq": ("decode b1 >= 2x", "decode_b1_speedup", 2.0), "fp8": ("prefill >= 1.3x", "prefill_speedup", 1.3)}
    checks = {f"{m} {text}": results[m][key] >= goal for m, (text, key, goal) in targets.items() if m in results}
    if args.compare_fusion_always:
        print_table([{"method": m, "b1 ms timed": e["decode_b1_ms"], "b1 ms always": e["decode_b1_ms_fusion_always"],
                      "b1 x always": e["decode_b1_speedup_fusion_always"], "b16 ms timed": e["decode_b16_ms"],
                      "b16 ms always": e["decode_b16_ms_fusion_always"],
                      "b16 x always": e["decode_b16_speedup_fusion_always"]} for m, e in results.items()],
                    "decode steps with fusions chosen by their time alone, and with every fusion that agrees")
    shape = "tiny" if tiny else "llama-3.2-1b"
    head = "float lm_head" if args.float_lm_head else "lm_head quantized too"
    head += ", separate projections" if args.no_fuse else ", fused q/k/v and gate/up"
    head += ", rope/KV write/attention in one launch" if paged_cache.FUSED_DECODE else ", rope/KV write/attention apart"
    head += ", norms inside the GEMVs" if layers.FUSED_NORMS else ", norms apart"
    print_table(rows, f"{shape} ({label}, random weights, {head}): decode step at context {context} "
                      f"({'CUDA graph' if graphed else 'eager'}), prefill {pre_b}x{pre_t}; "
                      f"ceilings {peak['bandwidth'] / 1e9:.1f} GB/s copy, {peak['flops'] / 1e9:.0f} GFLOP/s mm")
    if args.persistent:
        # each method at its faster batch-1 step (per-op or persistent), against bf16's faster one
        best = {m: min(e["decode_b1_ms"], e["decode_b1_ms_persistent"] or math.inf,
                       *(v or math.inf for v in e["decode_b1_ms_persistent_variants"].values()))
                for m, e in results.items()}
        for m, e in results.items():
            e["decode_b1_speedup_best"] = best[label] / best[m]
        print_table([{"method": m, "b1 ms per-op": e["decode_b1_ms"], "b1 ms persistent": e["decode_b1_ms_persistent"],
                      "persistent x per-op": e["decode_b1_ms"] / (e["decode_b1_ms_persistent"] or math.inf),
                      **{f"b1 ms {t}": v for t, v in e["decode_b1_ms_persistent_variants"].items()},
                      "best x bf16 best": e["decode_b1_speedup_best"],
                      "persistent ran": not e["persistent_reasons"]} for m, e in results.items()],
                    "batch-1 decode step with every decoder layer in one persistent launch")
        for m, goal in (("int8", 1.5), ("awq", 2.0)):
            if m in results:
                checks[f"{m} decode b1 >= {goal:g}x (each at its faster step)"] = \
                    results[m]["decode_b1_speedup_best"] >= goal
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    by_mode = {}
    if other_modes:
        for mode in results[label]["decode_b1_ms_by_pdl_mode"]:
            by_mode[mode] = {m: {f"b{b}_ms": e[f"decode_b{b}_ms_by_pdl_mode"][mode] for b in (1, 16)}
                             for m, e in results.items()}
            for row in by_mode[mode].values():
                for b in (1, 16):
                    row[f"b{b}_speedup"] = by_mode[mode][label][f"b{b}_ms"] / row[f"b{b}_ms"]
        print_table([{"PDL mode": mode, "method": m, **row} for mode, rows_m in by_mode.items()
                     for m, row in rows_m.items()], "decode step by PDL mode (0 off, 1 overlap, 2 overlap + prefetch)")
    return {"speed": {"shape": shape, "dtype": label, "lm_head": head, "context": context, "prefill": [pre_b, pre_t],
                      "ceilings": peak, "methods": results, "checks": checks,
                      "float_projections": dense.choices(), "gated_quant_projections": gated_choices(),
                      "normed_quant_projections": normed_choices(), "rope_quant_projections": rope_choices(),
                      "cuda_decode_gemvs": cuda_gemv_choices(),
                      "by_pdl_mode": by_mode}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--quality", type=Path, metavar="MODEL_DIR", help="checkpoint to score on WikiText-2 test")
    p.add_argument("--speed", action="store_true", help="decode/prefill speed of the Llama-3.2-1B shape")
    p.add_argument("--tiny", action="store_true", help="with --speed: a small shape, fp32, for a CPU check")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="quality: compute dtype (default bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--data", type=Path, default=SHARED, help="folder holding wikitext-2/{test,valid}.txt")
    p.add_argument("--window", type=int, help="perplexity window (default: the model's max_seq_len)")
    p.add_argument("--batch", type=int, default=8, help="windows per forward when scoring")
    p.add_argument("--max-windows", type=int, help="score only the first N windows (quick checks)")
    p.add_argument("--group-size", type=int, nargs="+", choices=(32, 64, 128),
                   help="quality: int4 group sizes to score (default: the largest of 128/64/32 dividing every layer)")
    p.add_argument("--calib-data", type=Path,
                   help="quality: AWQ calibration text (default DATA/wikitext-2/valid.txt; never the test split)")
    p.add_argument("--calib-samples", type=int, default=128, help="AWQ calibration windows, spread over the file")
    p.add_argument("--calib-seq-len", type=int, default=512, help="AWQ calibration window length")
    p.add_argument("--context", type=int, default=512, help="cached tokens during the timed decode step")
    p.add_argument("--prefill-batch", type=int, default=16,
                   help="prompts per prefill; 16 x 1024 is a serving step's token budget, where the GPU sets "
                        "the pace (at 4 x 1024 the eager host issue time exceeds an FP8 prefill's device time)")
    p.add_argument("--prefill-len", type=int, default=1024)
    p.add_argument("--reps", type=int, default=50, help="timed repeats per measurement (GPU)")
    p.add_argument("--float-lm-head", action="store_true", help="speed: keep lm_head in the float dtype")
    p.add_argument("--no-fuse", action="store_true",
                   help="keep q/k/v and gate/up as separate matmuls (default: fused, as the serving engine runs them)")
    p.add_argument("--no-graph", action="store_true", help="time the decode step eagerly, without a CUDA graph")
    p.add_argument("--fused-decode", action=argparse.BooleanOptionalAction, default=None,
                   help="run the decode step's rope, KV write and paged attention as one launch "
                        "(attention.decode_paged_rope) or three (default: as the serving engine runs them, "
                        "TESSERA_FUSED_DECODE, off unless set to 1)")
    p.add_argument("--persistent", action="store_true",
                   help="with --speed: also time each method's batch-1 decode step with every decoder layer in one "
                        "persistent launch (tessera.model.persistent; FP8 and anything else it refuses runs per op, "
                        "and its reasons are recorded), in the same process")
    p.add_argument("--persistent-variants", nargs="*", default=["DEPTH=2"], type=persistent_variant,
                   metavar="KEY=VALUE[,KEY=VALUE]",
                   help="with --persistent: also time the launch with these tunings (tessera.model.persistent."
                        f"TUNABLE: {', '.join(persistent.TUNABLE)}; default: DEPTH=2; none: no values); the "
                        "targets are checked with each method at its fastest step")
    p.add_argument("--fused-norms", action=argparse.BooleanOptionalAction, default=None,
                   help="run each chained RMSNorm inside the q/k/v and gate/up GEMVs or as a launch of its own "
                        "(default: as the serving engine runs them, TESSERA_FUSED_NORM, off unless set to 1)")
    p.add_argument("--methods", nargs="+", choices=SPEED_METHODS, default=list(SPEED_METHODS),
                   help="with --speed: the quantized methods to time against the float model (default all; the "
                   "issue's figures need all of them in one run, fewer make a shorter run for a comparison)")
    p.add_argument("--compare-swiglu", action="store_true",
                   help="with --speed: also time the decode steps of a method whose fused gate/up stores silu_mul "
                        "itself (AWQ's int4 SwiGLU GEMV) with that off (the GEMV, then a silu_mul launch), in the "
                        "same process")
    p.add_argument("--compare-fusion-always", action="store_true",
                   help="with --speed: also time the decode steps of every method with each fused decode launch "
                   "(gated, normalised, SwiGLU, rope GEMVs) taken wherever it agrees, not only where it was faster "
                   "timed alone (TESSERA_DECODE_FUSION=always), in the same process")
    p.add_argument("--compare-qkv-rope", action="store_true",
                   help="with --speed: also time the decode steps of a method whose fused q/k/v may rotate and write "
                        "the cache itself (the int8 and int4 q/k/v rope GEMVs; off unless TESSERA_FUSED_QKV_ROPE=1) "
                        "the other way, in the same process")
    p.add_argument("--pdl-modes", type=int, nargs="+", default=[], choices=(0, 1, 2, 3, 4), metavar="MODE",
                   help="with --speed: also time the decode steps in these PDL modes (0 off, 1 launch overlap, "
                        "2 overlap + GEMV weight prefetch, 3 overlap + GEMV first weight tile before the wait, 4 the "
                        "same with up to four tiles) in the "
                        "same process, with the same tuned configs; the main figures use TESSERA_PDL's mode "
                        "(default 3). PDL needs a GPU of compute capability "
                        "9.0 or later; elsewhere the modes time the same kernels")
    p.add_argument("--out", type=Path, help="result folder (default benchmarks/results)")
    p.add_argument("--note", help="free text stored in the JSON (e.g. how the scored model was made)")
    p.add_argument("--no-progress", action="store_true", help="no per-layer progress bars")
    args = p.parse_args()
    if not args.quality and not args.speed:
        p.error("give --quality MODEL_DIR and/or --speed")
    payload: dict = {"note": args.note} if args.note else {}
    if args.fused_decode is not None:
        paged_cache.FUSED_DECODE = args.fused_decode
    if args.fused_norms is not None:
        layers.FUSED_NORMS = args.fused_norms
    payload["fused_decode"], payload["fused_norms"] = paged_cache.FUSED_DECODE, layers.FUSED_NORMS
    # wall seconds of each part, so a GPU command's time limit can be planned from an earlier run
    for name, part, wanted in (("quality", quality, args.quality), ("speed", speed, args.speed)):
        if wanted:
            start = time.perf_counter()
            payload.update(part(args))
            payload.setdefault("section_seconds", {})[name] = time.perf_counter() - start
    path = write_result("quant", payload, args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
