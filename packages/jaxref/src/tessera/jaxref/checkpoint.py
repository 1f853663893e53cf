"""Tessera checkpoints read and written with numpy only (no torch).

A checkpoint directory holds `modelcard.json` (a `ModelCard`) and `model.safetensors`, or shards
listed in `model.safetensors.index.json`. Tensor names are the Hugging Face Llama/Qwen names
(`model.layers.{i}.self_attn.q_proj.weight`, ...; `lm_head.weight` absent when the embedding is
tied) with `nn.Linear` layout `[out, in]`; `to_hf_state` / `from_hf_state` convert to and from the
stacked `[in, out]` layout of `Params`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from tessera.jaxref.model import Params, param_shapes
from tessera.specs import Lineage, ModelCard, ModelConfig

CARD = "modelcard.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Params key -> (HF name inside model.layers.{i}, transposed from [out, in]?)
_LAYER_NAMES = {
    "attn_norm": ("input_layernorm.weight", False),
    "wq": ("self_attn.q_proj.weight", True),
    "wk": ("self_attn.k_proj.weight", True),
    "wv": ("self_attn.v_proj.weight", True),
    "wo": ("self_attn.o_proj.weight", True),
    "bq": ("self_attn.q_proj.bias", False),
    "bk": ("self_attn.k_proj.bias", False),
    "bv": ("self_attn.v_proj.bias", False),
    "q_norm": ("self_attn.q_norm.weight", False),
    "k_norm": ("self_attn.k_norm.weight", False),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "w_gate": ("mlp.gate_proj.weight", True),
    "w_up": ("mlp.up_proj.weight", True),
    "w_down": ("mlp.down_proj.weight", True),
}


def hf_names(cfg: ModelConfig) -> list[str]:
    """Every tensor name a checkpoint of `cfg` holds, in a stable order."""
    layer_keys = param_shapes(cfg)["layers"]
    names = ["model.embed_tokens.weight"]
    for i in range(cfg.n_layers):
        names += [f"model.layers.{i}.{_LAYER_NAMES[k][0]}" for k in _LAYER_NAMES if k in layer_keys]
    names.append("model.norm.weight")
    if not cfg.tie_embeddings:
        names.append("lm_head.weight")
    return names


def to_hf_state(params: Params, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """`Params` -> `{HF name: numpy array}` in `[out, in]` layout (dtype kept)."""
    state = {"model.embed_tokens.weight": np.asarray(params["embed"]), "model.norm.weight": np.asarray(params["norm"])}
    if "lm_head" in params:
        state["lm_head.weight"] = np.ascontiguousarray(np.asarray(params["lm_head"]).T)
    for key, stacked in params["layers"].items():
        name, transpose = _LAYER_NAMES[key]
        arr = np.asarray(stacked)
        for i in range(cfg.n_layers):
            state[f"model.layers.{i}.{name}"] = np.ascontiguousarray(arr[i].T if transpose else arr[i])
    return state


def from_hf_state(state: dict[str, np.ndarray], cfg: ModelConfig, dtype: jnp.dtype | None = None) -> Params:
    """`{HF name: array}` -> `Params` (jax arrays, cast to `dtype` when given).

    Raises KeyError naming a missing tensor, ValueError naming an unexpected tensor or one whose
    shape differs from what `cfg` implies.
    """
    expected = set(hf_names(cfg))
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise ValueError(f"checkpoint holds tensors that {cfg.family} config does not use: {unexpected[:5]}")
    missing = [n for n in hf_names(cfg) if n not in state]
    if missing:
        raise KeyError(f"checkpoint lacks tensor {missing[0]!r} ({len(missing)} missing in all)")
    shapes = param_shapes(cfg)

    def take(name: str, shape: tuple[int, ...], transpose: bool) -> np.ndarray:
        arr = state[name].T if transpose else state[name]
        if arr.shape != shape:
            got = state[name].shape
            raise ValueError(f"tensor {name!r} has shape {got}, config implies {shape[::-1] if transpose else shape}")
        return arr

    def put(arr: np.ndarray) -> jax.Array:
        return jnp.asarray(arr, dtype=dtype or arr.dtype)

    params: Params = {
        "embed": put(take("model.embed_tokens.weight", shapes["embed"], False)),
        "norm": put(take("model.norm.weight", shapes["norm"], False)),
        "layers": {},
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = put(take("lm_head.weight", shapes["lm_head"], True))
    for key, shape in shapes["layers"].items():
        name, transpose = _LAYER_NAMES[key]
        per_layer = [take(f"model.layers.{i}.{name}", shape[1:], transpose) for i in range(cfg.n_layers)]
        params["layers"][key] = put(np.stack(per_layer))
    return params


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def read_card(path: str | Path) -> ModelCard:
    """The `ModelCard` of checkpoint directory `path`; FileNotFoundError names the missing file."""
    card_path = Path(path) / CARD
    if not card_path.is_file():
        raise FileNotFoundError(f"{card_path} not found: {path} is not a tessera checkpoint directory")
    return ModelCard.load(card_path)


def load_checkpoint(path: str | Path, *, dtype: str | jnp.dtype | None = None,
                    verify: bool = True) -> tuple[Params, ModelConfig]:
    """Read a tessera checkpoint directory: returns `(params, cfg)` with jax arrays on the default device.

    `dtype` (e.g. "bfloat16") casts every tensor; None keeps the stored dtype. With `verify`, each
    weight file's sha256 must equal the card's. Raises FileNotFoundError for a missing card or
    weight file, ValueError for a quantized card, a digest mismatch, or tensors that do not fit
    the card's config (KeyError for a missing tensor). Sharded checkpoints are read through
    `model.safetensors.index.json`, which the card must list with every shard it names.
    """
    path = Path(path)
    card = read_card(path)
    if card.quant is not None:
        raise ValueError(f"{path} is a quantized checkpoint (quant.method={card.quant.method!r}); "
                         "tessera.jaxref reads full-precision checkpoints only")
    for name, digest in card.weights.items():
        file = path / name
        if not file.is_file():
            raise FileNotFoundError(f"weight file {file} listed in {CARD} is missing")
        if verify and (actual := _sha256(file)) != digest:
            raise ValueError(f"sha256 of {file} is {actual}, {CARD} says {digest}")
    files = [SINGLE]
    if INDEX in card.weights:
        files = sorted(set(json.loads((path / INDEX).read_text())["weight_map"].values()))
        if unlisted := [f for f in files if f not in card.weights]:
            raise ValueError(f"{INDEX} names shard {unlisted[0]!r}, which {CARD} does not list")
    state: dict[str, np.ndarray] = {}
    for name in files:
        state.update(load_file(path / name))
    jdtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
    return from_hf_state(state, card.config, jdtype), card.config


def _shards(state: dict[str, np.ndarray], max_shard_bytes: int) -> list[dict[str, np.ndarray]]:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in state.items():
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    return shards


def save_checkpoint(params: Params, cfg: ModelConfig, path: str | Path, *, lineage: Lineage | None = None,
                    max_shard_bytes: int = 2**31) -> Path:
    """Write `params` as a tessera checkpoint (`model.safetensors` or shards + index, `modelcard.json`).

    Tensors keep the parameters' dtype (all must share one of float32/bfloat16/float16); weight
    files of an earlier checkpoint in `path` are replaced. Returns the directory. Raises ValueError
    for mixed or unsupported dtypes.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = to_hf_state(params, cfg)
    dtypes = sorted({str(a.dtype) for a in state.values()})
    if len(dtypes) != 1 or dtypes[0] not in _DTYPES:
        raise ValueError(f"parameters must share one dtype of {sorted(_DTYPES)}, got {dtypes}")
    stored = dtypes[0]
    shards = _shards(state, max_shard_bytes)
    # Weight files of an earlier checkpoint here would otherwise outlive the card that stops listing them.
    for stale in [path / SINGLE, path / INDEX, *path.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    weights: dict[str, str] = {}
    if len(shards) == 1:
        save_file(shards[0], str(path / SINGLE))
        weights[SINGLE] = _sha256(path / SINGLE)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / name))
            weights[name] = _sha256(path / name)
            weight_map |= dict.fromkeys(shard, name)
        total = sum(a.nbytes for a in state.values())
        (path / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        weights[INDEX] = _sha256(path / INDEX)
    card = ModelCard(config=cfg, dtype=stored, lineage=lineage or Lineage(), weights=weights,
                     versions=_versions(), created=_dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    card.dump(path / CARD)
    return path


def _versions() -> dict[str, str]:
    out = {"jax": jax.__version__}
    for dist in ("tessera-jaxref", "tessera-specs"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return out
