"""The base every spec derives from: frozen, strict about unknown fields, versioned.

A spec serialises to JSON and YAML, loads from either (or from a path), and migrates old
versions forward through explicit, per-version functions registered on the class.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Self

import yaml
from pydantic import BaseModel, ConfigDict, model_validator

Migration = Callable[[dict[str, Any]], dict[str, Any]]


class SpecVersionError(ValueError):
    """A document's schema_version is newer than this code understands, or has no migration."""


class Spec(BaseModel):
    """Frozen, `extra="forbid"` pydantic model with a schema version and migrations.

    Subclasses set `SCHEMA_VERSION` and declare `schema_version: int = SCHEMA_VERSION`;
    `MIGRATIONS[v]` turns a version-`v` dict into a version-`v+1` dict.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    SCHEMA_VERSION: ClassVar[int] = 1
    MIGRATIONS: ClassVar[Mapping[int, Migration]] = {}

    @model_validator(mode="before")
    @classmethod
    def _migrate_old_versions(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("schema_version", cls.SCHEMA_VERSION) != cls.SCHEMA_VERSION:
            return cls.migrate(data)
        return data

    @classmethod
    def migrate(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        """Return `data` upgraded to the current schema version (the input is not modified)."""
        out = dict(data)
        version = out.get("schema_version", 1)
        if not isinstance(version, int) or version < 1:
            raise SpecVersionError(f"{cls.__name__}.schema_version must be a positive int, got {version!r}")
        if version > cls.SCHEMA_VERSION:
            raise SpecVersionError(
                f"{cls.__name__} schema_version {version} is newer than this code supports "
                f"({cls.SCHEMA_VERSION}); upgrade tessera-specs"
            )
        while version < cls.SCHEMA_VERSION:
            step = cls.MIGRATIONS.get(version)
            if step is None:
                raise SpecVersionError(f"{cls.__name__}: no migration from schema_version {version}")
            out = step(out)
            version += 1
            out["schema_version"] = version
        return out

    @classmethod
    def load(cls, data: Mapping[str, Any] | str | Path) -> Self:
        """Validate a dict, a JSON/YAML string, or a path to a .json/.yaml/.yml file, migrating old versions."""
        if isinstance(data, Path) or (isinstance(data, str) and _looks_like_path(data)):
            path = Path(data)
            text = path.read_text()
            loaded = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        elif isinstance(data, str):
            loaded = yaml.safe_load(data)  # YAML is a superset of JSON
        else:
            loaded = data
        if not isinstance(loaded, Mapping):
            raise TypeError(f"{cls.__name__}.load expects a mapping, got {type(loaded).__name__}")
        return cls.model_validate(loaded)

    def to_json(self, indent: int | None = 2) -> str:
        return self.model_dump_json(indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Self:
        return cls.load(json.loads(text))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> Self:
        return cls.load(yaml.safe_load(text))

    def dump(self, path: str | Path) -> None:
        """Write to `path` as YAML (.yaml/.yml) or JSON (anything else)."""
        path = Path(path)
        path.write_text(self.to_yaml() if path.suffix in (".yaml", ".yml") else self.to_json() + "\n")


def _looks_like_path(text: str) -> bool:
    return "\n" not in text and text.rstrip().endswith((".json", ".yaml", ".yml"))
