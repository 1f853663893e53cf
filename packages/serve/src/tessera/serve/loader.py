"""Loading what the engine serves: a tessera checkpoint, an HF directory, or a quantized checkpoint,
optionally quantized at load time."""

from __future__ import annotations

from pathlib import Path

import torch

from tessera.model import Transformer
from tessera.model.tokenizer import Tokenizer
from tessera.specs import EngineConfig, QuantConfig


def serving_dtype(config: EngineConfig, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on CUDA and float32 elsewhere."""
    if config.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, config.dtype)


def load_for_serving(path: str | Path, *, device: torch.device, dtype: torch.dtype,
                     quant: QuantConfig | str | None = None) -> tuple[Transformer, Tokenizer | None]:
    """(model in eval mode on `device`, tokenizer or None). A directory whose card records `quant` loads
    through `tessera.quant.load_quantized` (its stored dtype is kept); `quant=` quantizes after loading
    (methods that need calibration data, such as AWQ, must be quantized ahead with `tessera quantize`)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {str(path)!r} does not exist")
    if (path / "modelcard.json").exists():
        from tessera.model.checkpoint import read_model_card

        if read_model_card(path).quant is not None:
            from tessera.quant import load_quantized

            tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").exists() else None
            return load_quantized(path, device=device).eval(), tokenizer
    from tessera.model import load_model

    model, tokenizer = load_model(path, device=device, dtype=dtype)
    if quant is not None:
        from tessera.quant import quantize

        model = quantize(model, quant, progress=False)
    return model.eval(), tokenizer
