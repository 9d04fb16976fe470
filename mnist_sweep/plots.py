"""Pictures saved as run artifacts: the confusion matrix (Pillow), sweep plots (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed; safe in worker processes
    import matplotlib.pyplot as plt

    return plt


def confusion_matrix_png(confusion: torch.Tensor, classes: tuple[str, ...], path: Path, title: str) -> Path:
    """Rows are the true class, columns the prediction; each cell shows its count.

    Drawn with Pillow rather than matplotlib: every run saves one, and matplotlib's import and layout cost
    ~0.3 s a run - a tenth of a short trial in a sweep. Colours are on a log scale, so the few mistakes stay
    visible next to ~1000 correct answers on the diagonal.
    """
    from PIL import Image, ImageDraw, ImageFont

    n = len(classes)
    rotated = max(map(len, classes)) > 2  # long names (Fashion-MNIST) go under their column at 45 degrees
    cell, left, top = 48, 110, 60
    width, height = left + n * cell + 20, top + n * cell + (110 if rotated else 50)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    small = ImageFont.load_default(size=11)
    big = max(2, int(confusion.max()))
    log_big = torch.log(torch.tensor(float(big)))
    for i in range(n):
        for j in range(n):
            value = int(confusion[i, j])
            shade = float(torch.log(torch.tensor(float(max(value, 1)))) / log_big) if value else 0.0
            fill = (int(247 - 239 * shade), int(251 - 203 * shade), int(255 - 148 * shade))  # white -> dark blue
            x0, y0 = left + j * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=fill, outline=(220, 220, 220))
            if value:
                colour = "white" if shade > 0.6 else "black"
                draw.text((x0 + cell / 2, y0 + cell / 2), str(value), fill=colour, font=small, anchor="mm")
    for k, name in enumerate(classes):
        draw.text((left - 6, top + k * cell + cell / 2), name, fill="black", font=font, anchor="rm")
        if not rotated:
            draw.text((left + k * cell + cell / 2, top + n * cell + 12), name, fill="black", font=font, anchor="mm")
            continue
        label = Image.new("RGBA", (100, 16), (255, 255, 255, 0))  # column names, written at 45 degrees
        ImageDraw.Draw(label).text((100, 8), name, fill="black", font=font, anchor="rm")
        label = label.rotate(45, expand=True)
        image.paste(label, (left + k * cell + cell // 2 - label.width + 8, top + n * cell + 4), label)
    draw.text((width / 2, 22), title, fill="black", font=font, anchor="mm")
    draw.text((left + n * cell / 2, height - 12), "predicted", fill="black", font=font, anchor="mm")
    draw.text((12, top - 20), "true", fill="black", font=font, anchor="lm")
    image.save(path)
    return path


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


def pareto_png(points: list[tuple[float, float]], on_front: list[bool], names: tuple[str, ...], path: Path) -> Path:
    """Two objectives of every finished trial, the Pareto front (no trial better in both) joined up and labelled.

    The second objective (weights, seconds) goes on the x axis, log scale when it spans a decade or more.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ys, xs = zip(*points, strict=True) if points else ((), ())
    ax.scatter(xs, ys, c="#bbbbbb", label="trial")
    front = sorted((x, y) for (y, x), on in zip(points, on_front, strict=True) if on)
    if front:
        ax.plot(*zip(*front, strict=True), "o-", color="#d62728", label="Pareto front", drawstyle="steps-post")
    if xs and min(xs) > 0 and max(xs) / min(xs) >= 10:
        ax.set_xscale("log")
    ax.set_xlabel(names[1])
    ax.set_ylabel(names[0])
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{len(front)} of {len(points)} finished trials on the Pareto front")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
