"""The confusion-matrix picture every run logs (mnist_sweep/plots.py)."""

from __future__ import annotations

import torch
from PIL import Image

from mnist_sweep import data, plots


def test_confusion_matrix_png_shows_every_class_and_marks_mistakes(tmp_path):
    confusion = torch.diag(torch.full((10,), 900))
    confusion[4, 9] = 30
    path = plots.confusion_matrix_png(confusion, data.DATASETS["mnist"].classes, tmp_path / "cm.png", "t")
    image = Image.open(path).convert("RGB")
    cell, left, top = 48, 110, 60
    centre = lambda i, j: (left + j * cell + 5, top + i * cell + 5)  # noqa: E731 (a cell's corner, off the number)
    diagonal, mistake, empty = image.getpixel(centre(0, 0)), image.getpixel(centre(4, 9)), image.getpixel(centre(0, 1))
    assert sum(diagonal) < sum(mistake) < sum(empty)  # darker = more answers, on a log scale
    wide = plots.confusion_matrix_png(confusion, data.DATASETS["fashion_mnist"].classes, tmp_path / "f.png", "t")
    assert Image.open(wide).height > image.height  # long class names get room to lean
