"""Launch an autotuned kernel without paying for the autotuner on every call.

`triton.autotune`'s `run` rebuilds argument dicts and its cache key from every argument on each call
(tens of microseconds at decode, where the kernel itself runs for a few). `TunedLaunch` lets the
autotuner pick a config once per caller-made key, then launches the plain JIT function with that
config. The caller's key must hold everything the autotuner's key and its config pruning depend on
(shapes, bucket, dtypes, constexprs), so a remembered config is always one the autotuner could have
picked for that call.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import triton

#: A grid: the launch's meta-parameters (the config's kwargs) -> program counts.
Grid = Callable[[dict[str, Any]], tuple[int, ...]]


class TunedLaunch:
    """`launch(key, grid, *args, **kwargs)` runs `kernel` (a `triton.runtime.Autotuner`) as
    `kernel[grid](*args, **kwargs)` would, tuning on the first call per key only."""

    def __init__(self, kernel: triton.runtime.Autotuner) -> None:
        self.kernel = kernel
        self._meta: dict[Hashable, dict[str, Any]] = {}
        self._hooks: dict[Hashable, Callable[[dict[str, Any]], None]] = {}

    def __call__(self, key: Hashable, grid: Grid, *args: Any, **kwargs: Any) -> None:
        meta = self._meta.get(key)
        if meta is None:
            self.kernel[grid](*args, **kwargs)
            best = self.kernel.best_config
            self._meta[key] = best.all_kwargs()
            if best.pre_hook is not None:
                self._hooks[key] = best.pre_hook
            return
        hook = self._hooks.get(key)
        if hook is not None:  # a config's pre-hook (e.g. sizing TMA boxes) runs before every launch
            hook({**dict(zip(self.kernel.fn.arg_names, args)), **kwargs, **meta})
        self.kernel.fn[grid(meta)](*args, **kwargs, **meta)

    def remembered(self, key: Hashable) -> dict[str, Any] | None:
        """The config kwargs launched for `key`, or None before its first call."""
        return self._meta.get(key)

    def tuned(self) -> dict[Hashable, dict[str, Any]]:
        """Every key tuned so far and the config kwargs it launches with (a copy)."""
        return {key: dict(meta) for key, meta in self._meta.items()}
