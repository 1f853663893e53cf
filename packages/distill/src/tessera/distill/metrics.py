"""Training metrics: one JSON object per logged step in `metrics.jsonl`, and the loss curve as a PNG."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends rows to `path` (JSON Lines) and keeps them in memory for the plot."""

    def __init__(self, path: Path, resume: bool = False) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume and path.exists():
            self.rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        else:
            path.write_text("")

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop rows past `step` (a resumed run re-logs the steps after its checkpoint)."""
        self.rows = [r for r in self.rows if r["step"] <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))


def plot_loss_curves(curves: dict[str, Sequence[tuple[int, float]]], path: Path, title: str = "training loss",
                     ylabel: str = "loss") -> Path | None:
    """Draw each named curve of (step, value) points to `path` (PNG). Returns None, drawing nothing, when
    matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in curves.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
