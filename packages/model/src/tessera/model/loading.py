"""`load_model`: one entry point for either kind of model directory.

A directory with `modelcard.json` is a tessera checkpoint (`checkpoint.load_pretrained`); one with
`config.json` is a Hugging Face directory (`hf.load_hf`). The card wins when both are present, since
a tessera checkpoint verifies its weights' checksums. The tokenizer comes from `tokenizer.json`
(+ `tokenizer_config.json`) beside the weights when there is one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from tessera.model.checkpoint import CARD, load_pretrained
from tessera.model.hf import load_hf
from tessera.model.tokenizer import Tokenizer
from tessera.model.transformer import Transformer


def model_dir_kind(directory: str | Path) -> Literal["tessera", "hf"]:
    """`"tessera"` for a directory with `modelcard.json`, `"hf"` for one with `config.json`.
    Raises FileNotFoundError naming the directory and the files looked for otherwise."""
    directory = Path(directory)
    if (directory / CARD).is_file():
        return "tessera"
    if (directory / "config.json").is_file():
        return "hf"
    raise FileNotFoundError(f"{directory} is not a model directory: it has neither {CARD} (tessera) "
                            "nor config.json (Hugging Face)")


def load_model(directory: str | Path, *, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> tuple[Transformer, Tokenizer | None]:
    """`(model, tokenizer)` from a tessera checkpoint or an HF directory; the model is in eval mode on
    `device` in `dtype` (default: as stored), the tokenizer None when the directory has no
    `tokenizer.json`. Raises what `model_dir_kind`, `load_pretrained` and `load_hf` raise (e.g. for a
    quantized checkpoint, which `tessera.quant.load_quantized` loads)."""
    directory = Path(directory)
    if model_dir_kind(directory) == "tessera":
        model = load_pretrained(directory, device=device, dtype=dtype)
    else:
        model = load_hf(directory, device=device, dtype=dtype)
    tokenizer = Tokenizer.from_dir(directory) if (directory / "tokenizer.json").is_file() else None
    return model, tokenizer
