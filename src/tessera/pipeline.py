"""Running a `PipelineConfig`: every stage of the demo, composed from the packages' public APIs.

    result = run_pipeline(PipelineConfig.preset("tiny"))
    result["perplexity"]["student"]["ppl"], result["serving"]["speculative"]["acceptance_rate"]

Stages: split the text into training and held-out documents; pretrain the teacher (`DistillTrainer`, CE
only); distill the student from it; quantize the student; score the three models' perplexity on the
held-out text; generate the same prompts with the teacher alone and with the student as speculative draft
(batch 1, greedy: the speedup and the acceptance rate are measured, not modelled); serve the teacher + draft
through the HTTP gateway on loopback and ask it a completion and a streaming chat. The result is a plain
dict (also written to `summary.json`). Each stage's resolved config is written under `configs/` so the
stage's own command (`tessera train/distill/quantize --config ...`) reruns it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tessera.distill.corpus import builtin_corpus
from tessera.distill.evaluate import perplexity
from tessera.distill.trainer import DistillTrainer
from tessera.model import load_model
from tessera.model.checkpoint import read_model_card
from tessera.model.tokenizer import Tokenizer
from tessera.quant import load_quantized, quantize, save_quantized
from tessera.serve import LLM
from tessera.specs import SamplingParams
from tessera.specs.model_card import Lineage
from tessera.specs.pipeline import PipelineConfig

# User text is cut into documents of about this many characters (at line ends) before the held-out split,
# so that every file contributes to both sides.
_DOC_CHARS = 2_000

Say = Callable[[str], None]


class RunMismatch(ValueError):
    """The output directory holds a run of a different pipeline or different data."""


@dataclass
class DataSplit:
    source: str
    train_file: Path
    heldout_file: Path
    documents: int
    heldout_documents: int
    train_chars: int
    heldout_chars: int


def _chunks(text: str, size: int) -> list[str]:
    out, current, length = [], [], 0
    for line in text.splitlines(keepends=True):
        current.append(line)
        length += len(line)
        if length >= size:
            out.append("".join(current))
            current, length = [], 0
    if current:
        out.append("".join(current))
    return out


def documents(cfg: PipelineConfig) -> tuple[list[str], str]:
    """(documents, description of their source): the built-in corpus' docstrings, or the `data` files cut
    into ~2,000-character pieces; at most `max_chars` characters. Raises FileNotFoundError for a missing file."""
    if not cfg.data:
        version = ".".join(map(str, sys.version_info[:3]))
        return builtin_corpus(cfg.max_chars), f"built-in: docstrings of the Python {version} standard library"
    docs: list[str] = []
    total = 0
    for name in cfg.data:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"data path {name!r} is not a file")
        for piece in _chunks(path.read_text(encoding="utf-8", errors="replace"), _DOC_CHARS):
            if cfg.max_chars is not None and total + len(piece) > cfg.max_chars:
                return docs, ", ".join(cfg.data)
            docs.append(piece)
            total += len(piece)
    return docs, ", ".join(cfg.data)


def split_data(cfg: PipelineConfig) -> DataSplit:
    """Write `data/train.txt` and `data/heldout.txt` (every `eval.heldout_every`-th document held out).
    Raises ValueError when there is too little text for both sides."""
    docs, source = documents(cfg)
    every = cfg.eval.heldout_every
    heldout = [d for i, d in enumerate(docs) if i % every == every - 1]
    train = [d for i, d in enumerate(docs) if i % every != every - 1]
    if not heldout or not train:
        raise ValueError(f"data: {len(docs)} documents (~{_DOC_CHARS:,} characters each) from {source} are too few "
                         f"to hold out one in {every}; give more text or lower eval.heldout_every")
    folder = cfg.path("data")
    folder.mkdir(parents=True, exist_ok=True)
    train_text, heldout_text = "\n\n".join(train), "\n\n".join(heldout)
    (folder / "train.txt").write_text(train_text, encoding="utf-8")
    (folder / "heldout.txt").write_text(heldout_text, encoding="utf-8")
    return DataSplit(source, folder / "train.txt", folder / "heldout.txt", len(docs), len(heldout),
                     len(train_text), len(heldout_text))


def claim_output_dir(cfg: PipelineConfig, split: DataSplit) -> None:
    """Record the pipeline and a digest of its text in `run.json`; a rerun of the same pipeline on the same
    text resumes from the stages' checkpoints. Raises RunMismatch when the directory holds another run
    (its checkpoints would otherwise be resumed by a different pipeline)."""
    digest = hashlib.sha256(split.train_file.read_bytes()).hexdigest()
    record = {"pipeline": cfg.model_dump(mode="json"), "train_sha256": digest}
    path = Path(cfg.output_dir) / "run.json"
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != record:
            what = "pipeline config" if previous.get("pipeline") != record["pipeline"] else "training text"
            raise RunMismatch(f"{cfg.output_dir} holds a run with a different {what}; choose another output "
                              "directory (--out) or delete it")
    path.write_text(json.dumps(record, indent=2) + "\n")


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


def _generate_one_by_one(llm: LLM, prompts: tuple[str, ...], sampling: SamplingParams) -> dict[str, Any]:
    llm.generate(list(prompts[:1]), SamplingParams(temperature=0.0, max_tokens=2))  # warm-up: allocations, caches
    texts, tokens, drafted, accepted = [], 0, 0, 0
    t0 = time.perf_counter()
    for prompt in prompts:
        out = llm.generate(prompt, sampling)[0]
        texts.append(out.outputs[0].text)
        tokens += len(out.outputs[0].token_ids)
        if out.metrics is not None:
            drafted += out.metrics.spec_draft_tokens
            accepted += out.metrics.spec_accepted_tokens
    seconds = time.perf_counter() - t0
    return {"texts": texts, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "draft_tokens": drafted, "accepted_tokens": accepted,
            "acceptance_rate": accepted / drafted if drafted else None}


def serving_stage(cfg: PipelineConfig, teacher_dir: Path, draft_dir: Path | None, quantized_dir: Path,
                  say: Say) -> tuple[dict[str, Any], LLM]:
    """Generate the prompts (batch 1, greedy, `max_tokens` each, EOS ignored so every run makes the same
    number of tokens) with the teacher alone, the teacher + draft, and the quantized student alone.
    Returns the measurements and the teacher + draft `LLM` (for the gateway)."""
    sampling = SamplingParams(temperature=0.0, max_tokens=cfg.serve.max_tokens, ignore_eos=True)
    prompts = cfg.serve.prompts
    say("teacher alone")
    plain = _generate_one_by_one(LLM(teacher_dir, config=cfg.engine_config(teacher_dir, None)), prompts, sampling)
    result: dict[str, Any] = {"prompts": list(prompts), "max_tokens": cfg.serve.max_tokens, "teacher": plain}
    served = LLM(teacher_dir, config=cfg.engine_config(teacher_dir, draft_dir))
    if draft_dir is not None:
        say(f"teacher + draft ({draft_dir.name}, k={cfg.serve.num_speculative_tokens})")
        spec = _generate_one_by_one(served, prompts, sampling)
        spec["speedup"] = plain["seconds"] / spec["seconds"]
        spec["same_text_as_teacher"] = spec["texts"] == plain["texts"]
        spec["draft"] = str(draft_dir)
        spec["num_speculative_tokens"] = cfg.serve.num_speculative_tokens
        result["speculative"] = spec
    say(f"quantized student alone ({cfg.quant.method})")
    small = LLM(quantized_dir, config=cfg.engine_config(quantized_dir, None))
    result["quantized_student"] = _generate_one_by_one(small, prompts, sampling)
    return result, served


def http_stage(cfg: PipelineConfig, served: LLM, offline: dict[str, Any], say: Say) -> dict[str, Any]:
    """Serve `served` through the gateway on `cfg.gateway`, ask a completion of the first prompt and a streaming
    chat with the second (the first when there is one), then stop. The completion must agree with the offline
    greedy text of the same prompt (a prefix of it: HTTP requests stop at EOS)."""
    from tessera.loopback import Loopback, ask
    from tessera.serve import AsyncEngine

    prompts = cfg.serve.prompts
    server = Loopback(AsyncEngine(served.engine), host=cfg.gateway.host, port=cfg.gateway.port,
                      served_model_name="teacher").start()
    say(f"listening on {server.url}")
    try:
        result = ask(server, prompts[0], prompts[min(1, len(prompts) - 1)], cfg.serve.max_tokens, say=say)
    finally:
        stopped = server.stop()
    result["completion"]["matches_offline_greedy"] = offline["texts"][0].startswith(result["completion"]["text"])
    result.update(stopped)
    say(f"stopped: server {'yes' if stopped['server_stopped'] else 'NO'}, "
        f"engine {'yes' if stopped['engine_stopped'] else 'NO'}")
    return result


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
    the stage headers. Raises RunMismatch when `cfg.output_dir` holds a different run."""
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
    claim_output_dir(cfg, split)
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
