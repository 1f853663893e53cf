"""`tessera quantize`: quantize a checkpoint directory (tessera or HF) and write a quantized one.

    tessera quantize --model ckpt/ --method awq --calib corpus.txt --out ckpt-awq/
    tessera quantize --model ckpt/ --config quant.yaml --out ckpt-q/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from tessera.quant.api import as_quant_config, quantize, save_quantized
from tessera.specs import QuantConfig
from tessera.specs.model_card import Lineage
from tessera.specs.quant import AWQConfig

METHODS = ("int8", "int4_rtn", "awq", "fp8")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tessera quantize",
        description="Post-training quantization of a checkpoint: int8 weight-only (per-channel), int4 "
        "round-to-nearest, AWQ int4 (activation-aware scales + clipping, needs --calib) or FP8 E4M3. "
        "Writes model.safetensors + modelcard.json (recording the method and settings) + tokenizer.json.",
    )
    p.add_argument("--model", required=True, type=Path, help="tessera checkpoint or HF model directory")
    p.add_argument("--out", required=True, type=Path, help="directory for the quantized checkpoint")
    p.add_argument("--method", choices=METHODS, help="quantization method (defaults of its QuantConfig)")
    p.add_argument("--config", type=Path, help="QuantConfig as YAML or JSON (overrides the defaults; its method "
                   "must agree with --method when both are given)")
    p.add_argument("--calib", type=Path, help="calibration text file (AWQ), tokenized with the model's tokenizer")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device to quantize on (default: cuda when available, else cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def resolve_config(method: str | None, config_file: Path | None) -> QuantConfig:
    """The QuantConfig from --method and/or --config; raises ValueError when neither is given or they disagree."""
    if config_file is None:
        if method is None:
            raise ValueError("give --method or --config")
        return as_quant_config(method)
    config = QuantConfig.load(config_file)
    if method is not None and method != config.method:
        raise ValueError(f"--method {method!r} disagrees with method={config.method!r} in {config_file}")
    return config


def main_quantize(argv: list[str] | None = None) -> int:
    """Entry point of `tessera quantize`; returns the exit status (2 for a usage error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = resolve_config(args.method, args.config)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    if isinstance(config, AWQConfig) and args.calib is None:
        parser.error("--method awq needs --calib FILE (text to collect activation statistics from)")

    from tessera.model import load_model

    model, tokenizer = load_model(args.model, device=args.device)
    calib = None
    if args.calib is not None:
        if tokenizer is None:
            parser.error(f"--calib needs a tokenizer, and {args.model} has none")
        calib = [tokenizer.encode(args.calib.read_text())]
    quantize(model, config, calib, progress=not args.quiet)
    data = (str(args.calib),) if args.calib is not None else ()
    save_quantized(model, args.out, tokenizer=tokenizer,
                   lineage=Lineage(method="quantize", parent=str(args.model), data=data,
                                   notes=f"tessera quantize --method {config.method}"))
    print(f"wrote {config.method} checkpoint to {args.out}", file=sys.stderr)
    return 0
