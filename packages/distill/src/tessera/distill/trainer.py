"""`DistillTrainer(DistillConfig).fit()`: pretraining (CE only, no teacher) or distillation, in one process
or under torchrun, with any parallel strategy, resumable from sharded checkpoints.

    result = DistillTrainer(DistillConfig(teacher="runs/teacher/final", student="student-6m", steps=2000)).fit()
    result.final_dir   # <output_dir>/final: save_pretrained(student, tokenizer=...) with lineage

Writes to `output_dir`: `metrics.jsonl` (one row per logged step), `loss_curve.png`, `tokenizer.json`
(when trained here), `checkpoints/step-*/` (unless `checkpoint.dir` says elsewhere) and `final/`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tessera.distill.comm import Group, all_reduce_sum, barrier, init_from_env
from tessera.distill.data import PackedLoader, obtain_tokenizer, read_texts, tokenize
from tessera.distill.metrics import MetricsLog, plot_loss_curves
from tessera.distill.objective import DistillObjective
from tessera.distill.schedule import lr_at, temperature_at
from tessera.distill.sharded_checkpoint import agree_on_latest, load_checkpoint, save_checkpoint
from tessera.distill.strategy import DTYPES, Strategy, make_strategy
from tessera.model.checkpoint import save_pretrained
from tessera.model.loading import load_model
from tessera.model.tokenizer import Tokenizer
from tessera.model.transformer import Transformer
from tessera.specs import DistillConfig
from tessera.specs.model_card import Lineage

BUILTIN_DATA = "builtin:python-stdlib-docstrings"


@dataclass
class FitResult:
    final_dir: Path | None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int = 0
    memory: dict[str, float] = field(default_factory=dict)


class DistillTrainer:
    """Trains `config.student` against `config.teacher` (or alone with CE when there is no teacher)."""

    def __init__(self, config: DistillConfig, *, progress: bool = True) -> None:
        self.cfg = config
        self.progress = progress

    # -- setup ------------------------------------------------------------------------------------------------

    def _teacher(self, device: torch.device) -> tuple[Transformer | None, Tokenizer | None]:
        if self.cfg.teacher is None:
            return None, None
        dtype = DTYPES[self.cfg.parallel.compute_dtype]
        teacher, tok = load_model(self.cfg.teacher, device=device, dtype=dtype)
        teacher.eval().requires_grad_(False)
        return teacher, tok

    def _check_vocab(self, tokenizer: Tokenizer, teacher: Transformer | None) -> None:
        student_vocab = self.cfg.student_config().vocab_size
        if tokenizer.vocab_size > student_vocab:
            raise ValueError(f"tokenizer vocab_size {tokenizer.vocab_size} exceeds the student's vocab_size "
                             f"{student_vocab}; set data.vocab_size <= {student_vocab} or a larger student")
        if teacher is not None and teacher.config.vocab_size != student_vocab:
            raise ValueError(f"teacher vocab_size {teacher.config.vocab_size} != student vocab_size {student_vocab}: "
                             "KD compares logits over one vocabulary")

    # -- the loop ---------------------------------------------------------------------------------------------

    def fit(self) -> FitResult:
        cfg = self.cfg
        group, device = init_from_env(cfg.device, need_group=cfg.parallel.strategy == "fsdp2")
        torch.manual_seed(cfg.seed)
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        teacher, teacher_tok = self._teacher(device)
        texts = read_texts(cfg.data.paths)
        if cfg.data.tokenizer is None and teacher_tok is not None:
            tokenizer = teacher_tok
        else:
            tokenizer = obtain_tokenizer(texts, cfg.data.vocab_size, cfg.data.tokenizer, out, group)
        self._check_vocab(tokenizer, teacher)
        tokens = tokenize(tokenizer, texts)
        loader = PackedLoader(tokens, cfg.data.seq_len, cfg.data.batch_size, cfg.data.grad_accum, group,
                              seed=cfg.data.seed)
        student = Transformer(cfg.student_config()).to(device)
        objective = DistillObjective(student, cfg.loss, teacher.config.d_model if teacher is not None else None)
        objective.to(device)
        strategy = make_strategy(objective, list(student.model.layers), cfg.parallel, cfg.optimizer)
        ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else out / "checkpoints"
        start = 0
        latest = agree_on_latest(ckpt_dir, group) if cfg.checkpoint.resume else None
        if latest is not None:
            manifest = load_checkpoint(latest, strategy)
            start = manifest["step"]
            loader.load_state_dict(manifest["trainer"]["loader"])
        log = MetricsLog(out / "metrics.jsonl", resume=start > 0) if group.rank == 0 else None
        if log is not None and start:
            log.truncate_after(start)
        self._loop(strategy, teacher, objective, loader, group, device, start, ckpt_dir, log)
        result = FitResult(None, log.rows if log else [], start, strategy.memory_report())
        result.final_dir = self._save_final(strategy, tokenizer, loader, group, out)
        if log is not None:
            plot_loss_curves({"loss": [(r["step"], r["loss"]) for r in log.rows]}, out / "loss_curve.png",
                             title=f"{'distill' if teacher is not None else 'pretrain'}: {self._student_name()}")
        barrier(group)  # no rank returns (and maybe exits) while rank 0 is still writing
        return result

    def _student_name(self) -> str:
        return self.cfg.student if isinstance(self.cfg.student, str) else "custom student"

    def _loop(self, strategy: Strategy, teacher: Transformer | None, objective: DistillObjective,
              loader: PackedLoader, group: Group, device: torch.device, start: int, ckpt_dir: Path,
              log: MetricsLog | None) -> None:
        cfg = self.cfg
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16)
                    if cfg.parallel.compute_dtype == "bfloat16" and cfg.parallel.strategy == "none"
                    else contextlib.nullcontext())
        bar = tqdm(total=cfg.steps, initial=start, desc="distill" if teacher is not None else "train",
                   disable=not self.progress or group.rank != 0, dynamic_ncols=True)
        t_last, steps_since = time.perf_counter(), 0
        for step in range(start, cfg.steps):
            temperature = temperature_at(cfg.temperature, step, cfg.steps)
            lr = lr_at(cfg.optimizer, step, cfg.steps)
            sums = torch.zeros(4, device=device)
            for ids in loader.next_step():
                ids = ids.to(device, non_blocking=True)
                x, y = ids[:, :-1], ids[:, 1:]
                teacher_out = None
                if teacher is not None:
                    with torch.no_grad():
                        h_t, blocks_t = teacher.hidden_states(x, collect=objective.teacher_layers)
                    teacher_out = (h_t, teacher.lm_head.weight, blocks_t)
                with autocast:
                    loss, parts = strategy.module(x, y, temperature, teacher_out)
                (loss / loader.accum).backward()
                sums += torch.stack([loss.detach().float(), parts["kd"].float(), parts["ce"].float(),
                                     parts["hidden"].float()])
            grad_norm = strategy.step(lr, cfg.optimizer.grad_clip)
            steps_since += 1
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                sums = all_reduce_sum(sums, group) / (group.world * loader.accum)
                now = time.perf_counter()
                tok_s = loader.tokens_per_step * steps_since / (now - t_last)
                loss_v, kd, ce, hid = sums.tolist()
                row = {"step": done, "loss": loss_v, "kd": kd, "ce": ce, "hidden": hid, "lr": lr,
                       "temperature": temperature, "grad_norm": float(grad_norm), "tokens_per_s": tok_s,
                       "tokens": done * loader.tokens_per_step}
                if log is not None:
                    log.log(row)
                bar.set_postfix(loss=f"{loss_v:.4f}", tok_s=f"{tok_s:,.0f}")
                t_last, steps_since = now, 0
            bar.update(1)
            if cfg.checkpoint.every_steps and (done % cfg.checkpoint.every_steps == 0 or done == cfg.steps):
                save_checkpoint(ckpt_dir, done, strategy, {"loader": loader.state_dict()},
                                keep_last=cfg.checkpoint.keep_last)
        bar.close()

    def _save_final(self, strategy: Strategy, tokenizer: Tokenizer, loader: PackedLoader, group: Group,
                    out: Path) -> Path | None:
        full = strategy.full_state_dict()
        if group.rank != 0:
            return None
        cfg = self.cfg
        model = Transformer(cfg.student_config())
        prefix = "student."
        model.load_state_dict({k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)})
        lineage = Lineage(method="distill" if cfg.teacher else "pretrain", teacher=cfg.teacher,
                          data=tuple(cfg.data.paths) or (BUILTIN_DATA,), steps=cfg.steps,
                          tokens=cfg.steps * loader.tokens_per_step,
                          notes=f"strategy={cfg.parallel.strategy} world={group.world} "
                                f"loss={cfg.loss.divergence} T={cfg.temperature.kind}:{cfg.temperature.start}")
        return save_pretrained(model, out / "final", tokenizer=tokenizer, lineage=lineage)
