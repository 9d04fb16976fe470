"""Pictures saved as run artifacts (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed; safe in worker processes
    import matplotlib.pyplot as plt

    return plt


def confusion_matrix_png(confusion: torch.Tensor, classes: tuple[str, ...], path: Path, title: str) -> Path:
    """Rows are the true class, columns the prediction; each cell shows its count."""
    plt = _pyplot()
    n = len(classes)
    fig, ax = plt.subplots(figsize=(7, 6), dpi=100)
    ax.imshow(confusion.numpy(), cmap="Blues", norm=_log_norm(confusion))
    ax.set_xticks(range(n), classes, rotation=45 if max(map(len, classes)) > 2 else 0, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    big = confusion.max().item()
    for i in range(n):
        for j in range(n):
            value = confusion[i, j].item()
            if value:
                ax.text(
                    j,
                    i,
                    str(value),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if value > big / 3 else "black",
                )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _log_norm(confusion: torch.Tensor):
    from matplotlib.colors import LogNorm

    # Log colours: the few mistakes stay visible next to ~1000 correct answers on the diagonal.
    return LogNorm(vmin=1, vmax=max(2, confusion.max().item()))
