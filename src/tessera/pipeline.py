"""Running a `PipelineConfig`: every stage of the demo, composed from the packages' public APIs.

    result = run_pipeline(PipelineConfig.preset("tiny"))
    result["perplexity"]["student"]["ppl"], result["serving"]["speculative"]["acceptance_rate"]

Stages: split the text into training and held-out documents (`pipeline_data.py`); pretrain the teacher
(`DistillTrainer`, CE only); distill the student from it; quantize the student; score the three models'
perplexity on the held-out text; generate the same prompts with the teacher alone and with the student as
speculative draft (batch 1, greedy: the speedup and the acceptance rate are measured, not modelled); serve
the teacher + draft through the HTTP gateway on loopback and ask it a completion and a streaming chat
(`pipeline_serving.py`). The result is a plain dict (also written to `summary.json`). Each stage's resolved
config is written under `configs/` so the stage's own command (`tessera train/distill/quantize --config
...`) reruns it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tessera.distill.evaluate import perplexity
from tessera.distill.trainer import DistillTrainer
from tessera.model import load_model
from tessera.model.checkpoint import read_model_card
from tessera.model.tokenizer import Tokenizer
from tessera.pipeline_data import DataSplit, split_data
from tessera.pipeline_serving import http_stage, serving_stage
from tessera.quant import load_quantized, quantize, save_quantized
from tessera.specs.model_card import Lineage
from tessera.specs.pipeline import PipelineConfig

Say = Callable[[str], None]


def _write_config(cfg: PipelineConfig, name: str, spec: Any) -> Path:
    path = Path(cfg.output_dir) / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    spec.dump(path)
    return path


def train_stage(cfg: PipelineConfig, name: str, stage: Any, progress: bool) -> dict[str, Any]:
    """Run one `DistillTrainer` stage; returns its checkpoint, config file, last logged metrics and time."""
    config_file = _write_config(cfg, name, stage)
    t0 = time.perf_counter()
    result = DistillTrainer(stage, progress=progress).fit()
    last = result.metrics[-1] if result.metrics else {}
    return {"checkpoint": str(result.final_dir), "config": str(config_file), "steps": stage.steps,
            "loss": last.get("loss"), "tokens_per_s": last.get("tokens_per_s"), "seconds": time.perf_counter() - t0,
            "resumed_from": result.resumed_from, "run_dir": stage.output_dir}


def quantize_stage(cfg: PipelineConfig, student_dir: Path, split: DataSplit, device: torch.device,
                   progress: bool) -> dict[str, Any]:
    """Quantize the student checkpoint with `cfg.quant` (AWQ calibrates on the training text)."""
    config_file = _write_config(cfg, "quant", cfg.quant)
    t0 = time.perf_counter()
    model, tokenizer = load_model(student_dir, device=device)
    calib = None
    if cfg.quant.method == "awq":
        assert tokenizer is not None
        calib = [tokenizer.encode(split.train_file.read_text(encoding="utf-8")[:400_000])]
    quantize(model, cfg.quant, calib, progress=progress)
    out = save_quantized(model, cfg.path("quantized"), tokenizer=tokenizer,
                         lineage=Lineage(method="quantize", parent=str(student_dir), data=(str(split.train_file),),
                                         notes=f"pipeline quant.method={cfg.quant.method}"))
    return {"checkpoint": str(out), "config": str(config_file), "method": cfg.quant.method,
            "seconds": time.perf_counter() - t0}


def heldout_tokens(cfg: PipelineConfig, tokenizer: Tokenizer, split: DataSplit) -> torch.Tensor:
    ids = tokenizer.encode(split.heldout_file.read_text(encoding="utf-8"))
    limit = cfg.eval.max_tokens
    return torch.tensor(ids if limit is None else ids[:limit + 1], dtype=torch.int64)


def evaluate_stage(cfg: PipelineConfig, checkpoints: dict[str, Path], tokens: torch.Tensor,
                   device: torch.device) -> dict[str, dict[str, float]]:
    """Held-out perplexity of each checkpoint (quantized ones through `load_quantized`)."""
    out = {}
    for name, directory in checkpoints.items():
        if (directory / "modelcard.json").exists() and read_model_card(directory).quant is not None:
            model = load_quantized(directory, device=device)
        else:
            model, _ = load_model(directory, device=device)
        result = perplexity(model.eval(), tokens, cfg.eval.window)
        result["params"] = model.config.num_params()
        result["checkpoint_bytes"] = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
        out[name] = result
        del model
    return out


def cpu_threads(requested: int | None) -> int:
    """`requested`, or torch's default less the cores other processes keep busy (1-minute load average), at
    least 1. Oversubscribed cores make torch's threads wait on each other's time slices at every op."""
    if requested is not None:
        return requested
    busy = round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - busy))


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when available, else the CPU. Raises ValueError for a CUDA device this machine lacks."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available here (torch {torch.__version__}); use cpu or auto")
    return device


def run_pipeline(cfg: PipelineConfig, *, progress: bool = True, say: Say = print) -> dict[str, Any]:
    """Run every stage of `cfg`; returns the summary (also written to `cfg.path("summary")`). `say` receives
    the stage headers. Raises `pipeline_data.RunMismatch` when `cfg.output_dir` holds a different run."""
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    torch.set_num_threads(cpu_threads(cfg.threads))
    say(f"device {device}, {torch.get_num_threads()} torch CPU threads ({os.cpu_count()} cores, "
        f"load {os.getloadavg()[0]:.1f})")
    stages = 7 if cfg.teacher is not None else 6
    step = iter(range(1, stages + 1))

    def header(text: str) -> None:
        say(f"\n== [{next(step)}/{stages}] {text}")

    header("data")
    split = split_data(cfg)
    say(f"{split.source}: {split.documents:,} documents; one in {cfg.eval.heldout_every} held out "
        f"({split.heldout_documents:,} documents, {split.heldout_chars:,} chars); training text "
        f"{split.train_chars:,} chars -> {split.train_file}")
    summary: dict[str, Any] = {"device": str(device), "threads": torch.get_num_threads(), "data": split.__dict__ | {
        "train_file": str(split.train_file), "heldout_file": str(split.heldout_file)}}
    if cfg.teacher is not None:
        header(f"pretrain the teacher ({_model_name(cfg.teacher.student)}, {cfg.teacher.steps} steps, cross-entropy)")
        summary["teacher"] = train_stage(cfg, "teacher", cfg.teacher_stage(split.train_file), progress)
    student_stage = cfg.student_stage(split.train_file)
    loss = cfg.student.loss
    header(f"distill the student ({_model_name(cfg.student.student)}, {cfg.student.steps} steps, KD {loss.kd_weight:g} "
           f"x T^2 {loss.divergence} at T={cfg.student.temperature.start:g} + CE {loss.ce_weight:g}) "
           f"from {student_stage.teacher}")
    summary["student"] = train_stage(cfg, "student", student_stage, progress)
    teacher_dir = Path(student_stage.teacher)  # type: ignore[arg-type]
    student_dir = Path(summary["student"]["checkpoint"])
    summary.setdefault("teacher", {"checkpoint": str(teacher_dir)})

    header(f"quantize the student ({cfg.quant.method})")
    summary["quantized"] = quantize_stage(cfg, student_dir, split, device, progress)
    quantized_dir = Path(summary["quantized"]["checkpoint"])

    header(f"perplexity on the held-out text (window {cfg.eval.window})")
    if not (teacher_dir / "tokenizer.json").exists():
        raise ValueError(f"teacher {teacher_dir} has no tokenizer.json: the pipeline needs one to score text")
    tokenizer = Tokenizer.from_dir(teacher_dir)
    tokens = heldout_tokens(cfg, tokenizer, split)
    kind = "byte-level BPE trained on the training text" if cfg.teacher is not None else "the teacher's tokenizer"
    summary["eval"] = {"tokenizer": f"{kind}, {tokenizer.vocab_size} tokens ({teacher_dir / 'tokenizer.json'})",
                       "window": cfg.eval.window, "tokens": tokens.numel() - 1}
    summary["perplexity"] = evaluate_stage(cfg, {"teacher": teacher_dir, "student": student_dir,
                                                 "quantized_student": quantized_dir}, tokens, device)
    for name, r in summary["perplexity"].items():
        say(f"{name:>18}: ppl {r['ppl']:.2f} over {r['tokens']:,} tokens")

    header(f"serve: {len(cfg.serve.prompts)} prompts x {cfg.serve.max_tokens} tokens, greedy, batch 1")
    draft_dir = {"student": student_dir, "quantized": quantized_dir, "none": None}[cfg.serve.draft]
    summary["serving"], served = serving_stage(cfg, teacher_dir, draft_dir, quantized_dir,
                                               lambda s: say(f"  generating: {s}"))

    header(f"HTTP gateway on {cfg.gateway.host} (teacher{' + draft' if draft_dir else ''})")
    offline = summary["serving"].get("speculative", summary["serving"]["teacher"])
    summary["http"] = http_stage(cfg, served, offline, lambda s: say(f"  {s}"))
    summary["artifacts"] = artifacts(cfg, summary)
    summary["seconds"] = time.perf_counter() - t_start
    path = cfg.path("summary")
    path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    summary["artifacts"]["summary"] = str(path)
    return summary


def artifacts(cfg: PipelineConfig, summary: dict[str, Any]) -> dict[str, str]:
    """Name -> path of everything the run wrote."""
    out = Path(cfg.output_dir)
    found = {"pipeline": str(out / "run.json"), "data": str(cfg.path("data")),
             "teacher": summary["teacher"]["checkpoint"], "student": summary["student"]["checkpoint"],
             "quantized student": summary["quantized"]["checkpoint"], "stage configs": str(out / "configs")}
    for stage in ("teacher", "student"):
        run_dir = summary[stage].get("run_dir")
        if run_dir is not None:
            found[f"{stage} metrics"] = str(Path(run_dir) / "metrics.jsonl")
            curve = Path(run_dir) / "loss_curve.png"
            if curve.exists():
                found[f"{stage} loss curve"] = str(curve)
    found["summary"] = str(cfg.path("summary"))
    return found


def _model_name(model: Any) -> str:
    if isinstance(model, str):
        return model
    return f"custom d_model={model.d_model} layers={model.n_layers}"
