"""`python -m mnist_sweep.predict`: your own digits, photographed or scanned, read by the champion."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from benchmarks import predict as generator
from conftest import REPO, train_py
from mnist_sweep import model, predict, tracking

FIXTURES = REPO / "tests" / "fixtures" / "digits"


def _shape(kind: str) -> torch.Tensor:
    """A digit-like shape drawn as MNIST draws its digits: uint8 [28,28], light strokes on black, ~20 pixels tall."""
    image = Image.new("L", (112, 112), 0)
    d = ImageDraw.Draw(image)
    if kind == "zero":
        d.ellipse((30, 14, 82, 98), outline=255, width=10)
    elif kind == "one":
        d.line((60, 14, 52, 98), fill=255, width=10)
    elif kind == "seven":
        d.line([(26, 18), (86, 18), (50, 98)], fill=255, width=10, joint="curve")
    else:  # four
        d.line([(62, 14), (28, 70), (88, 70)], fill=255, width=10, joint="curve")
        d.line((70, 40, 70, 98), fill=255, width=10)
    small = image.resize((28, 28), Image.Resampling.LANCZOS)
    return torch.frombuffer(bytearray(small.tobytes()), dtype=torch.uint8).view(28, 28).clone()


def _ideal(shape: torch.Tensor, angle: float) -> torch.Tensor:
    """What the preprocessing should give for the shape rotated by ``angle``: the same steps on a clean drawing."""
    clean = generator._to_image(shape.float() / 255).resize((112, 112), Image.Resampling.BICUBIC)
    return predict.prepare(1 - generator._from_image(clean.rotate(angle, Image.Resampling.BICUBIC, expand=True)))


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Of the two images, each blurred over 3x3 (a pixel's shift of a thin stroke is no difference)."""
    a, b = (torch.nn.functional.avg_pool2d(x[None, None], 3, 1, 1).flatten() for x in (a, b))
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


@pytest.mark.parametrize("kind", ["zero", "one", "seven", "four"])
def test_a_photo_of_a_digit_becomes_the_digit_as_mnist_draws_it(kind):
    shape = _shape(kind)
    g = torch.Generator().manual_seed(sum(map(ord, kind)))
    seen, similarities = set(), []
    for _ in range(12):  # uneven light, both polarities, sizes, rotations, grey and RGB, JPEG and PNG
        p = generator.photo(shape, 0, 0, g)
        digit = predict.prepare(predict.read(io.BytesIO(p.data)))
        assert digit.shape == (28, 28) and 0 <= digit.min() and digit.max() <= 1
        rows, cols = (digit > 0.05).nonzero(as_tuple=True)
        assert max(rows.max() - rows.min(), cols.max() - cols.min()) + 1 <= 22  # fitted in MNIST's 20x20 box
        mass = digit.sum()
        centre = ((digit.sum(1) * torch.arange(28)).sum() / mass, (digit.sum(0) * torch.arange(28)).sum() / mass)
        assert all(abs(c - 14) <= 1 for c in centre)  # centred by its centre of mass
        similarity = _correlation(digit, _ideal(shape, p.angle))
        assert similarity > 0.7, (p.inverted, p.fine_pen, p.suffix, p.height, similarity)
        similarities.append(similarity)
        seen.add((p.inverted, p.suffix))
    assert sum(similarities) / len(similarities) > 0.9
    assert len(seen) >= 3  # the draws covered inverted and not, JPEG and PNG


def test_a_fine_pen_is_widened_to_mnist_strokes():
    thin = Image.new("L", (300, 300), 235)
    ImageDraw.Draw(thin).line((150, 30, 140, 270), fill=30, width=3)  # a 1% stroke on a 240-pixel digit
    digit = predict.prepare(generator._from_image(thin))
    assert (digit > 0.5).sum(1).max() >= 2  # at least 2 of 20 pixels wide, as MNIST's strokes are


def test_the_table_along_the_border_is_not_taken_for_ink():
    sheet = Image.new("L", (240, 200), 220)
    draw = ImageDraw.Draw(sheet)
    draw.rectangle((0, 0, 239, 30), fill=40)  # the table beyond the sheet's top edge
    draw.line((120, 70, 115, 170), fill=30, width=12)  # a "1"
    digit = predict.prepare(generator._from_image(sheet))
    rows, cols = (digit > 0.2).nonzero(as_tuple=True)
    assert rows.max() - rows.min() >= 18 and cols.max() - cols.min() <= 10  # tall and narrow: the stroke alone


@pytest.mark.parametrize("inverted", [False, True])
def test_a_sheet_without_ink_says_so(inverted):
    g = torch.Generator().manual_seed(7)
    for _ in range(10):
        p = generator.photo(torch.zeros(28, 28, dtype=torch.uint8), 0, 0, g)
        grey = predict.read(io.BytesIO(p.data))
        with pytest.raises(predict.NoInk, match="no ink found"):
            predict.prepare(1 - grey if inverted else grey)
    with pytest.raises(predict.NoInk):
        predict.prepare(torch.ones(50, 80))


def test_transparent_png_reads_as_ink_on_white_paper(tmp_path):
    image = Image.new("RGBA", (80, 80), (0, 0, 0, 0))  # transparent black: what drawing apps leave
    ImageDraw.Draw(image).line((40, 10, 38, 70), fill=(0, 0, 0, 255), width=6)
    image.save(tmp_path / "one.png")
    digit = predict.prepare(predict.read(tmp_path / "one.png"))
    assert digit[4:24, 12:16].mean() > 0.5 and digit[:, :8].max() == 0


# ------------------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_champion(tmp_path, monkeypatch):
    """A store in tmp_path whose registered model `digits` has a champion: a tiny untrained classifier."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    experiment_id = tracking.prepare(uri, "predict")
    client = mlflow.MlflowClient(uri)
    run = client.create_run(experiment_id)
    tracking.Run(run.info.run_id).log_metrics({"best_val/acc": 0.5})
    torch.manual_seed(0)
    classifier = model.Classifier(model.MLP(hidden=8, depth=1), 0.1307, 0.3081).eval()
    tracking.Run(run.info.run_id).log_model(classifier, np.zeros((1, 1, 28, 28), np.float32))
    tracking.register(run.info.run_id, "digits")
    return uri, classifier


def test_one_line_per_image_and_one_error_line_per_bad_file(tiny_champion, tmp_path, capsys):
    uri, classifier = tiny_champion
    generator._to_image(torch.full((60, 90), 0.85)).save(tmp_path / "blank.png")
    (tmp_path / "notes.jpg").write_text("not a picture")
    good = sorted(FIXTURES.glob("*"))[:3]
    paths = [str(good[0]), str(tmp_path / "blank.png"), str(good[1]), str(tmp_path / "notes.jpg"), "missing.png"]
    code = predict.main([*paths, str(good[2]), "--model", "models:/digits@champion", "--tracking-uri", uri])
    out, err = capsys.readouterr()
    assert code == 1
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == [str(p) for p in good]  # the others are still classified
    expected = classifier(torch.stack([predict.prepare(predict.read(p)) for p in good])).detach().softmax(1)
    for line, p in zip(lines, expected, strict=True):
        assert re.fullmatch(r"\S+ \d \d\.\d{3}", line)
        _, digit, probability = line.split()
        assert int(digit) == int(p.argmax()) and float(probability) == pytest.approx(float(p.max()), abs=1e-3)
    errors = err.splitlines()
    assert len(errors) == 3 and all(e.startswith("error: ") for e in errors)
    assert errors[0].startswith(f"error: {tmp_path / 'blank.png'}: no ink found")
    assert errors[1].startswith(f"error: {tmp_path / 'notes.jpg'}: not an image")
    assert errors[2].startswith("error: missing.png: No such file")


def test_all_readable_exits_zero(tiny_champion, capsys):
    uri, _ = tiny_champion
    assert (
        predict.main([str(FIXTURES / "digit7-test5845.jpg"), "--tracking-uri", uri, "--model", "models:/digits/1"]) == 0
    )
    assert capsys.readouterr().out.startswith(str(FIXTURES / "digit7-test5845.jpg") + " ")


def _cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    environment = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run(
        [sys.executable, "-m", "mnist_sweep.predict", *args],
        cwd=cwd,
        env={**environment, "PYTHONPATH": str(REPO), **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_no_registered_model_says_which_command_makes_one(tmp_path, tiny_champion):
    uri, _ = tiny_champion
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    image = str(FIXTURES / "digit0-test4470.jpg")
    for proc, says in (
        (_cli(image, cwd=empty), "no MLflow store at"),  # not where the user trained
        (_cli(image, "--tracking-uri", uri, cwd=empty), "no model registered as mnist-mlp@champion in"),
        (_cli(image, "--model", "models:/digits@gold", cwd=tmp_path), "no model registered as digits@gold"),
    ):
        assert proc.returncode == 1 and proc.stdout == ""
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.startswith("error: ") and says in proc.stderr
        assert "python train.py -m" in proc.stderr
    assert not (empty / "mlruns").exists()  # looking for a store does not create one
    usage = _cli(cwd=empty)
    assert usage.returncode == 2 and usage.stderr.count("\n") == 1 and "IMAGE" in usage.stderr


# ------------------------------------------------------------------------------------------------------------
# The whole story on real data: a sweep's champion reads the photographed fixtures
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_the_champion_of_a_real_sweep_reads_photographed_digits(tmp_path, mnist_root, cache_dir):
    proc = train_py(
        "-m",
        "model.hidden=128",
        "trainer.epochs=2",
        f"data.root={mnist_root}",
        f"data.cache_dir={cache_dir}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "@champion -> version 1" in proc.stdout
    fixtures = sorted(FIXTURES.glob("*"))
    assert len(fixtures) >= 10
    result = _cli(*map(str, fixtures), cwd=tmp_path)  # the default model: the champion of the default config
    assert result.returncode == 0, result.stderr
    right = 0
    for line, path in zip(result.stdout.splitlines(), fixtures, strict=True):
        name, digit, probability = line.split()
        assert name == str(path) and 0 < float(probability) <= 1
        right += int(digit) == int(re.match(r"digit(\d)", path.name).group(1))
    assert right >= 8, result.stdout
