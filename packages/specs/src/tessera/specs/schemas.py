"""Export the JSON Schema of every top-level spec: `python -m tessera.specs.schemas DIR`.

Files are named `<Spec>.v<schema_version>.json`; a test regenerates them and fails when a schema
changed without a version bump.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tessera.specs.distill import DistillConfig
from tessera.specs.engine import EngineConfig, SpeculativeConfig
from tessera.specs.kernels import KernelSpec
from tessera.specs.kv_cache import KVCacheHandle, KVCacheSpec
from tessera.specs.model_card import ModelCard
from tessera.specs.model_config import ModelConfig
from tessera.specs.pipeline import PipelineConfig
from tessera.specs.quant import QuantConfig
from tessera.specs.sampling import SamplingParams
from tessera.specs.serve_abi import GenerateRequest, RequestOutput
from tessera.specs.tensor import TensorSpec

SPECS = (ModelConfig, TensorSpec, KVCacheSpec, KVCacheHandle, KernelSpec, SamplingParams, EngineConfig,
         SpeculativeConfig, GenerateRequest, RequestOutput, DistillConfig, QuantConfig, ModelCard, PipelineConfig)


def schema_files() -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema, for every top-level spec at its current version."""
    return {f"{spec.__name__}.v{spec.SCHEMA_VERSION}.json": spec.model_json_schema() for spec in SPECS}


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in schema_files().items():
        path = directory / name
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the JSON Schema of every Tessera spec.")
    parser.add_argument("directory", type=Path, nargs="?", default=Path("docs/schemas"),
                        help="output folder (default: docs/schemas)")
    args = parser.parse_args(argv)
    for path in write(args.directory):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
