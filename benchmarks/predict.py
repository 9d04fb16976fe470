"""How well the champion reads photographed digits (``python -m mnist_sweep.predict``), measured on photo-like
pictures made from MNIST's test digits.

    python -m benchmarks.predict                          # 1000 pictures, the champion; writes docs/PREDICT.md's block
    python -m benchmarks.predict --n 2000 --model runs:/<run id>/model --out /tmp/predict.md
    python -m benchmarks.predict --fixtures tests/fixtures/digits   # (re)make the test fixtures (10 small files)
    python -m benchmarks.predict --formats                # what each mlflow.model_format costs to log and to load

Each picture (``photo``) is one test digit drawn as ink on paper, the way a phone or a scanner sees it: the digit
scaled to 30-250 pixels tall, sharpened into pen strokes (a quarter of them with a fine pen: thinner strokes),
rotated up to 12 degrees, placed off-centre on a larger sheet whose light is uneven (a gradient, blotches, grain),
dark ink or blue ink, grey or RGB, slightly out of focus, some with the table showing along one side, a fifth of
them inverted (chalk on a board: light on dark), saved as JPEG (quality 35-90) or PNG. The settings come from a
seeded generator: the same command makes the same pictures. The digits come from the official test set, which no
model was trained or chosen on.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from benchmarks import common

BLOCK = "accuracy"  # the block of docs/PREDICT.md this benchmark writes
FORMATS_BLOCK = "formats"  # ... and the one --formats writes
FORMATS = ("weights", "pickle", "pt2")  # the default first; pickle was the default before
NETS = {"default net, 784-256-256-10": {"hidden": 256}, "best_aug's net, 2 x 2048, batch norm": {"hidden": 2048}}
OUT = common.DOCS / "PREDICT.md"


@dataclass
class Photo:
    """One generated picture and how it was made."""

    data: bytes  # the encoded file
    suffix: str  # .jpg or .png
    label: int
    index: int  # in MNIST's test set
    height: int  # the digit's height on the sheet, pixels
    angle: float
    inverted: bool
    fine_pen: bool
    colour: bool


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))


def _chance(g: torch.Generator, p: float) -> bool:
    return float(torch.rand((), generator=g)) < p


def _to_image(x: torch.Tensor) -> Image.Image:
    """A float map (0..1) as an 8-bit grey picture."""
    pixels = (x.clamp(0, 1) * 255).round().to(torch.uint8).contiguous()
    return Image.frombytes("L", (x.shape[1], x.shape[0]), pixels.numpy().tobytes())


def _from_image(image: Image.Image) -> torch.Tensor:
    w, h = image.size
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(h, w).float() / 255


def photo(digit: torch.Tensor, label: int, index: int, g: torch.Generator) -> Photo:
    """An MNIST digit (uint8 [28,28]) as a photo-like picture of ink on paper."""
    # The strokes: the digit scaled up (it is ~20 of MNIST's 28 pixels tall), sharpened into ink.
    height = round(_uniform(g, 30, 250))
    side = max(28, round(28 * height / 20))
    ink = _from_image(_to_image(digit.float() / 255).resize((side, side), Image.Resampling.BICUBIC))
    fine_pen = _chance(g, 0.25)
    low, high = (0.7, 0.85) if fine_pen else (0.25, 0.6)
    ink = ((ink - low) / (high - low)).clamp(0, 1)
    angle = _uniform(g, -12, 12)
    ink = _from_image(_to_image(ink).rotate(angle, Image.Resampling.BICUBIC, expand=True, fillcolor=0))
    # The sheet: larger than the digit, the digit somewhere on it.
    ih, iw = ink.shape
    sh, sw = round(ih * _uniform(g, 1.15, 2.2)), round(iw * _uniform(g, 1.15, 2.4))
    top, left = round(_uniform(g, 0, sh - ih)), round(_uniform(g, 0, sw - iw))
    sheet = torch.zeros(sh, sw)
    sheet[top : top + ih, left : left + iw] = ink
    # Paper under uneven light: a level, a gradient in some direction, blotches, grain.
    paper = torch.full((sh, sw), _uniform(g, 0.6, 0.95))
    direction = _uniform(g, 0, 2 * math.pi)
    ys, xs = torch.meshgrid(torch.linspace(-0.5, 0.5, sh), torch.linspace(-0.5, 0.5, sw), indexing="ij")
    paper += _uniform(g, 0, 0.3) * (math.cos(direction) * xs + math.sin(direction) * ys)
    blotches = torch.rand(1, 1, 5, 5, generator=g) - 0.5
    paper += _uniform(g, 0, 0.15) * F.interpolate(blotches, size=(sh, sw), mode="bicubic", align_corners=False)[0, 0]
    paper += _uniform(g, 0.003, 0.03) * torch.randn(sh, sw, generator=g)
    opacity = _uniform(g, 0.75, 1.0)
    level = _uniform(g, 0.02, 0.3)  # how dark the ink is
    colour = _chance(g, 0.5)
    tint = torch.tensor([_uniform(g, 0.95, 1.05), 1.0, _uniform(g, 0.9, 1.05)])  # paper: white, cream or bluish
    pen = torch.tensor([0.15, 0.2, 0.55]) if _chance(g, 0.4) else torch.full((3,), level)  # blue or black ink
    a = (sheet * opacity)[None]
    rgb = (paper[None] * tint[:, None, None]) * (1 - a) + pen[:, None, None] * a
    inverted = _chance(g, 0.2)
    if inverted:  # chalk on a board
        rgb = 1 - rgb
    elif _chance(g, 0.15):  # the sheet's edge, and the table beyond it, along one side the digit leaves free
        rows, cols = (sheet > 0.05).nonzero(as_tuple=True)
        if not len(rows):  # a blank sheet
            rows, cols = torch.tensor([sh // 2]), torch.tensor([sw // 2])
        room = [int(rows.min()), int(cols.min()), sh - 1 - int(rows.max()), sw - 1 - int(cols.max())]
        side = max(range(4), key=lambda i: room[i])  # top, left, bottom, right
        band = min(round(_uniform(g, 0.03, 0.12) * min(sh, sw)), room[side] - 3)
        if band >= 2:
            table = torch.tensor([_uniform(g, 0.1, 0.4), _uniform(g, 0.08, 0.3), _uniform(g, 0.05, 0.25)])
            region = [slice(None), slice(None)]
            region[side % 2] = slice(0, band) if side < 2 else slice(-band, None)
            rgb[:, region[0], region[1]] = table[:, None, None]
    pixels = (rgb.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    image = Image.frombytes("RGB", (sw, sh), pixels.numpy().tobytes())
    if not colour:
        image = image.convert("L")
    image = image.filter(ImageFilter.GaussianBlur(_uniform(g, 0, 0.8) * height / 100))  # focus
    out = io.BytesIO()
    if _chance(g, 0.7):
        image.save(out, "JPEG", quality=round(_uniform(g, 35, 90)))
        suffix = ".jpg"
    else:
        image.save(out, "PNG", optimize=True)
        suffix = ".png"
    return Photo(out.getvalue(), suffix, label, index, height, angle, inverted, fine_pen, colour)


def photos(n: int, seed: int = 0, data_root: str | None = None, max_height: int | None = None) -> list[Photo]:
    """``n`` pictures of test digits (``n`` different digits, drawn at random), the same for the same seed."""
    from mnist_sweep import data

    files = data.find_files(Path(data_root or common.default_data_root()), "mnist")
    images = data.read_idx(files["t10k-images-idx3-ubyte"])
    labels = data.read_idx(files["t10k-labels-idx1-ubyte"])
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(images), generator=g)[:n].tolist()
    out = []
    for i in chosen:
        p = photo(images[i], int(labels[i]), i, g)
        while max_height is not None and p.height > max_height:  # small files for the fixtures
            p = photo(images[i], int(labels[i]), i, g)
        out.append(p)
    return out


def name(p: Photo) -> str:
    """The file name, which carries the label (``digit7-test1234.jpg``): tests read the truth from it."""
    return f"digit{p.label}-test{p.index:04d}{p.suffix}"


def write_fixtures(folder: Path, n: int = 10, seed: int = 1) -> list[Path]:
    """Small pictures for tests/fixtures/digits: one of each digit where the draw allows, digits at most 100 pixels
    tall, files at most 20 kB."""
    folder.mkdir(parents=True, exist_ok=True)
    pool = [p for p in photos(20 * n, seed, max_height=100) if len(p.data) <= 20_000]
    picked: list[Photo] = []
    for p in pool:  # one of each label first, then whatever comes
        if p.label not in {q.label for q in picked}:
            picked.append(p)
    picked += [p for p in pool if p not in picked][: max(0, n - len(picked))]
    paths = []
    for p in picked[:n]:
        path = folder / name(p)
        path.write_bytes(p.data)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------------------------
# The measurement
# ------------------------------------------------------------------------------------------------------------


def measure(pictures: list[Photo], model_uri: str, tracking_uri: str) -> dict:
    """Classify every picture as ``python -m mnist_sweep.predict`` does; accuracy overall and by variant."""
    import numpy as np

    from mnist_sweep import predict

    model = predict.load(model_uri, tracking_uri)
    t0 = time.perf_counter()
    prepared, failed = [], 0
    for p in pictures:
        try:
            prepared.append(predict.prepare(predict.read(io.BytesIO(p.data))))
        except ValueError:
            prepared.append(torch.zeros(28, 28))  # counted wrong
            failed += 1
    prep_seconds = time.perf_counter() - t0
    scores = np.asarray(model.predict(torch.stack(prepared)[:, None].numpy()))
    right = [int(s.argmax()) == p.label for s, p in zip(scores, pictures, strict=True)]
    # The model on the untouched digits, for comparison: what the pictures cost.
    from mnist_sweep import data

    files = data.find_files(Path(common.default_data_root()), "mnist")
    originals = data.read_idx(files["t10k-images-idx3-ubyte"])[[p.index for p in pictures]].numpy()
    clean = np.asarray(model.predict(originals)).argmax(1) == np.array([p.label for p in pictures])

    def share(keep) -> str:
        picked = [r for r, p in zip(right, pictures, strict=True) if keep(p)]
        return f"{sum(picked) / len(picked):.1%} ({len(picked)})" if picked else "-"

    return {
        "n": len(pictures),
        "accuracy": sum(right) / len(pictures),
        "clean": float(clean.mean()),
        "no_ink": failed,
        "ms_per_image": 1000 * prep_seconds / len(pictures),
        "rows": [
            ["dark ink on light paper", share(lambda p: not p.inverted)],
            ["light on dark (inverted)", share(lambda p: p.inverted)],
            ["fine pen", share(lambda p: p.fine_pen)],
            ["rotated more than 8 degrees", share(lambda p: abs(p.angle) > 8)],
            ["digit under 60 pixels tall", share(lambda p: p.height < 60)],
            ["JPEG", share(lambda p: p.suffix == ".jpg")],
            ["PNG", share(lambda p: p.suffix == ".png")],
            ["RGB", share(lambda p: p.colour)],
        ],
    }


def describe(model_uri: str) -> str:
    """The model, and for a registered one its version, run and scores."""
    import mlflow

    if not model_uri.startswith("models:/") or "@" not in model_uri:
        return f"`{model_uri}`"
    name, alias = model_uri.removeprefix("models:/").split("@", 1)
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias(name, alias)
    run = client.get_run(version.run_id)
    scores = ", ".join(f"{k} {run.data.metrics[k]:.4f}" for k in ("best_val/acc", "test/acc") if k in run.data.metrics)
    sweep = client.get_run(run.data.tags["mlflow.parentRunId"]) if "mlflow.parentRunId" in run.data.tags else None
    made_by = f", best trial of `{sweep.data.params.get('sweep.command', '')}`" if sweep else ""
    return f"`{model_uri}` = version {version.version} ({run.info.run_name}: {scores}{made_by})"


def report(result: dict, command: str, model_uri: str) -> str:
    lines = [
        f"### Accuracy on {result['n']} photo-like pictures of MNIST test digits",
        "",
        *common.header(command),
        f"Model: {describe(model_uri)}.",
        "",
        f"**{result['accuracy']:.1%}** of the pictures read right (the same model on the same digits as MNIST drew "
        f"them: {result['clean']:.1%}); {result['no_ink']} found without ink; preprocessing "
        f"{result['ms_per_image']:.1f} ms a picture.",
        "",
        common.table(["pictures", "accuracy (count)"], result["rows"]),
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# --formats: what each mlflow.model_format costs a run, to log and to load
# ------------------------------------------------------------------------------------------------------------


def time_format(fmt: str, net: str, repeats: int, uris: list[str] | None = None) -> dict:
    """In this fresh process (a run logs its model in its own process; ``python -m mnist_sweep.predict`` loads one
    in its own): without ``uris``, log ``repeats`` models of ``net`` in ``fmt`` into a new SQLite store in the
    working folder (``tracking.Run.log_model``); with them, load each as ``python -m mnist_sweep.predict`` does
    (``tracking.load_model``; pickle trusted). torch, mlflow and the store are ready before the clock starts.
    Seconds: the first, and the median of the later ones."""
    import mlflow
    import numpy as np

    from mnist_sweep import model, tracking

    uri = f"sqlite:///{Path.cwd()}/mlruns/mlflow.db"
    experiment = tracking.prepare(uri, "formats")
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    example = torch.rand(2, 1, 28, 28).numpy()
    seconds = []
    if uris is None:
        torch.manual_seed(0)
        norm = "batch" if NETS[net]["hidden"] > 256 else "none"
        classifier = model.Classifier(model.build(depth=2, norm=norm, **NETS[net]), 0.1307, 0.3081).eval()
        uris = []
        for _ in range(repeats):
            run = tracking.Run(client.create_run(experiment).info.run_id)
            t = time.perf_counter()
            uris.append(run.log_model(classifier, example, fmt))
            seconds.append(time.perf_counter() - t)
        location = client.get_logged_model(uris[0].removeprefix("models:/")).artifact_location
        size = sum(f.stat().st_size for f in Path(location.removeprefix("file://")).rglob("*") if f.is_file())
        return {"first": seconds[0], "later": statistics.median(seconds[1:]), "bytes": size, "uris": uris}
    for model_uri in uris:
        t = time.perf_counter()
        loaded = tracking.load_model(model_uri, trust_pickle=fmt == "pickle")
        seconds.append(time.perf_counter() - t)
        assert np.asarray(loaded.predict(example)).shape == (2, 10)
    return {"first": seconds[0], "later": statistics.median(seconds[1:])}


def _worker(folder: str, *args) -> dict:
    call = f"predict.time_format{args!r}"
    proc = subprocess.run(
        [sys.executable, "-c", f"import json; from benchmarks import predict; print(json.dumps({call}))"],
        cwd=folder,
        env={**os.environ, "PYTHONPATH": str(common.REPO)},
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode:
        raise RuntimeError(f"{args[:2]}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_formats(rounds: int, repeats: int) -> dict:
    """Each format and net logged in a fresh process, then loaded in another; the formats side by side in each
    round (order rotated), so that a busy moment of the machine falls on all of them. Per (format, net): the
    medians over the rounds, and the medians of each round's ratio to pickle."""
    seen: dict[tuple[str, str], list[dict]] = {}
    for r in range(rounds):
        for net in NETS:
            order = FORMATS[r % len(FORMATS) :] + FORMATS[: r % len(FORMATS)]
            for fmt in order:
                with tempfile.TemporaryDirectory() as tmp:
                    logged = _worker(tmp, fmt, net, repeats)
                    loaded = _worker(tmp, fmt, net, repeats, logged["uris"])
                m = {"log_first": logged["first"], "log_later": logged["later"], "bytes": logged["bytes"]}
                m.update(load_first=loaded["first"], load_later=loaded["later"])
                seen.setdefault((fmt, net), []).append(m)
                print(f"round {r + 1}/{rounds} {net} {fmt}: {m}", file=sys.stderr)
    keys = ("log_first", "log_later", "load_first", "load_later")
    result = {}
    for (fmt, net), runs in seen.items():
        base = seen[("pickle", net)]
        result[(fmt, net)] = {k: statistics.median(m[k] for m in runs) for k in (*keys, "bytes")}
        result[(fmt, net)]["ratio"] = {
            k: statistics.median(m[k] / b[k] for m, b in zip(runs, base, strict=True)) for k in keys
        }
    return result


def formats_report(result: dict, command: str, rounds: int, repeats: int) -> str:
    rows = []
    for net in NETS:
        for fmt in FORMATS:
            m = result[(fmt, net)]
            rows.append(
                [
                    net,
                    f"`{fmt}`" + (" (default)" if fmt == "weights" else ""),
                    *(f"{m[k]:.2f} s ({m['ratio'][k]:.2f}x)" for k in ("log_first", "log_later")),
                    *(f"{m[k]:.3f} s ({m['ratio'][k]:.2f}x)" for k in ("load_first", "load_later")),
                    f"{m['bytes'] / 1e6:.2f}",
                ]
            )
    head = ["net", "format", "log: first in a process", "log: later", "load: first in a process", "load: later", "MB"]
    return "\n".join(
        [
            "### What each model format costs a run",
            "",
            *common.header(command),
            f"Each format and net: {repeats} models logged (`tracking.Run.log_model`) in a fresh process, then loaded "
            "in another (`tracking.load_model`, as `python -m mnist_sweep.predict` does; pickle trusted), each "
            "process with torch, mlflow and its SQLite store ready before the clock starts. Medians of "
            f"{rounds} rounds, the formats side by side in each round; in brackets the median of the rounds' ratios "
            "to `pickle`, the default before. *First in a process* is what a single run (`python train.py`), a "
            "sweep's registration or one `predict` pays; *later* is each further model of a process "
            "(`mlflow.sweep_models=all`).",
            "",
            common.table(head, rows),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    from mnist_sweep import predict

    tracking_uri, champion = predict.default_model()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.predict", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, help="pictures to make and classify (default 1000; 10 fixtures)")
    # Seed 0 was used while developing the preprocessing, seed 1 makes the test fixtures: the report uses neither.
    parser.add_argument("--seed", type=int, default=2, help="the pictures' seed")
    parser.add_argument("--model", default=champion, help=f"MLflow model URI (default {champion})")
    parser.add_argument("--tracking-uri", default=tracking_uri)
    parser.add_argument("--out", default=str(OUT), help="the report: this file's accuracy block")
    parser.add_argument("--save", metavar="FOLDER", help="also write the pictures there")
    parser.add_argument("--fixtures", metavar="FOLDER", help="only write the test fixtures there (--n of them)")
    parser.add_argument("--formats", action="store_true", help="only time each model format (its own block)")
    parser.add_argument("--rounds", type=int, default=3, help="--formats: rounds, each format once in each")
    parser.add_argument("--repeats", type=int, default=5, help="--formats: models logged and loaded per process")
    args = parser.parse_args(argv)
    if args.formats:
        result = measure_formats(args.rounds, args.repeats)
        command = common.command_line("benchmarks.predict", argv)
        common.write_report(args.out, formats_report(result, command, args.rounds, args.repeats), FORMATS_BLOCK)
        return
    if args.fixtures:
        for path in write_fixtures(Path(args.fixtures), args.n or 10):
            print(f"{path} ({path.stat().st_size} bytes)")
        return
    pictures = photos(args.n or 1000, args.seed)
    if args.save:
        Path(args.save).mkdir(parents=True, exist_ok=True)
        for p in pictures:
            (Path(args.save) / name(p)).write_bytes(p.data)
    result = measure(pictures, args.model, args.tracking_uri)
    common.write_report(args.out, report(result, common.command_line("benchmarks.predict", argv), args.model), BLOCK)


if __name__ == "__main__":
    main()
