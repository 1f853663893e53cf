"""Hugging Face interop: read Llama / Qwen2 / Qwen3 directories, write ones `transformers` loads.

A Hugging Face model directory holds `config.json` plus `model.safetensors` (or shards listed by
`model.safetensors.index.json`). Our `Transformer`'s parameter names are HF's, so weights move
without renaming; what needs translating is the config: field names, the two RoPE formats
(`rope_parameters`, current; `rope_theta` + `rope_scaling`, what most published checkpoints carry),
and family quirks (Qwen2 always has q/k/v biases, Qwen3 always QK-norm and a 128 default head_dim).

Weights are read from safetensors only: a directory that has only pickle files (`*.bin`, `*.pt`)
is refused.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from tessera.model.checkpoint import INDEX, SINGLE, model_from_state_dict, save_state_dict
from tessera.model.tokenizer import Tokenizer
from tessera.model.transformer import Transformer
from tessera.specs import ModelConfig, RopeScaling

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# Buffers some older exports saved; RoPE frequencies are recomputed from the config instead.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class UnsupportedModelError(ValueError):
    """An HF config names an architecture, model_type or feature this Transformer cannot express."""


# ------------------------------------------------------------------------------------------- config


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """Translate an HF `config.json` dict (Llama, Qwen2 or Qwen3) into a `ModelConfig`.

    Accepts RoPE as `rope_parameters` or as `rope_theta` + `rope_scaling` (types default, linear,
    llama3). Raises UnsupportedModelError naming an unsupported `model_type`, `architectures` entry,
    activation, RoPE type, sliding-window attention or bias layout; ValueError naming a missing field.
    """
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(f"model_type {model_type!r} is not supported; supported: {sorted(ARCHITECTURES)}")
    for arch in hf.get("architectures") or ():
        if arch != ARCHITECTURES[model_type]:
            raise UnsupportedModelError(
                f"architectures entry {arch!r} is not supported for model_type {model_type!r}; "
                f"supported: {ARCHITECTURES[model_type]!r}")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"hidden_act {act!r} is not supported (SwiGLU needs 'silu')")
    _reject_sliding_window(hf)
    d_model, n_heads, vocab = _need(hf, "hidden_size"), _need(hf, "num_attention_heads"), _need(hf, "vocab_size")
    attention_bias = _attention_bias(hf, model_type)
    theta, scaling = _rope(hf)
    default_head_dim = 128 if model_type == "qwen3" else d_model // n_heads  # Qwen3Config's default is 128
    fields: dict[str, Any] = dict(
        family=model_type, vocab_size=vocab, d_model=d_model, n_layers=_need(hf, "num_hidden_layers"),
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or default_head_dim, d_ff=_need(hf, "intermediate_size"),
        rope_theta=theta, rope_scaling=scaling, norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_seq_len=hf.get("max_position_embeddings", 2048), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qk_norm=model_type == "qwen3", attention_bias=attention_bias,
        bos_token_id=_token_id(hf, "bos_token_id", vocab), eos_token_id=_token_id(hf, "eos_token_id", vocab),
    )
    if hf.get("initializer_range"):
        fields["init_std"] = hf["initializer_range"]
    return ModelConfig(**fields)


def _need(hf: Mapping[str, Any], key: str) -> Any:
    if hf.get(key) is None:
        raise ValueError(f"config.json has no {key!r}")
    return hf[key]


def _attention_bias(hf: Mapping[str, Any], model_type: str) -> bool:
    if model_type == "qwen2":  # Qwen2 hard-codes q/k/v biases and no o_proj bias
        return True
    if hf.get("attention_bias"):  # Llama and Qwen3 put the bias on o_proj too, which this model lacks
        raise UnsupportedModelError(f"attention_bias=True for model_type {model_type!r} (o_proj bias) is not supported")
    if hf.get("mlp_bias"):
        raise UnsupportedModelError("mlp_bias=True is not supported")
    return False


def _reject_sliding_window(hf: Mapping[str, Any]) -> None:
    layer_types = hf.get("layer_types")
    if layer_types is not None:
        sliding = [i for i, kind in enumerate(layer_types) if kind != "full_attention"]
    elif hf.get("use_sliding_window") and hf.get("sliding_window"):
        sliding = list(range(hf.get("max_window_layers", 0), hf.get("num_hidden_layers", 0)))
    else:
        sliding = []
    if sliding:
        raise UnsupportedModelError(f"sliding-window attention (layers {sliding}) is not supported")


def _rope(hf: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    # `rope_scaling` takes precedence over `rope_parameters`, as in transformers' own loader.
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    if params and all(isinstance(v, Mapping) for v in params.values()):
        raise UnsupportedModelError(f"per-layer-type RoPE parameters ({sorted(params)}) are not supported")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise UnsupportedModelError(f"partial_rotary_factor {partial} is not supported")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, RopeScaling(type="linear", factor=params["factor"])
    if kind == "llama3":
        return theta, RopeScaling(
            type="llama3", factor=params["factor"], low_freq_factor=params["low_freq_factor"],
            high_freq_factor=params["high_freq_factor"],
            original_max_position_embeddings=params.get("original_max_position_embeddings",
                                                        hf.get("max_position_embeddings", 8192)))
    raise UnsupportedModelError(f"rope_type {kind!r} is not supported; supported: default, linear, llama3")


def _token_id(hf: Mapping[str, Any], key: str, vocab: int) -> int | None:
    value = hf.get(key)
    if isinstance(value, list):  # e.g. Llama-3.1-Instruct lists several EOS ids; the first is the primary
        value = value[0] if value else None
    if value is not None and not 0 <= value < vocab:
        # transformers' family defaults (e.g. Qwen2's 151643) often exceed the vocab of small test models;
        # an id the model can never emit carries no information.
        warnings.warn(f"config.json {key}={value} lies outside vocab_size={vocab}; ignoring it", stacklevel=3)
        return None
    return value


def hf_config_from(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The HF `config.json` dict for `cfg`. The architecture follows the features: QK-norm -> Qwen3,
    q/k/v biases -> Qwen2, else the config's family (Llama or Qwen2). Raises UnsupportedModelError for
    a feature set no HF family holds exactly."""
    model_type = _hf_model_type(cfg)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope = {"rope_type": s.type, "factor": s.factor, "rope_theta": cfg.rope_theta}
        if s.type == "llama3":
            rope.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                        original_max_position_embeddings=s.original_max_position_embeddings)
    dtype_name = str(dtype).removeprefix("torch.")
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]], "model_type": model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
        # Both RoPE formats: transformers >= 5 reads `rope_parameters`, earlier releases `rope_theta` +
        # `rope_scaling`; each ignores the other's keys, so one file loads correctly in either.
        "rope_parameters": rope, "rope_theta": cfg.rope_theta,
        "rope_scaling": None if cfg.rope_scaling is None else {k: v for k, v in rope.items() if k != "rope_theta"},
        "use_cache": True, "dtype": dtype_name, "torch_dtype": dtype_name,
    }
    if model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    else:
        if model_type == "qwen3":
            out["attention_bias"] = cfg.attention_bias
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers,
                   layer_types=["full_attention"] * cfg.n_layers)
    return out


def _hf_model_type(cfg: ModelConfig) -> str:
    if cfg.qk_norm:
        return "qwen3"
    if cfg.attention_bias:
        return "qwen2"
    return "qwen2" if cfg.family == "qwen2" else "llama"


# ------------------------------------------------------------------------------------------- weights


def weight_files(directory: str | Path) -> list[Path]:
    """The safetensors files of an HF directory: the shards named by `model.safetensors.index.json`,
    else `model.safetensors`, else every `*.safetensors`. Raises ValueError when only pickle weights
    exist (naming them) and FileNotFoundError when there are no weights or a listed shard is missing."""
    directory = Path(directory)
    index = directory / INDEX
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        pickles = [n for n in names if not n.endswith(".safetensors")]
        if pickles:
            raise ValueError(f"{index} lists non-safetensors weight files {pickles}; pickle is never loaded")
        files = [directory / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are missing: {missing}")
        return files
    if (directory / SINGLE).is_file():
        return [directory / SINGLE]
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"{directory} holds only pickle weights {pickles}; they are never loaded "
                         "(convert them to safetensors first)")
    raise FileNotFoundError(f"no *.safetensors weights in {directory}")


def load_hf(directory: str | Path, *, device: str | torch.device = "cpu",
            dtype: torch.dtype | None = None) -> Transformer:
    """Load an HF Llama / Qwen2 / Qwen3 directory (config.json + single or sharded safetensors) as a
    `Transformer` in eval mode on `device`, in `dtype` (default: the dtype the weights are stored in).

    Raises FileNotFoundError (no config.json / weights), UnsupportedModelError (see `config_from_hf`),
    and ValueError for pickle-only weights or tensors that are missing, unexpected or misshapen.
    """
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {directory}")
    cfg = config_from_hf(json.loads(config_path.read_text()))
    tensors: dict[str, torch.Tensor] = {}
    for path in weight_files(directory):
        tensors.update((k, v) for k, v in load_file(str(path)).items() if not k.endswith(_IGNORED_SUFFIXES))
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # some exports store the tied copy too
    try:
        return model_from_state_dict(cfg, tensors, device=device, dtype=dtype)
    except ValueError as err:
        raise ValueError(f"weights in {directory} do not fit its config.json: {err}") from None


def export_hf(model: Transformer, directory: str | Path, tokenizer: Tokenizer | None = None, *,
              dtype: torch.dtype | None = None, max_shard_bytes: int = 2**31) -> Path:
    """Write `model` as an HF directory `transformers` loads with `AutoModelForCausalLM.from_pretrained`:
    config.json, model.safetensors (or shards + model.safetensors.index.json when larger than
    `max_shard_bytes`), and tokenizer.json + tokenizer_config.json when `tokenizer` is given.

    `dtype` defaults to the model's. Raises UnsupportedModelError for a model whose tensors are not
    those of a plain `Transformer` (e.g. quantized layers) or whose features no HF family holds.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    dtype = dtype or next(model.parameters()).dtype
    hf_cfg = hf_config_from(cfg, dtype)
    tensors = dict(_export_tensors(model, hf_cfg["model_type"], dtype))
    (directory / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    save_state_dict(tensors, directory, max_shard_bytes=max_shard_bytes)
    if tokenizer is not None:
        tokenizer.save_dir(directory)
    return directory


def _export_tensors(model: Transformer, model_type: str, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    cfg = model.config
    with torch.device("meta"):
        expected = Transformer(cfg).state_dict()
    state = model.state_dict()
    foreign = sorted(set(state) - set(expected))
    if foreign:
        raise UnsupportedModelError(f"export_hf needs a plain Transformer; found tensors {foreign[:8]}")
    for name, tensor in state.items():
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue
        yield name, tensor.detach().to(device="cpu", dtype=dtype).contiguous()
    # HF's fixed bias layouts: zero biases are the exact equivalent of ours having none.
    for i in range(cfg.n_layers):
        attn = f"model.layers.{i}.self_attn"
        hd = cfg.head_dim or cfg.d_model // cfg.n_heads
        if model_type == "qwen2" and not cfg.attention_bias:
            yield f"{attn}.q_proj.bias", torch.zeros(cfg.n_heads * hd, dtype=dtype)
            yield f"{attn}.k_proj.bias", torch.zeros(cfg.n_kv_heads * hd, dtype=dtype)
            yield f"{attn}.v_proj.bias", torch.zeros(cfg.n_kv_heads * hd, dtype=dtype)
        if model_type == "qwen3" and cfg.attention_bias:
            yield f"{attn}.o_proj.bias", torch.zeros(cfg.d_model, dtype=dtype)
