"""Tessera checkpoints: safetensors weights plus a `modelcard.json` that records the config, the
sha256 of every weight file, lineage and versions. Nothing here unpickles anything.

A directory holds `model.safetensors`, or, when the weights exceed `max_shard_bytes`,
`model-0000i-of-0000n.safetensors` shards with a Hugging Face style `model.safetensors.index.json`;
then `modelcard.json` (written last: its presence marks a complete checkpoint) and, when given,
`tokenizer.json` (+ `tokenizer_config.json`). Tensor names are `state_dict()` names;
`lm_head.weight` is omitted when the embeddings are tied.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import safetensors
import torch
from safetensors.torch import load_file, save_file

from tessera.model.transformer import Transformer
from tessera.specs import Lineage, ModelCard, ModelConfig, SpecVersionError

if TYPE_CHECKING:
    from tessera.model.tokenizer import Tokenizer

CARD = "modelcard.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
TIED_KEY, EMBED_KEY = "lm_head.weight", "model.embed_tokens.weight"
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ChecksumError(ValueError):
    """A weight file is missing or its sha256 differs from the one in `modelcard.json`."""


def save_pretrained(model: Transformer, directory: str | Path, *, tokenizer: Tokenizer | None = None,
                    lineage: Lineage | None = None, dtype: torch.dtype | str | None = None,
                    max_shard_bytes: int = 2**31) -> Path:
    """Write `model` (cast to `dtype` if given: float32, bfloat16 or float16) to `directory`; returns it.

    Weight files of an earlier checkpoint in the same directory are replaced. Raises ValueError for
    an unsupported dtype or a non-positive `max_shard_bytes`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch_dtype = _torch_dtype(dtype) if dtype is not None else model.model.embed_tokens.weight.dtype
    dtype_name = _dtype_name(torch_dtype)
    tensors = {name: t.to(torch_dtype) if t.is_floating_point() else t for name, t in model.state_dict().items()}
    if model.config.tie_embeddings:
        tensors.pop(TIED_KEY, None)
    weights = save_state_dict(tensors, directory, max_shard_bytes=max_shard_bytes)
    tok_info = None
    if tokenizer is not None:
        tokenizer.save_dir(directory)
        tok_info = tokenizer.info()
    card = ModelCard(config=model.config, dtype=dtype_name, tokenizer=tok_info, lineage=lineage or Lineage(),
                     weights=weights, versions=library_versions(),
                     created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
    write_model_card(card, directory)
    return directory


def save_state_dict(tensors: Mapping[str, torch.Tensor], directory: str | Path, *,
                    max_shard_bytes: int = 2**31) -> dict[str, str]:
    """Write `tensors` as `model.safetensors`, or as shards + index when their total exceeds
    `max_shard_bytes` (a tensor larger than the limit gets a shard of its own). Removes weight files
    of a previous save in `directory`. Returns `{file name: sha256}` of every file written,
    the index included: the `weights` field of a `ModelCard`."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    directory = Path(directory)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        # safetensors refuses views and shared storage: give every tensor its own contiguous copy.
        shards[-1][name] = t.detach().to("cpu", copy=True).contiguous()
        size += nbytes
    _remove_old_weights(directory)
    if len(shards) == 1:
        return {SINGLE: _write_safetensors(shards[0], directory / SINGLE)}
    digests: dict[str, str] = {}
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        digests[file] = _write_safetensors(shard, directory / file)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    digests[INDEX] = _write_atomic(directory / INDEX, (json.dumps(index, indent=2) + "\n").encode())
    return digests


def write_model_card(card: ModelCard, directory: str | Path) -> Path:
    """Write `card` as `directory/modelcard.json` (atomically); returns the path."""
    path = Path(directory) / CARD
    _write_atomic(path, (card.to_json() + "\n").encode())
    return path


def read_model_card(directory: str | Path) -> ModelCard:
    """The `ModelCard` of a checkpoint directory, migrated to the current schema.

    Raises FileNotFoundError when there is no `modelcard.json`, `SpecVersionError` (a ValueError)
    when the card's `schema_version` is newer than this code supports.
    """
    path = Path(directory) / CARD
    if not path.is_file():
        raise FileNotFoundError(f"no {CARD} in {directory}: not a tessera checkpoint directory")
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    try:
        data = ModelCard.migrate(data)
    except SpecVersionError as err:
        raise SpecVersionError(f"{path}: {err}") from None
    return ModelCard.model_validate(data)


def load_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (CPU, as stored), after verifying the sha256 of every file the
    card lists. Raises `ChecksumError` naming the file that is missing or differs, ValueError when
    the index names a shard the card does not list."""
    directory = Path(directory)
    card = read_model_card(directory)
    for file, digest in card.weights.items():
        path = directory / file
        if not path.is_file():
            raise ChecksumError(f"weight file {file} listed in {CARD} is missing from {directory}")
        actual = sha256_file(path)
        if actual != digest:
            raise ChecksumError(f"weight file {path} is corrupted: sha256 {actual} != {digest} recorded in {CARD}")
    if INDEX not in card.weights:
        return load_file(directory / SINGLE)
    weight_map: dict[str, str] = json.loads((directory / INDEX).read_text())["weight_map"]
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(set(weight_map.values())):
        if file not in card.weights:
            raise ValueError(f"{INDEX} names shard {file!r}, which {CARD} does not list")
        tensors.update(load_file(directory / file))
    return tensors


def load_pretrained(directory: str | Path, *, device: torch.device | str = "cpu",
                    dtype: torch.dtype | str | None = None) -> Transformer:
    """A `Transformer` with the checkpoint's weights, on `device`, in `dtype` (default: as stored).

    Raises ValueError for a quantized checkpoint (load it with `tessera.quant.load_quantized`),
    `ChecksumError` for a corrupted file, ValueError when the tensors do not fit the card's config.
    """
    directory = Path(directory)
    card = read_model_card(directory)
    if card.quant is not None:
        raise ValueError(f"{directory} is a quantized checkpoint (quant.method={card.quant.method!r}); "
                         "load it with tessera.quant.load_quantized")
    tensors = load_state_dict(directory)
    try:
        return model_from_state_dict(card.config, tensors, device=device, dtype=dtype or card.dtype)
    except ValueError as err:
        raise ValueError(f"weights in {directory} do not match its config: {err}") from None


def model_from_state_dict(cfg: ModelConfig, tensors: Mapping[str, torch.Tensor], *,
                          device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None) -> Transformer:
    """A `Transformer(cfg)` (eval mode) holding `tensors` (state_dict names), moved to `device` and
    cast to `dtype` (float tensors only; default: as given). Never initialises weights it will
    overwrite. With `cfg.tie_embeddings`, `lm_head.weight` may be absent and is the embedding.
    Raises ValueError naming missing, unexpected or misshapen tensors."""
    torch_dtype = None if dtype is None else _torch_dtype(dtype)
    tensors = {k: (t.to(torch_dtype) if torch_dtype is not None and t.is_floating_point() else t).to(device)
               for k, t in tensors.items()}
    if cfg.tie_embeddings and EMBED_KEY in tensors:
        tensors[TIED_KEY] = tensors[EMBED_KEY]
    with torch.device("meta"):
        model = Transformer(cfg)
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(str(err)) from None
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb.to_empty(device=device)  # recomputes the non-persistent RoPE frequencies
    return model.eval()


def library_versions() -> dict[str, str]:
    """Versions of the libraries that wrote a checkpoint (recorded in the card's `versions`)."""
    try:
        tessera_version = metadata.version("tessera-model")
    except metadata.PackageNotFoundError:  # run from a source tree (PYTHONPATH) rather than installed
        from tessera.specs import __version__ as tessera_version
    return {"tessera": tessera_version, "torch": torch.__version__, "safetensors": safetensors.__version__}


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> str:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)
    return sha256_file(path)


def _write_atomic(path: Path, data: bytes) -> str:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()


def _remove_old_weights(directory: Path) -> None:
    for path in directory.iterdir():
        if path.name in (SINGLE, INDEX) or _SHARD.fullmatch(path.name):
            path.unlink()


def _torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        _dtype_name(dtype)
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"checkpoint dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def _dtype_name(dtype: torch.dtype) -> str:
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"checkpoint dtype must be one of {sorted(_DTYPES)}, got {dtype}")
