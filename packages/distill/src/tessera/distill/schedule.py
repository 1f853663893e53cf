"""Schedules over training steps: the distillation temperature and the learning rate."""

from __future__ import annotations

import math

from tessera.specs.distill import OptimizerConfig, TemperatureSchedule


def _progress(step: int, total_steps: int) -> float:
    if total_steps <= 1:
        return 1.0
    return min(max(step / (total_steps - 1), 0.0), 1.0)


def temperature_at(schedule: TemperatureSchedule, step: int, total_steps: int) -> float:
    """Temperature at `step` (0-based) of `total_steps`: `start` throughout (constant), or from `start`
    at step 0 to `end` at the last step, linearly or along a half cosine. `end` defaults to `start`."""
    start = schedule.start
    end = schedule.end if schedule.end is not None else start
    frac = _progress(step, total_steps)
    if schedule.kind == "constant":
        return start
    if schedule.kind == "linear":
        return start + (end - start) * frac
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * frac))


def lr_at(opt: OptimizerConfig, step: int, total_steps: int) -> float:
    """Learning rate at `step` (0-based): linear warm-up over `warmup_steps` from lr/warmup_steps to lr,
    then constant or a cosine decay to `lr * min_lr_ratio` at the last step."""
    if opt.warmup_steps and step < opt.warmup_steps:
        return opt.lr * (step + 1) / opt.warmup_steps
    if opt.schedule == "constant":
        return opt.lr
    decay_steps = max(total_steps - opt.warmup_steps, 1)
    frac = _progress(step - opt.warmup_steps, decay_steps)
    floor = opt.lr * opt.min_lr_ratio
    return floor + (opt.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))
