"""The pipeline's text: documents (the built-in corpus, or the user's files in pieces), the held-out split,
and the output directory's record of which pipeline and text it holds."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from tessera.distill.corpus import builtin_corpus
from tessera.specs.pipeline import PipelineConfig

# User text is cut into documents of about this many characters (at line ends) before the held-out split,
# so that every file contributes to both sides.
_DOC_CHARS = 2_000


class RunMismatch(ValueError):
    """The output directory holds a run of a different pipeline or different data."""


@dataclass
class DataSplit:
    source: str
    train_file: Path
    heldout_file: Path
    documents: int
    heldout_documents: int
    train_chars: int
    heldout_chars: int


def _chunks(text: str, size: int) -> list[str]:
    out, current, length = [], [], 0
    for line in text.splitlines(keepends=True):
        current.append(line)
        length += len(line)
        if length >= size:
            out.append("".join(current))
            current, length = [], 0
    if current:
        out.append("".join(current))
    return out


def documents(cfg: PipelineConfig) -> tuple[list[str], str]:
    """(documents, description of their source): the built-in corpus' docstrings, or the `data` files cut
    into ~2,000-character pieces; at most `max_chars` characters. Raises FileNotFoundError for a missing file."""
    if not cfg.data:
        version = ".".join(map(str, sys.version_info[:3]))
        return builtin_corpus(cfg.max_chars), f"built-in: docstrings of the Python {version} standard library"
    docs: list[str] = []
    total = 0
    for name in cfg.data:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"data path {name!r} is not a file")
        for piece in _chunks(path.read_text(encoding="utf-8", errors="replace"), _DOC_CHARS):
            if cfg.max_chars is not None and total + len(piece) > cfg.max_chars:
                return docs, ", ".join(cfg.data)
            docs.append(piece)
            total += len(piece)
    return docs, ", ".join(cfg.data)


def split_data(cfg: PipelineConfig) -> DataSplit:
    """Write `data/train.txt` and `data/heldout.txt` (every `eval.heldout_every`-th document held out).
    Raises ValueError when there is too little text for both sides."""
    docs, source = documents(cfg)
    every = cfg.eval.heldout_every
    heldout = [d for i, d in enumerate(docs) if i % every == every - 1]
    train = [d for i, d in enumerate(docs) if i % every != every - 1]
    if not heldout or not train:
        raise ValueError(f"data: {len(docs)} documents (~{_DOC_CHARS:,} characters each) from {source} are too few "
                         f"to hold out one in {every}; give more text or lower eval.heldout_every")
    folder = cfg.path("data")
    folder.mkdir(parents=True, exist_ok=True)
    train_text, heldout_text = "\n\n".join(train), "\n\n".join(heldout)
    (folder / "train.txt").write_text(train_text, encoding="utf-8")
    (folder / "heldout.txt").write_text(heldout_text, encoding="utf-8")
    return DataSplit(source, folder / "train.txt", folder / "heldout.txt", len(docs), len(heldout),
                     len(train_text), len(heldout_text))


def claim_output_dir(cfg: PipelineConfig, split: DataSplit) -> None:
    """Record the pipeline and a digest of its text in `run.json`; a rerun of the same pipeline on the same
    text resumes from the stages' checkpoints. Raises RunMismatch when the directory holds another run
    (its checkpoints would otherwise be resumed by a different pipeline)."""
    digest = hashlib.sha256(split.train_file.read_bytes()).hexdigest()
    record = {"pipeline": cfg.model_dump(mode="json"), "train_sha256": digest}
    path = Path(cfg.output_dir) / "run.json"
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != record:
            what = "pipeline config" if previous.get("pipeline") != record["pipeline"] else "training text"
            raise RunMismatch(f"{cfg.output_dir} holds a run with a different {what}; choose another output "
                              "directory (--out) or delete it")
    path.write_text(json.dumps(record, indent=2) + "\n")
