"""Schemas are committed; a change without a version bump fails. Old versions migrate forward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from tessera.specs import ModelConfig, SpecVersionError
from tessera.specs.schemas import schema_files

SCHEMAS = Path(__file__).resolve().parents[2] / "docs" / "schemas"


@pytest.mark.parametrize("name", sorted(schema_files()))
def test_committed_schema_matches_current_version(name: str) -> None:
    committed = SCHEMAS / name
    assert committed.exists(), (
        f"{name} is not committed: a spec changed its schema_version (or is new); "
        "run `make schemas` and commit docs/schemas/"
    )
    current = schema_files()[name]
    assert json.loads(committed.read_text()) == json.loads(json.dumps(current)), (
        f"the schema of {name} changed without a schema_version bump: bump SCHEMA_VERSION, add a migration, "
        "then run `make schemas`"
    )


V1_MODEL_CONFIG = """
schema_version: 1
vocab_size: 32000
hidden_size: 512
num_hidden_layers: 8
num_attention_heads: 8
num_key_value_heads: 2
intermediate_size: 1376
rms_norm_eps: 1.0e-6
max_position_embeddings: 1024
tie_word_embeddings: true
rope_theta: 10000.0
"""


def test_v1_model_config_migrates(tmp_path: Path) -> None:
    path = tmp_path / "old.yaml"
    path.write_text(V1_MODEL_CONFIG)
    cfg = ModelConfig.load(path)
    assert cfg.schema_version == 2
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff) == (512, 8, 8, 2, 1376)
    assert cfg.norm_eps == 1e-6 and cfg.max_seq_len == 1024 and cfg.tie_embeddings and cfg.head_dim == 64
    # migrating is pure: the old dict is untouched and the result re-validates as v2
    assert ModelConfig.load(cfg.to_json()) == cfg


def test_v1_without_kv_heads_means_mha() -> None:
    cfg = ModelConfig.load({"schema_version": 1, "vocab_size": 10, "hidden_size": 32, "num_hidden_layers": 1,
                            "num_attention_heads": 4, "intermediate_size": 64})
    assert cfg.n_kv_heads == 4


def test_future_version_is_refused() -> None:
    with pytest.raises((SpecVersionError, ValidationError), match="newer"):
        ModelConfig.load({"schema_version": 99, "vocab_size": 10})
