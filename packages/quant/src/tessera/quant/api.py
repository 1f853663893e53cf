"""`quantize`, `save_quantized`, `load_quantized`: the package's public entry points.

    model = quantize(model, QuantConfig(method="awq"), calib_token_ids)
    save_quantized(model, "out/", tokenizer=tok)
    model = load_quantized("out/")

`quantize` swaps each selected `nn.Linear` for its quantized module under the same qualified name.
A quantized checkpoint is a tessera checkpoint directory (`model.safetensors` + `modelcard.json`,
+ `tokenizer.json`) whose card's `quant` records the method and every setting; its tensors are the
quantized modules' buffers (`<layer>.qweight/scales/zeros`, `<layer>.weight/weight_scale`).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from tessera.model import Transformer
from tessera.model.checkpoint import (
    library_versions,
    load_state_dict,
    read_model_card,
    save_state_dict,
    write_model_card,
)
from tessera.model.tokenizer import Tokenizer
from tessera.quant.awq import apply_awq, calibration_batch
from tessera.quant.linear import FP8Linear, Int4Linear, Int8Linear, QuantLinear
from tessera.quant.rtn import int4_shape_problem
from tessera.specs import ModelCard, QuantConfig
from tessera.specs.model_card import Lineage
from tessera.specs.quant import AWQConfig, FP8Config, Int8Config, RTNInt4Config

_FLOAT_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class QuantConfigMismatch(ValueError):
    """A quantized checkpoint was asked for with settings other than those it was made with."""


def as_quant_config(config: QuantConfig | str) -> QuantConfig:
    """A `QuantConfig` from itself or from a method name ("int8", "int4_rtn", "awq", "fp8") with defaults."""
    return config if isinstance(config, QuantConfig) else QuantConfig(method=config)


def _skipped(name: str, skip: Sequence[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def _problem(linear: nn.Linear, config: QuantConfig) -> str | None:
    if isinstance(config, RTNInt4Config | AWQConfig):
        return int4_shape_problem(linear.weight.shape, config.group_size)
    return None


def plan_layers(model: nn.Module, config: QuantConfig) -> dict[str, nn.Linear]:
    """The linears `config` quantizes, by qualified name: every `nn.Linear` not matched by `config.skip`
    (suffix match on the name). Raises ValueError naming the layer and its shape when the method
    cannot handle one, unless `config.skip_unsupported`, which leaves such layers in floating point."""
    plan = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or _skipped(name, config.skip):
            continue
        problem = _problem(module, config)
        if problem is None:
            plan[name] = module
        elif not config.skip_unsupported:
            raise ValueError(
                f"layer {name!r} (weight shape {tuple(module.weight.shape)}) cannot be quantized with "
                f"method={config.method!r}: {problem}; add it to `skip` or set skip_unsupported=True"
            )
    return plan


def quantized_module(linear: nn.Linear, config: QuantConfig) -> QuantLinear:
    """The quantized replacement of `linear` under `config` (same shapes, device and bias)."""
    if isinstance(config, Int8Config):
        return Int8Linear.from_linear(linear)
    if isinstance(config, RTNInt4Config | AWQConfig):
        return Int4Linear.from_linear(linear, config.group_size, config.zero_point)
    if isinstance(config, FP8Config):
        return FP8Linear.from_linear(linear, config.weight_scale)
    raise TypeError(f"no quantized module for config of type {type(config).__name__}")


def quantize(model: nn.Module, config: QuantConfig | str,
             calib: Sequence[Sequence[int]] | torch.Tensor | None = None, *, progress: bool = True) -> nn.Module:
    """Quantize `model` in place and return it; `model.quant_config` records `config`.

    `calib` (token ids: a [N, T] tensor or sequences, concatenated and windowed) is required by AWQ
    and ignored by the other methods. Raises ValueError for an already-quantized model, for AWQ
    without calibration data, and for a layer the method cannot handle (see `plan_layers`).
    """
    config = as_quant_config(config)
    if getattr(model, "quant_config", None) is not None:
        raise ValueError(f"model is already quantized (method={model.quant_config.method!r})")
    plan = plan_layers(model, config)
    if isinstance(config, AWQConfig):
        if calib is None:
            raise ValueError("method='awq' needs calibration data: pass calib= token ids ([N, T] or sequences)")
        if not isinstance(model, Transformer):
            raise TypeError(f"method='awq' needs a tessera.model.Transformer, got {type(model).__name__}")
        seq_len = min(config.calib_seq_len, model.config.max_seq_len)
        apply_awq(model, config, calibration_batch(calib, config.calib_samples, seq_len), set(plan), progress)
    for name, linear in tqdm(plan.items(), desc=f"quantize {config.method}", unit="layer", disable=not progress):
        model.set_submodule(name, quantized_module(linear, config))
    model.quant_config = config
    return model


def _float_dtype(model: nn.Module) -> str:
    for p in model.parameters():
        if p.dtype in _FLOAT_DTYPES:
            return _FLOAT_DTYPES[p.dtype]
    return "float32"


def save_quantized(model: Transformer, directory: str | Path, *, tokenizer: Tokenizer | None = None,
                   lineage: Lineage | None = None, max_shard_bytes: int = 2**31) -> Path:
    """Write a quantized `model` to `directory` in the tessera checkpoint layout (`model.safetensors`, or
    shards + index above `max_shard_bytes`; `modelcard.json` with `quant`; `tokenizer.json` when
    given); returns the directory. Raises ValueError for a model `quantize` has not processed."""
    config = getattr(model, "quant_config", None)
    if config is None:
        raise ValueError("model is not quantized: call tessera.quant.quantize(model, config, ...) first")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if model.config.tie_embeddings and isinstance(model.lm_head, nn.Linear):
        state.pop("lm_head.weight", None)  # the embedding itself; re-tied on load
    weights = save_state_dict(state, directory, max_shard_bytes=max_shard_bytes)
    tok_info = None
    if tokenizer is not None:
        tokenizer.save_dir(directory)
        tok_info = tokenizer.info()
    card = ModelCard(
        config=model.config, dtype=_float_dtype(model), quant=config, tokenizer=tok_info,
        lineage=lineage or Lineage(method="quantize"), weights=weights, versions=library_versions(),
        created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    )
    write_model_card(card, directory)
    return directory


def read_quant_card(directory: str | Path) -> ModelCard:
    """The `ModelCard` of a quantized checkpoint. Raises FileNotFoundError without `modelcard.json` and
    ValueError when the card records no quantization."""
    card = read_model_card(directory)
    if card.quant is None:
        raise ValueError(f"{directory}: the model card records no quantization; load it with "
                         "tessera.model.checkpoint.load_pretrained")
    return card


def check_config(card: ModelCard, expected: QuantConfig | str, where: str | Path) -> None:
    """Raise QuantConfigMismatch naming every setting where `expected` differs from the card's `quant`."""
    stored = card.quant
    if isinstance(expected, str):
        if expected != stored.method:
            raise QuantConfigMismatch(f"{where}: checkpoint is quantized with method={stored.method!r}, "
                                      f"not {expected!r}")
        return
    if expected != stored:
        a, b = stored.model_dump(), expected.model_dump()
        diff = ", ".join(f"{k}: checkpoint {a.get(k)!r} vs requested {b.get(k)!r}"
                         for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k))
        raise QuantConfigMismatch(f"{where}: quantization settings differ from the checkpoint's ({diff})")


def _empty_quantized(name: str, linear: nn.Linear, config: QuantConfig, tensors: dict[str, torch.Tensor],
                     device: str | torch.device) -> QuantLinear | None:
    """The empty quantized module the checkpoint's tensors say `name` is, or None for a float layer."""
    kw = dict(bias=linear.bias is not None, dtype=linear.weight.dtype, device=device)
    stored = tensors.get(f"{name}.weight")
    if f"{name}.qweight" in tensors:
        if not isinstance(config, RTNInt4Config | AWQConfig):
            raise ValueError(f"layer {name!r} holds int4 tensors but the card says method={config.method!r}")
        return Int4Linear(linear.in_features, linear.out_features, group_size=config.group_size, **kw)
    if f"{name}.weight_scale" not in tensors:
        return None
    if isinstance(config, Int8Config) and stored is not None and stored.dtype == torch.int8:
        return Int8Linear(linear.in_features, linear.out_features, **kw)
    if isinstance(config, FP8Config) and stored is not None and stored.dtype == torch.float8_e4m3fn:
        return FP8Linear(linear.in_features, linear.out_features, weight_scale=config.weight_scale, **kw)
    got = None if stored is None else stored.dtype
    raise ValueError(f"layer {name!r}: weight dtype {got} does not fit the card's method={config.method!r}")


def load_quantized(directory: str | Path, *, device: str | torch.device = "cpu",
                   config: QuantConfig | str | None = None) -> Transformer:
    """Load a checkpoint written by `save_quantized` onto `device` (sha256 of every file verified,
    safetensors only; no weight is initialised and then overwritten).

    `config`, when given, must equal the card's settings (a method name checks the method only):
    otherwise QuantConfigMismatch names each differing field. Raises ValueError when a tensor's
    name, shape or dtype does not match the recorded method and settings.
    """
    directory = Path(directory)
    card = read_quant_card(directory)
    if config is not None:
        check_config(card, config, directory)
    tensors = load_state_dict(directory)
    with torch.device("meta"):
        model = Transformer(card.config).to(getattr(torch, card.dtype))
    for name, linear in list(model.named_modules()):
        if isinstance(linear, nn.Linear):
            module = _empty_quantized(name, linear, card.quant, tensors, "meta")
            if module is not None:
                model.set_submodule(name, module)
    tied = card.config.tie_embeddings and isinstance(model.lm_head, nn.Linear)
    if tied and "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    expected = model.state_dict()
    wrong = [f"{k}: {t.dtype} (expected {expected[k].dtype})" for k, t in tensors.items()
             if k in expected and t.dtype != expected[k].dtype]
    if wrong:
        raise ValueError(f"{directory}: tensors of the wrong dtype for method={card.quant.method!r}: {wrong[:4]}")
    try:
        model.load_state_dict({k: t.to(device) for k, t in tensors.items()}, strict=True, assign=True)
    except RuntimeError as exc:
        raise ValueError(f"{directory}: tensors do not match method={card.quant.method!r} "
                         f"with these settings: {exc}") from None
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    for module in model.modules():  # non-persistent buffers (RoPE frequencies) are recomputed on materialising
        if any(b.is_meta for b in module.buffers(recurse=False)):
            module.to_empty(device=device, recurse=False)
    model.quant_config = card.quant
    return model.eval()
