"""The built-in corpus: docstrings of the Python standard library this interpreter ships with.

Every Python installation carries it, so training runs with no data files on a fresh machine. The
sources are parsed with `ast` (nothing is imported or executed) in sorted path order, so the text is the
same on every run of the same Python version.
"""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3"}


def stdlib_files() -> list[Path]:
    """The standard library's `.py` files (tests and third-party packages excluded), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts))


def _docstrings(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    nodes = [tree, *(n for n in ast.walk(tree)
                     if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef))]
    docs = (ast.get_docstring(n) for n in nodes)
    return [d for d in docs if d and len(d) > 40]


def builtin_corpus(max_chars: int | None = 8_000_000) -> list[str]:
    """Docstrings of the standard library, one document each, up to `max_chars` characters in all."""
    out: list[str] = []
    total = 0
    for path in stdlib_files():
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for doc in _docstrings(source):
            if max_chars is not None and total + len(doc) > max_chars:
                return out
            out.append(doc)
            total += len(doc)
    return out
