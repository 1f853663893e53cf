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
    """Split the documents (one in `eval.heldout_every` held out), claim the output directory for them
    (`claim_output_dir`), then write `data/train.txt` and `data/heldout.txt`. Raises ValueError when there is
    too little text for both sides, RunMismatch (before writing anything) when the directory holds another run."""
    docs, source = documents(cfg)
    every = cfg.eval.heldout_every
    heldout = [d for i, d in enumerate(docs) if i % every == every - 1]
    train = [d for i, d in enumerate(docs) if i % every != every - 1]
    if not heldout or not train:
        raise ValueError(f"data: {len(docs)} documents (~{_DOC_CHARS:,} characters each) from {source} are too few "
                         f"to hold out one in {every}; give more text or lower eval.heldout_every")
    train_text, heldout_text = "\n\n".join(train), "\n\n".join(heldout)
    claim_output_dir(cfg, hashlib.sha256(train_text.encode("utf-8")).hexdigest())
    folder = cfg.path("data")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.txt").write_text(train_text, encoding="utf-8")
    (folder / "heldout.txt").write_text(heldout_text, encoding="utf-8")
    return DataSplit(source, folder / "train.txt", folder / "heldout.txt", len(docs), len(heldout),
                     len(train_text), len(heldout_text))


def claim_output_dir(cfg: PipelineConfig, train_sha256: str) -> None:
    """Record in `run.json` what the stages' checkpoints depend on: the training stages' configs, the text
    settings and a digest of the training text. A rerun that agrees resumes from those checkpoints (other
    fields, such as the prompts or the quantization method, may change between runs). Raises RunMismatch when
    the directory holds checkpoints of other stages or other text."""
    record = {"stages": cfg.model_dump(mode="json", include={"data", "max_chars", "teacher", "student"})
              | {"heldout_every": cfg.eval.heldout_every}, "train_sha256": train_sha256}
    path = Path(cfg.output_dir) / "run.json"
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != record:
            what = "training stages" if previous.get("stages") != record["stages"] else "training text"
            raise RunMismatch(f"{cfg.output_dir} holds a run with different {what}; its checkpoints would be "
                              "resumed: choose another output directory (--out) or delete it")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
