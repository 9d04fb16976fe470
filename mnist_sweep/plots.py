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


def objective_vs_keys_png(
    points: list[tuple[dict[str, str], float]], keys: list[str], objective: str, path: Path
) -> Path:
    """One panel per swept key: the objective of every finished trial against that key's value.

    Numeric values go on a numeric axis (log when they span two decades or more); others are categories.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5), dpi=100, squeeze=False)
    ys = [y for _, y in points]
    for ax, key in zip(axes[0], keys, strict=True):
        raw = [values.get(key, "") for values, _ in points]
        try:
            xs = [float(v) for v in raw]
            ax.scatter(xs, ys)
            positive = [x for x in xs if x > 0]
            if len(positive) == len(xs) and max(xs) / min(xs) >= 100:
                ax.set_xscale("log")
            distinct = sorted(set(xs))
            if len(distinct) <= 8:
                ax.set_xticks(distinct, [f"{x:g}" for x in distinct], rotation=30 if len(distinct) > 4 else 0)
        except ValueError:
            labels = sorted(set(raw))
            ax.scatter([labels.index(v) for v in raw], ys)
            ax.set_xticks(range(len(labels)), labels, rotation=30 if max(map(len, labels)) > 6 else 0)
        ax.set_xlabel(key)
        ax.set_ylabel(objective)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{objective} of each finished trial")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
