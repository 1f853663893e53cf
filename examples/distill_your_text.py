"""Distill a small student from a teacher, both trained on your own text, and compare them.

    python examples/distill_your_text.py notes.txt more.txt [--out runs/mytext] [--tiny]
    python examples/distill_your_text.py notes.txt --teacher runs/demo/teacher/final   # distill from a checkpoint

The last tenth of each file is held out. Without `--teacher`, a teacher is pretrained on the rest with
cross-entropy (`DistillTrainer` with no teacher); then the student learns from the teacher's temperature-
softened logits plus the hard labels. Both are scored by perplexity on the held-out text, and the student
completes a prompt. Without files, the Python standard library's docstrings stand in for your text.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tessera.distill import DistillTrainer
from tessera.distill.corpus import builtin_corpus
from tessera.distill.evaluate import file_perplexity
from tessera.model import load_model
from tessera.serve import LLM
from tessera.specs import DistillConfig, ModelConfig, SamplingParams

TINY_TEACHER = ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=128,
                           tie_embeddings=True)
TINY_STUDENT = ModelConfig(vocab_size=512, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=128,
                           tie_embeddings=True)


def split(texts: list[str], out: Path) -> tuple[Path, Path]:
    """Write the first 9/10 of every text to train.txt and the last 1/10 to heldout.txt (cut at a line end)."""
    train, heldout = [], []
    for text in texts:
        cut = text.find("\n", int(len(text) * 0.9))
        cut = len(text) if cut < 0 else cut
        train.append(text[:cut])
        heldout.append(text[cut:])
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.txt").write_text("\n\n".join(train), encoding="utf-8")
    (out / "heldout.txt").write_text("\n\n".join(heldout), encoding="utf-8")
    return out / "train.txt", out / "heldout.txt"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", type=Path, help="your text files (default: stdlib docstrings)")
    ap.add_argument("--teacher", help="an existing teacher checkpoint (tessera or HF) to distill from")
    ap.add_argument("--out", type=Path, default=Path("runs/distill-your-text"), help="output directory")
    ap.add_argument("--tiny", action="store_true", help="micro models, a few steps (seconds)")
    ap.add_argument("--steps", type=int, default=None, help="steps per stage (default: 10 tiny, 200 otherwise)")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto")
    args = ap.parse_args(argv)
    steps = args.steps or (10 if args.tiny else 200)

    texts = [f.read_text(encoding="utf-8", errors="replace") for f in args.files]
    if not texts:
        texts = ["\n\n".join(builtin_corpus(100_000 if args.tiny else 1_000_000))]
    train_file, heldout_file = split(texts, args.out / "data")
    common = {"steps": steps, "log_every": max(1, steps // 10), "device": args.device,
              "optimizer": {"lr": 3e-3, "warmup_steps": max(1, steps // 10), "weight_decay": 0.01},
              "data": {"paths": [str(train_file)], "vocab_size": 512 if args.tiny else 2048,
                       "seq_len": 64 if args.tiny else 128, "batch_size": 4 if args.tiny else 16}}

    teacher = args.teacher
    if teacher is None:
        cfg = DistillConfig.model_validate({
            **common, "teacher": None, "student": TINY_TEACHER.model_dump() if args.tiny else "tiny-teacher",
            "loss": {"kd_weight": 0.0, "ce_weight": 1.0}, "output_dir": str(args.out / "teacher")})
        print(f"pretraining the teacher on {train_file} ({steps} steps)")
        teacher = str(DistillTrainer(cfg).fit().final_dir)
    cfg = DistillConfig.model_validate({
        **common, "teacher": teacher, "student": TINY_STUDENT.model_dump() if args.tiny else "tiny-student",
        "temperature": {"kind": "constant", "start": 2.0}, "loss": {"kd_weight": 1.0, "ce_weight": 0.5},
        "output_dir": str(args.out / "student")})
    print(f"distilling the student from {teacher} ({steps} steps)")
    student = DistillTrainer(cfg).fit().final_dir

    heldout = heldout_file.read_text(encoding="utf-8")
    window = cfg.data.seq_len
    for name, directory in (("teacher", teacher), ("student", str(student))):
        model, tokenizer = load_model(directory)
        assert tokenizer is not None, f"{directory} has no tokenizer.json"
        ppl = file_perplexity(model, tokenizer, heldout, window)
        print(f"{name}: {model.config.num_params() / 1e6:.2f}M parameters, held-out perplexity {ppl['ppl']:.2f} "
              f"({ppl['tokens']:,} tokens, window {window})")

    llm = LLM(student, device=args.device, max_num_seqs=4, kv_cache_bytes=16 * 2**20)
    prompt = heldout.strip().split()[:6]
    out = llm.generate(" ".join(prompt), SamplingParams(temperature=0.0, max_tokens=24))[0]
    print(f"student: {out.prompt!r} -> {out.outputs[0].text!r}")
    print(f"checkpoints: teacher {teacher}, student {student}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
