"""`tessera train` (pretrain with cross-entropy) and `tessera distill --config cfg.yaml`.

Both build a `DistillConfig` (from `--config` when given, else defaults), apply the command-line
overrides, and run `DistillTrainer.fit()`. Under `torchrun --nproc-per-node N -m tessera.cli distill ...`
every rank runs the same command.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tessera.specs import DistillConfig

# flag -> (dotted config field, type, help)
_COMMON: dict[str, tuple[str, Any, str]] = {
    "--data": ("data.paths", str, "text files to train on (default: the built-in Python docstring corpus)"),
    "--tokenizer": ("data.tokenizer", str, "tokenizer.json to use (default: the teacher's, else train one)"),
    "--vocab-size": ("data.vocab_size", int, "vocabulary size of a tokenizer trained here"),
    "--seq-len": ("data.seq_len", int, "tokens per training window"),
    "--batch-size": ("data.batch_size", int, "windows per micro-batch per rank"),
    "--grad-accum": ("data.grad_accum", int, "micro-batches per optimizer step"),
    "--steps": ("steps", int, "optimizer steps"),
    "--lr": ("optimizer.lr", float, "peak learning rate"),
    "--warmup-steps": ("optimizer.warmup_steps", int, "linear warm-up steps"),
    "--strategy": ("parallel.strategy", str, "none | zero3 | fsdp2"),
    "--dtype": ("parallel.compute_dtype", str, "float32 | bfloat16 (compute; master weights stay fp32)"),
    "--checkpoint-every": ("checkpoint.every_steps", int, "save a sharded checkpoint every N steps"),
    "--checkpoint-dir": ("checkpoint.dir", str, "where checkpoints go (default: <output-dir>/checkpoints)"),
    "--output-dir": ("output_dir", str, "run directory: metrics.jsonl, loss_curve.png, final/"),
    "--log-every": ("log_every", int, "log metrics every N steps"),
    "--device": ("device", str, "auto | cpu | cuda"),
    "--seed": ("seed", int, "random seed (initialisation and data order)"),
}
_TRAIN = {"--model": ("student", str, "model preset to pretrain (see `tessera info`)")}
_DISTILL = {
    "--teacher": ("teacher", str, "teacher checkpoint directory (tessera or Hugging Face)"),
    "--student": ("student", str, "student preset"),
    "--temperature": ("temperature.start", float, "distillation temperature (start of its schedule)"),
    "--kd-weight": ("loss.kd_weight", float, "weight of the T^2-scaled KD term"),
    "--ce-weight": ("loss.ce_weight", float, "weight of the hard-label cross-entropy term"),
    "--divergence": ("loss.divergence", str, "forward_kl | reverse_kl | jsd"),
}


def _parser(prog: str, description: str, flags: dict[str, tuple[str, Any, str]]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", help="DistillConfig as YAML or JSON; flags below override its fields")
    p.add_argument("--no-resume", action="store_true", help="start fresh even if checkpoints exist")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    for flag, (field, typ, text) in flags.items():
        kw: dict[str, Any] = {"type": typ, "help": f"{text} [{field}]"}
        if field == "data.paths":
            kw["nargs"] = "+"
        p.add_argument(flag, **kw)
    return p


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def _resolve(args: argparse.Namespace, flags: dict[str, tuple[str, Any, str]], fixed: dict[str, Any],
             defaults: dict[str, Any]) -> DistillConfig:
    data: dict[str, Any] = (DistillConfig.load(args.config).model_dump(mode="json") if args.config
                            else dict(defaults))
    for flag, (field, _, _) in flags.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            _set(data, field, value)
    for field, value in fixed.items():
        _set(data, field, value)
    if args.no_resume:
        _set(data, "checkpoint.resume", False)
    return DistillConfig.model_validate(data)


def _run(cfg: DistillConfig, args: argparse.Namespace) -> int:
    if args.print_config:
        print(cfg.to_yaml())
        return 0
    import torch.distributed as dist

    from tessera.distill.trainer import DistillTrainer

    try:
        result = DistillTrainer(cfg, progress=not args.no_progress).fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if result.final_dir is not None:
        last = result.metrics[-1] if result.metrics else {}
        print(json.dumps({"final": str(result.final_dir), "step": last.get("step"), "loss": last.get("loss"),
                          "resumed_from": result.resumed_from}))
    return 0


def main_train(argv: list[str] | None = None) -> int:
    """`tessera train`: pretrain a model preset with cross-entropy only (no teacher)."""
    flags = {**_TRAIN, **_COMMON}
    args = _parser("tessera train", "Pretrain a model with next-token cross-entropy (e.g. the teacher to "
                   "distill from later). Writes <output-dir>/final as a tessera checkpoint.", flags).parse_args(argv)
    fixed = {"teacher": None, "loss.kd_weight": 0.0, "loss.ce_weight": 1.0, "loss.hidden_weight": 0.0}
    cfg = _resolve(args, flags, fixed, {"student": "teacher-40m", "output_dir": "runs/train"})
    return _run(cfg, args)


def main_distill(argv: list[str] | None = None) -> int:
    """`tessera distill --config cfg.yaml`: distill a teacher checkpoint into a student."""
    flags = {**_DISTILL, **_COMMON}
    args = _parser("tessera distill", "Distill a teacher into a student (KD on temperature-scaled logits, "
                   "optional hard-label CE and hidden-state matching). Writes <output-dir>/final.",
                   flags).parse_args(argv)
    cfg = _resolve(args, flags, {}, {"output_dir": "runs/distill"})
    if cfg.teacher is None and cfg.loss.kd_weight > 0:
        print("tessera distill: no teacher given (--teacher or `teacher:` in --config)", file=sys.stderr)
        return 2
    return _run(cfg, args)
