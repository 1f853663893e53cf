"""Sharded, atomic training checkpoints that any strategy at any world size can resume from.

Layout of one checkpoint, `<root>/step-00000100/`:
  shard-00000-of-00002.safetensors   one per rank: 1-D pieces keyed "state|param name|start" (a contiguous run
                                     of the parameter's flattened elements) plus that rank's RNG state
  manifest.json                      written last, by rank 0: step, world size, sha256 of every shard, the
                                     full shape of every parameter, where each piece lives, trainer state

Protocol: each rank writes its shard to a temporary name, fsyncs it, renames it into place and fsyncs the
directory; the ranks then exchange their piece lists (which is also the barrier after which every shard is
durable); only then does rank 0 write the manifest the same way (temp, fsync, rename, fsync). A checkpoint
without a manifest is incomplete and ignored, so a save killed at any point leaves the previous checkpoint
as the latest one. Pruning removes a manifest before the files it names.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from tessera.distill.comm import Group, barrier
from tessera.distill.strategy import Strategy

FORMAT = "tessera-sharded-checkpoint"
VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, corrupt, or does not fit the model it is loaded into."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _durable_write(path: Path, write) -> None:
    """Write through `write(tmp_path)`, fsync, rename onto `path`, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _key(state: str, name: str, start: int) -> str:
    return f"{state}|{name}|{start}"


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def save_checkpoint(root: str | Path, step: int, strategy: Strategy, trainer_state: dict[str, Any], *,
                    keep_last: int = 2) -> Path:
    """Save this rank's shard of `strategy` at `step` and, once every rank's shard is durable, the manifest.
    Collective: every rank calls it with the same `root` and `step`. Returns the checkpoint directory."""
    group = strategy.group
    path = step_dir(root, step)
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    pieces: list[tuple[str, str, int, int]] = []
    for state, name, start, values in strategy.pieces():
        key = _key(state, name, start)
        tensors[key] = values.detach().to("cpu", torch.float32).contiguous()
        pieces.append((state, name, start, start + values.numel()))
    tensors["rng|cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng|cuda"] = torch.cuda.get_rng_state()
    shard = path / f"shard-{group.rank:05d}-of-{group.world:05d}.safetensors"
    _durable_write(shard, lambda tmp: save_file(tensors, str(tmp), metadata={"format": FORMAT}))
    meta = {"file": shard.name, "sha256": _sha256(shard), "pieces": pieces}
    metas = [meta] * group.world
    if group.world > 1:
        dist.all_gather_object(metas, meta, group=group.pg)
    if group.rank == 0:
        shapes = {name: list(shape) for name, shape in strategy.param_shapes().items()}
        index: dict[str, dict[str, list]] = {}
        for m in metas:
            for state, name, start, stop in m["pieces"]:
                index.setdefault(state, {}).setdefault(name, []).append([start, stop, m["file"]])
        manifest = {"format": FORMAT, "version": VERSION, "step": step, "world_size": group.world,
                    "strategy": strategy.name, "optimizer_steps": strategy.step_count,
                    "shards": {m["file"]: m["sha256"] for m in metas}, "shapes": shapes, "index": index,
                    "trainer": trainer_state}
        _durable_write(path / "manifest.json", lambda tmp: tmp.write_text(json.dumps(manifest)))
        _prune(Path(root), keep_last, step)
    barrier(group)
    return path


def _prune(root: Path, keep_last: int, current: int) -> None:
    """Keep the newest `keep_last` complete checkpoints; drop older ones and incomplete ones older than
    `current` (leftovers of killed saves)."""
    complete = [p for p in _step_dirs(root) if (p / "manifest.json").exists()]
    doomed = complete[:-keep_last] if keep_last else complete
    doomed += [p for p in _step_dirs(root) if not (p / "manifest.json").exists() and _step_of(p) < current]
    for p in doomed:
        with contextlib.suppress(FileNotFoundError):
            (p / "manifest.json").unlink()
        shutil.rmtree(p, ignore_errors=True)


def _step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def _step_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)), key=_step_of)


def read_manifest(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """The manifest of checkpoint directory `path`; with `verify`, every shard must exist and match its
    sha256. Raises CheckpointError naming what is missing or wrong."""
    path = Path(path)
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no manifest.json (an incomplete save)") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}/manifest.json is not valid JSON: {exc}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r} "
                              f"is not {FORMAT!r} version {VERSION}")
    for name, digest in manifest["shards"].items():
        shard = path / name
        if not shard.exists():
            raise CheckpointError(f"{path}: shard {name} is missing")
        if verify and _sha256(shard) != digest:
            raise CheckpointError(f"{path}: shard {name} does not match its sha256")
    return manifest


def latest_checkpoint(root: str | Path, verify: bool = True) -> Path | None:
    """The newest complete checkpoint under `root` (None when there is none)."""
    for p in reversed(_step_dirs(Path(root))):
        try:
            read_manifest(p, verify=verify)
        except CheckpointError:
            continue
        return p
    return None


class _Reader:
    """Reads any flat range of any saved tensor, stitching pieces from whichever shards hold them."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path, self.index = path, manifest["index"]
        self._files: dict[str, Any] = {}

    def _open(self, name: str):
        if name not in self._files:
            self._files[name] = safe_open(str(self.path / name), framework="pt")
        return self._files[name]

    def __call__(self, state: str, name: str, start: int, stop: int) -> torch.Tensor:
        pieces = self.index.get(state, {}).get(name)
        if pieces is None:
            raise CheckpointError(f"{self.path}: no {state!r} saved for parameter {name!r}")
        out = torch.empty(stop - start, dtype=torch.float32)
        filled = 0
        for p_start, p_stop, file in pieces:
            a, b = max(start, p_start), min(stop, p_stop)
            if a < b:
                out[a - start:b - start] = self._open(file).get_slice(_key(state, name, p_start))[a - p_start:
                                                                                                  b - p_start]
                filled += b - a
        if filled != stop - start:
            raise CheckpointError(f"{self.path}: {state} of {name!r} elements [{start}, {stop}) are not all saved")
        return out


def load_checkpoint(path: str | Path, strategy: Strategy, *, verify: bool = True,
                    restore_rng: bool = True) -> dict[str, Any]:
    """Load checkpoint `path` into `strategy` (any world size, any strategy) and return its manifest.

    Raises CheckpointError when the checkpoint is incomplete or its parameter shapes differ from the model's.
    """
    path = Path(path)
    manifest = read_manifest(path, verify=verify)
    for name, shape in strategy.param_shapes().items():
        saved = manifest["shapes"].get(name)
        if saved != list(shape):
            raise CheckpointError(f"{path}: parameter {name!r} has shape {saved} in the checkpoint, "
                                  f"{list(shape)} in the model")
    reader = _Reader(path, manifest)
    strategy.load(lambda state, name, a, b: reader(state, name, a, b).to(strategy.device),
                  manifest["optimizer_steps"])
    group = strategy.group
    if restore_rng and manifest["world_size"] == group.world:
        shard = path / f"shard-{group.rank:05d}-of-{group.world:05d}.safetensors"
        with safe_open(str(shard), framework="pt") as f:
            torch.set_rng_state(f.get_tensor("rng|cpu"))
            if "rng|cuda" in f.keys() and torch.cuda.is_available():
                torch.cuda.set_rng_state(f.get_tensor("rng|cuda"))
    return manifest


def agree_on_latest(root: str | Path, group: Group) -> Path | None:
    """`latest_checkpoint` as seen by rank 0, broadcast so every rank resumes from the same step."""
    latest = latest_checkpoint(root) if group.rank == 0 else None
    found = [str(latest) if latest is not None else None]
    if group.world > 1:
        dist.broadcast_object_list(found, src=0, group=group.pg)
    return Path(found[0]) if found[0] else None
