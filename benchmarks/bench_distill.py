"""Distillation benchmarks.

--quality     train the ~40M teacher (`teacher-40m`) on tinyshakespeare + WikiText-2 valid, then `student-6m`
              with KD and with CE only (same data, steps, tokenizer); WikiText-2 test perplexity of all three
              (shared/data/README.md protocol) and the gap closed, (ppl_CE - ppl_KD) / (ppl_CE - ppl_teacher).
              `--draft-students PRESET...` distils more KD students of the same teacher (speculative drafts).
--throughput  tokens/s and MFU of one distill step (teacher forward + student forward/backward + optimizer) at
              `llama-3.2-1b` teacher / `student-150m` student in bf16, ZeRO-3 against FSDP2 in the same run,
              plus peak memory of the chunked KD loss against full-logits KD. Under torchrun on N GPUs each
              rank keeps the same per-GPU batch; `--baseline` takes a 1-GPU result JSON for the scaling ratio.
--tiny        small presets and few steps, runs on a CPU in seconds.

    source scripts/gpu-env.sh && python3 benchmarks/bench_distill.py --quality --out $OUT
    source scripts/gpu-env.sh && python3 benchmarks/bench_distill.py --throughput --out $OUT
    source scripts/gpu-env.sh && torchrun --nproc-per-node 2 benchmarks/bench_distill.py --throughput --out $OUT
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import measure_ceilings, print_table, write_result

from tessera.distill.chunked_kd import ChunkedLossSpec, chunked_distill_loss
from tessera.distill.comm import init_from_env
from tessera.distill.corpus import builtin_corpus
from tessera.distill.evaluate import file_perplexity
from tessera.distill.losses import kd_loss
from tessera.distill.metrics import plot_loss_curves
from tessera.distill.objective import DistillObjective
from tessera.distill.strategy import make_strategy
from tessera.distill.trainer import DistillTrainer
from tessera.model.loading import load_model
from tessera.model.tokenizer import Tokenizer
from tessera.model.transformer import Transformer
from tessera.specs import DistillConfig, ModelConfig
from tessera.specs.distill import LossConfig, OptimizerConfig, ParallelConfig

ROOT = Path(__file__).resolve().parents[1]


# -- quality ------------------------------------------------------------------------------------------------

def _quality_data(args: argparse.Namespace) -> tuple[list[str], str, str]:
    """(training files, test text, its description). The shared corpora, or (with --tiny and no corpora) a
    slice of the built-in corpus split into train and test."""
    data = Path(args.data_dir)
    train = [data / "tinyshakespeare" / "input.txt", data / "wikitext-2" / "valid.txt"]
    test = data / "wikitext-2" / "test.txt"
    if all(p.exists() for p in [*train, test]):
        text = test.read_text()
        return [str(p) for p in train], text[:20_000] if args.tiny else text, str(test)
    if not args.tiny:
        raise SystemExit(f"shared corpora not found under {data} (pass --data-dir)")
    docs = builtin_corpus(max_chars=120_000)
    out = Path(tempfile.mkdtemp(prefix="tessera-distill-tiny-data-"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.txt").write_text("\n\n".join(docs[: len(docs) * 9 // 10]))
    return [str(out / "train.txt")], "\n\n".join(docs[len(docs) * 9 // 10:]), "built-in corpus (held-out 10%)"


def run_quality(args: argparse.Namespace, device: torch.device) -> dict:
    # checkpoints and weights go to a scratch folder; only JSON, metrics and PNGs to --out
    out = Path(args.work_dir or tempfile.mkdtemp(prefix="tessera-distill-quality-"))
    out.mkdir(parents=True, exist_ok=True)
    results_dir = Path(args.out)
    results_dir.mkdir(parents=True, exist_ok=True)
    train_files, test_text, test_name = _quality_data(args)
    teacher_preset, student_preset = ("tiny-teacher", "tiny-student") if args.tiny else ("teacher-40m", "student-6m")
    vocab = ModelConfig.preset(student_preset).vocab_size
    tok_path = out / "tokenizer.json"
    texts = [Path(p).read_text() for p in train_files]
    t0 = time.perf_counter()
    Tokenizer.train(texts, vocab).save(tok_path)
    common = {"steps": args.steps, "log_every": max(args.steps // 50, 1), "device": str(device),
              "data": {"paths": train_files, "tokenizer": str(tok_path), "seq_len": args.seq_len,
                       "batch_size": args.batch_size, "seed": 0},
              "optimizer": {"lr": args.lr, "warmup_steps": max(args.steps // 20, 1), "weight_decay": 0.1},
              "parallel": {"strategy": "none", "compute_dtype": "bfloat16" if device.type == "cuda" else "float32"},
              "checkpoint": {"every_steps": args.steps, "keep_last": 1, "resume": False}}
    runs = {
        "teacher": {**common, "student": teacher_preset, "output_dir": str(out / "teacher"),
                    "steps": args.teacher_steps, "log_every": max(args.teacher_steps // 50, 1),
                    "checkpoint": {**common["checkpoint"], "every_steps": args.teacher_steps},
                    "optimizer": {**common["optimizer"], "lr": args.teacher_lr},
                    "loss": {"kd_weight": 0.0, "ce_weight": 1.0}},
        "student_kd": {**common, "student": student_preset, "teacher": str(out / "teacher" / "final"),
                       "output_dir": str(out / "student-kd"),
                       "temperature": {"kind": "constant", "start": args.temperature},
                       "loss": {"kd_weight": args.kd_weight, "ce_weight": args.ce_weight}},
        "student_ce": {**common, "student": student_preset, "output_dir": str(out / "student-ce"),
                       "loss": {"kd_weight": 0.0, "ce_weight": 1.0}},
    }
    # --draft-students: more KD students of the same teacher (same data, steps and loss as student_kd),
    # each in `<work-dir>/student-kd-<preset>`; the speculative-decoding benchmark takes them as drafts.
    for preset in args.draft_students:
        runs[f"student_kd_{preset}"] = {**runs["student_kd"], "student": preset,
                                        "output_dir": str(out / f"student-kd-{preset}")}
    results, curves = {}, {}
    for name, cfg in runs.items():
        t = time.perf_counter()
        fit = DistillTrainer(DistillConfig.model_validate(cfg), progress=True).fit()
        model, tok = load_model(fit.final_dir, device=device)
        window = args.seq_len
        ppl = file_perplexity(model, tok, test_text, window, batch_size=16,
                              dtype=torch.bfloat16 if device.type == "cuda" else None)
        curves[name] = [(r["step"], r["ce"]) for r in fit.metrics]
        for src, dst in (("metrics.jsonl", f"distill-quality-{name}-metrics.jsonl"),
                         ("loss_curve.png", f"distill-quality-{name}-loss.png")):
            if (Path(cfg["output_dir"]) / src).exists():
                shutil.copyfile(Path(cfg["output_dir"]) / src, results_dir / dst)
        results[name] = {"preset": cfg["student"], "params": model.config.num_params(), "test_ppl": ppl["ppl"],
                         "test_tokens": ppl["tokens"], "final_train_loss": fit.metrics[-1]["loss"],
                         "seconds": time.perf_counter() - t}
        del model
    ppl_t, ppl_kd, ppl_ce = (results[k]["test_ppl"] for k in ("teacher", "student_kd", "student_ce"))
    gap = (ppl_ce - ppl_kd) / (ppl_ce - ppl_t) if ppl_ce != ppl_t else float("nan")
    png = plot_loss_curves({"teacher (CE)": curves["teacher"], "student KD (its CE term)": curves["student_kd"],
                            "student CE only": curves["student_ce"]}, results_dir / "distill-quality-loss.png",
                           title="next-token cross-entropy on training batches", ylabel="cross-entropy (nats)")
    rows = [{"model": k, **{c: v for c, v in r.items() if c != "params"}, "params_M": r["params"] / 1e6}
            for k, r in results.items()]
    print_table(rows, f"WikiText-2 test perplexity ({test_name}; tokenizer BPE {vocab}, trained on the training "
                      f"files; window {args.seq_len})")
    print(f"gap closed by KD: {gap:.1%}  (target >= 25%)   total {time.perf_counter() - t0:.0f}s")
    return {"quality": {"runs": results, "gap_closed": gap, "target_gap_closed": 0.25,
                        "protocol": {"test": test_name, "window": args.seq_len, "tokenizer": f"byte-level BPE {vocab}",
                                     "train": train_files, "steps": args.steps, "batch_size": args.batch_size,
                                     "teacher_steps": args.teacher_steps,
                                     "kd": {"temperature": args.temperature, "kd_weight": args.kd_weight,
                                            "ce_weight": args.ce_weight}},
                        "loss_curve_png": str(png) if png else None}}


# -- throughput ---------------------------------------------------------------------------------------------

def _flops_per_token(cfg: ModelConfig, seq: int, train: bool) -> float:
    """6N (train) or 2N (forward) over the matmul parameters (non-embedding + the head), plus attention
    scores and values: 12 L T d_attn (train) or 4 L T d_attn (forward), no causal discount."""
    n = cfg.num_params(include_embeddings=False) + cfg.vocab_size * cfg.d_model
    attn = cfg.n_layers * seq * cfg.n_heads * (cfg.head_dim or cfg.d_model // cfg.n_heads)
    return (6 * n + 12 * attn) if train else (2 * n + 4 * attn)


def _kd_memory(device: torch.device, student: ModelConfig, teacher: ModelConfig, tokens: int) -> dict:
    """Peak CUDA memory of the chunked KD loss (+ backward) against full-logits KD, same inputs."""
    if device.type != "cuda":
        return {"note": "needs CUDA; the CPU test measures it with the allocator's own reports"}
    g = torch.Generator(device=device).manual_seed(0)
    h_s = torch.randn(1, tokens, student.d_model, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
    w_s = (torch.randn(student.vocab_size, student.d_model, device=device, dtype=torch.bfloat16, generator=g)
           * 0.02).requires_grad_()
    h_t = torch.randn(1, tokens, teacher.d_model, device=device, dtype=torch.bfloat16, generator=g)
    w_t = torch.randn(teacher.vocab_size, teacher.d_model, device=device, dtype=torch.bfloat16, generator=g) * 0.02
    labels = torch.randint(0, student.vocab_size, (1, tokens), device=device, generator=g)
    spec = ChunkedLossSpec(kd_weight=1.0, ce_weight=0.5, temperature=2.0, chunk_tokens=4096)

    def naive() -> None:
        z_s, z_t = F.linear(h_s, w_s), F.linear(h_t, w_t)
        loss = kd_loss(z_s, z_t, temperature=2.0) + 0.5 * F.cross_entropy(z_s.float()[0], labels[0])
        loss.backward()

    def chunked() -> None:
        chunked_distill_loss(h_s, w_s, labels, spec, h_t=h_t, w_t=w_t)[0].backward()

    out = {}
    for name, fn in (("naive", naive), ("chunked", chunked)):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        out[f"{name}_peak_bytes"] = torch.cuda.max_memory_allocated() - base
        h_s.grad = w_s.grad = None
    out["ratio_naive_over_chunked"] = out["naive_peak_bytes"] / out["chunked_peak_bytes"]
    out["tokens"] = tokens
    return out


def _throughput_one(strategy: str, args: argparse.Namespace, device: torch.device, group, teacher: Transformer,
                    student_cfg: ModelConfig, ids: list[torch.Tensor]) -> dict:
    torch.manual_seed(0)
    with torch.device(device):
        student = Transformer(student_cfg)
    loss_cfg = LossConfig(kd_weight=1.0, ce_weight=0.5, chunk_tokens=args.chunk_tokens)
    objective = DistillObjective(student, loss_cfg).to(device)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    strat = make_strategy(objective, list(student.model.layers), ParallelConfig(strategy=strategy, compute_dtype=dtype),
                          OptimizerConfig(lr=1e-4, warmup_steps=0))
    losses: list[float] = []

    def step(i: int) -> None:
        x = ids[i % len(ids)]
        with torch.no_grad():
            h_t, _ = teacher.hidden_states(x[:, :-1])
        loss, _ = strat.module(x[:, :-1], x[:, 1:], 1.0, (h_t, teacher.lm_head.weight, {}))
        loss.backward()
        strat.step(1e-4, 1.0)
        losses.append(loss.item())

    for i in range(args.warmup):
        step(i)
    times = []
    for i in range(args.repeats):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step(args.warmup + i)
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            step(args.warmup + i)
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return {"step_s": statistics.median(times), "losses": losses, "peak_bytes": peak, "memory": strat.memory_report()}


def run_throughput(args: argparse.Namespace, device: torch.device, group) -> dict:
    teacher_cfg = ModelConfig.preset("tiny-teacher" if args.tiny else "llama-3.2-1b")
    student_cfg = ModelConfig.preset("tiny-student" if args.tiny else "student-150m")
    if args.tiny:
        student_cfg = student_cfg.model_copy(update={"vocab_size": teacher_cfg.vocab_size})
    batch, seq = (2, 64) if args.tiny else (args.batch_size, args.seq_len)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(1)
    with torch.device(device):
        teacher = Transformer(teacher_cfg).to(dtype=dtype).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(100 + group.rank)
    ids = [torch.randint(0, student_cfg.vocab_size, (batch, seq + 1), generator=g).to(device) for _ in range(4)]
    cuda = device.type == "cuda"
    ceilings = measure_ceilings(device, cuda, args.tiny or not cuda)
    tokens = batch * seq
    flops = tokens * (_flops_per_token(student_cfg, seq, True) + _flops_per_token(teacher_cfg, seq, False))
    rows, per = [], {}
    for strategy in ("zero3", "fsdp2"):
        r = _throughput_one(strategy, args, device, group, teacher, student_cfg, ids)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        tok_s = tokens / r["step_s"]
        mfu = flops / r["step_s"] / ceilings["bf16_mm_flops"]
        per[strategy] = {**r, "tokens_per_s_per_gpu": tok_s, "mfu_of_measured_mm": mfu}
        rows.append({"strategy": strategy, "world": group.world, "step_ms": r["step_s"] * 1e3,
                     "tok/s/gpu": tok_s, "MFU (of measured mm)": mfu,
                     "peak GiB": (r["peak_bytes"] or 0) / 2**30,
                     "sharded MB (16Psi/N MB)": f"{r['memory']['measured_sharded_bytes'] / 1e6:.0f} "
                                                f"({r['memory']['formula_16psi_over_n'] / 1e6:.0f})"})
    ratio = per["zero3"]["tokens_per_s_per_gpu"] / per["fsdp2"]["tokens_per_s_per_gpu"]
    loss_diff = max(abs(a - b) for a, b in zip(per["zero3"]["losses"], per["fsdp2"]["losses"]))
    result = {"throughput": {"teacher": "tiny-teacher" if args.tiny else "llama-3.2-1b",
                             "student": "tiny-student" if args.tiny else "student-150m",
                             "per_gpu_batch": batch, "seq_len": seq, "world_size": group.world,
                             "flops_per_step_per_gpu": flops, "ceilings": ceilings, "strategies": per,
                             "zero3_over_fsdp2": ratio, "max_loss_diff_zero3_vs_fsdp2": loss_diff,
                             "targets": {"mfu": 0.30, "zero3_over_fsdp2": 0.95, "two_gpu_scaling": 1.8}}}
    if group.rank == 0:
        print_table(rows, f"distill step: {result['throughput']['teacher']} -> {result['throughput']['student']}, "
                          f"{batch}x{seq} tokens per GPU, {dtype} (ceiling {ceilings['bf16_mm_flops'] / 1e12:.0f} "
                          "TFLOP/s measured mm)")
        print(f"ZeRO-3 / FSDP2 tokens/s: {ratio:.3f} (target >= 0.95); max |loss diff| {loss_diff:.3g}")
        if args.baseline:
            base = json.loads(Path(args.baseline).read_text())["throughput"]
            scale = {s: per[s]["tokens_per_s_per_gpu"] * group.world / base["strategies"][s]["tokens_per_s_per_gpu"]
                     / base["world_size"] for s in per}
            result["throughput"]["scaling_vs_baseline"] = scale
            print(f"total tokens/s vs {args.baseline} (world {base['world_size']}): "
                  + ", ".join(f"{s} {v:.2f}x" for s, v in scale.items()) + " (target >= 1.8x on 2 GPUs)")
        mem = _kd_memory(device, student_cfg, teacher_cfg, tokens)
        result["throughput"]["kd_loss_memory"] = mem
        if "ratio_naive_over_chunked" in mem:
            print(f"KD loss peak memory at {tokens} tokens: full logits {mem['naive_peak_bytes'] / 2**30:.2f} GiB, "
                  f"chunked {mem['chunked_peak_bytes'] / 2**30:.2f} GiB ({mem['ratio_naive_over_chunked']:.1f}x)")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quality", action="store_true", help="teacher, KD student, CE student; perplexities")
    p.add_argument("--throughput", action="store_true", help="ZeRO-3 vs FSDP2 distill-step tokens/s and MFU")
    p.add_argument("--tiny", action="store_true", help="small presets, few steps (CPU smoke run)")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"), help="shared corpora folder")
    p.add_argument("--out", default=None, help="where JSON and PNGs go (default benchmarks/results)")
    p.add_argument("--work-dir", default=None, help="scratch folder for the quality runs' checkpoints and weights "
                                                     "(default: a new temporary folder)")
    p.add_argument("--steps", type=int, default=None, help="training steps of each student (default 400)")
    p.add_argument("--teacher-steps", type=int, default=None, help="teacher training steps (default: --steps)")
    p.add_argument("--batch-size", type=int, default=None, help="per-GPU batch (quality 16, throughput 8)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="training window (quality: 512, the presets' context, also the perplexity window; "
                        "throughput 1024)")
    p.add_argument("--lr", type=float, default=2e-3, help="student learning rate")
    p.add_argument("--teacher-lr", type=float, default=1e-3, help="teacher learning rate")
    p.add_argument("--temperature", type=float, default=1.0, help="KD temperature")
    p.add_argument("--kd-weight", type=float, default=1.0)
    p.add_argument("--ce-weight", type=float, default=0.1)
    p.add_argument("--draft-students", nargs="+", default=[], metavar="PRESET",
                   help="quality: also distil these student presets from the teacher with KD (e.g. draft-2l "
                        "draft-3l), for use as speculative drafts")
    p.add_argument("--chunk-tokens", type=int, default=4096, help="tokens per chunk of the KD loss")
    p.add_argument("--warmup", type=int, default=None, help="throughput warm-up steps (default 5)")
    p.add_argument("--repeats", type=int, default=None, help="timed throughput steps (default 20)")
    p.add_argument("--baseline", default=None, help="a 1-GPU throughput JSON to compute multi-GPU scaling")
    args = p.parse_args(argv)
    if not (args.quality or args.throughput):
        p.error("pick --quality and/or --throughput")
    for preset in args.draft_students:
        if preset not in ModelConfig.presets():
            p.error(f"--draft-students: unknown preset {preset!r} (known: {', '.join(ModelConfig.presets())})")
    q = args.quality and not args.throughput
    args.steps = args.steps or (20 if args.tiny else 400)
    args.teacher_steps = args.teacher_steps or args.steps
    args.batch_size = args.batch_size or (4 if args.tiny else (16 if q else 8))
    args.seq_len = args.seq_len or (64 if args.tiny else (512 if q else 1024))
    args.warmup = args.warmup or (1 if args.tiny else 5)
    args.repeats = args.repeats or (3 if args.tiny else 20)
    args.out = args.out or str(ROOT / "benchmarks" / "results")
    group, device = init_from_env("cpu" if args.tiny and not torch.cuda.is_available() else "auto",
                                  need_group=args.throughput)
    payload: dict = {"tiny": args.tiny}
    if args.quality and group.world > 1:
        p.error("--quality runs in one process (start it without torchrun)")
    if args.quality:
        payload.update(run_quality(args, device))
    if args.throughput:
        payload.update(run_throughput(args, device, group))
    if group.rank == 0:
        path = write_result("distill" + ("-tiny" if args.tiny else ""), payload, Path(args.out))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
