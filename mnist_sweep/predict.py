"""Ask the trained student about your own handwriting.

    python -m mnist_sweep.predict photo.jpg scan.png ...           # the champion: models:/mnist-mlp@champion
    python -m mnist_sweep.predict --model runs:/<run id>/model 7.png
    python -m mnist_sweep.predict --trust-pickle 7.png              # also a pickled model (it may run code)

Each image - a photo or scan of one handwritten digit: dark ink on light paper or light on dark, any size,
off-centre, slightly rotated, RGB or grey, JPEG or PNG - goes through MNIST's own preprocessing (``prepare``):

1. find the ink: its side (darker or lighter than the paper) is told by the way the grey levels lean (skew);
   the paper's slow changes of light are taken away (a grey-level closing, wider than any stroke, gives the
   paper), and Otsu's threshold tells ink from the paper's grain; specks and any part along more than half of a
   side (the sheet's edge, the table, a shadow) are left out;
2. crop to it, and fit it in 20x20 keeping its aspect ratio, anti-aliased, strokes at least MNIST's width;
3. centre it by its centre of mass in 28x28;

then the model applies its own normalisation (``model.Classifier``). One line per image: ``PATH DIGIT
PROBABILITY``. An unreadable file or an image without ink gets a line of its own on stderr; the others are still
classified, and the exit code is 1 when any failed.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image, ImageOps, UnidentifiedImageError

from mnist_sweep import UserError, config, tracking

WORK_SIDE = 512  # larger images are reduced to this first (a digit needs no more to end up 20 pixels tall)
BOX = 20  # MNIST fits each digit in 20x20 ...
SIDE = 28  # ... and centres it by its centre of mass in 28x28
STROKE = 0.1  # strokes at least this share of the box side (MNIST's are ~0.12: 2.4 of 20 pixels)
MIN_CONTRAST = 0.15  # ink at least this much darker (or lighter) than its paper, on a 0..1 scale


class NoInk(ValueError):
    """The image holds nothing that looks like a stroke of ink."""


# ------------------------------------------------------------------------------------------------------------
# Reading a picture
# ------------------------------------------------------------------------------------------------------------


def read(path: str | Path) -> torch.Tensor:
    """The image as grey levels in 0..1, ``[H, W]``, upright (EXIF orientation), at most WORK_SIDE a side."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                rgba = image.convert("RGBA")  # transparent parts read as white paper
                image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            if image.mode.startswith("I") or image.mode == "F":  # 16-bit or float grey: to 0..255 first
                image = image.convert("F")
                high = image.getextrema()[1]
                if high > 255:
                    image = image.point(lambda v: v * 255 / (65535 if high <= 65535 else high))
            grey = image.convert("L")
            grey.thumbnail((WORK_SIDE, WORK_SIDE), Image.Resampling.LANCZOS)
    except (UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise ValueError(f"not an image Pillow can read ({type(e).__name__})") from e
    except OSError as e:
        raise ValueError(e.strerror or str(e).splitlines()[0]) from e
    width, height = grey.size
    return torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.uint8).view(height, width).float() / 255


# ------------------------------------------------------------------------------------------------------------
# MNIST's preprocessing
# ------------------------------------------------------------------------------------------------------------


def _dilate(x: torch.Tensor, k: int) -> torch.Tensor:
    return F.max_pool2d(x[None, None], k, 1, k // 2)[0, 0]


def _erode(x: torch.Tensor, k: int) -> torch.Tensor:
    return -_dilate(-x, k)


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x[None, None], size=size, mode="bilinear", antialias=True, align_corners=False)[0, 0]


def ink(grey: torch.Tensor) -> torch.Tensor:
    """How much ink each pixel holds, 0..1 (paper 0), whichever side of the paper the ink is on."""
    height, width = grey.shape
    # The paper is most of the picture and the ink a few extreme levels on one side of it: the grey levels lean
    # (skew) towards the ink, dark or light, whatever the light on the paper.
    levels = grey.flatten()[:: max(1, grey.numel() // 100_000)]
    dark_ink = float(((levels - levels.mean()) ** 3).mean()) <= 0
    if not dark_ink:
        grey = 1 - grey
    # The paper under the ink: the picture with every stroke closed over (a closing wider than any stroke), on a
    # small copy - the light on the paper changes slowly - brought back to full size.
    scale = min(1.0, 64 / max(height, width))
    small = _resize(grey, (max(1, round(height * scale)), max(1, round(width * scale))))
    k = max(3, round(max(small.shape) / 4)) | 1
    paper = _resize(_erode(_dilate(small, k), k), (height, width))
    return (paper - grey).clamp(min=0)


def _strokes(x: torch.Tensor) -> float:
    """How strong the strongest strokes are: the top of the map, smoothed so that a lone noisy pixel does not count."""
    smooth = F.avg_pool2d(x[None, None], 3, 1, 1)[0, 0].flatten()
    top = max(20, smooth.numel() // 500)
    return float(smooth.topk(min(top, smooth.numel())).values.mean())


def _otsu(values: torch.Tensor) -> float:
    """The threshold that best splits ``values`` (0..1) into two classes (Otsu 1979)."""
    hist = torch.histc(values, bins=256, min=0, max=1).double()
    levels = (torch.arange(256, dtype=torch.float64) + 0.5) / 256
    weight = hist.cumsum(0)
    mass = (hist * levels).cumsum(0)
    total, total_mass = weight[-1], mass[-1]
    between = (total_mass * weight - mass * total) ** 2 / (weight * (total - weight)).clamp(min=1e-12)
    return float(levels[int(between[:-1].argmax())])


def _components(mask: torch.Tensor) -> torch.Tensor:
    """Label the 8-connected parts of a boolean mask (0 for background), by propagating the largest label."""
    labels = torch.arange(1, mask.numel() + 1, dtype=torch.float32).view(mask.shape) * mask
    for _ in range(4 * sum(mask.shape)):
        grown = _dilate(labels, 3) * mask
        if torch.equal(grown, labels):
            break
        labels = grown
    return labels


def _keep(mask: torch.Tensor) -> torch.Tensor:
    """The digit's parts of an ink mask: its largest part that does not touch the border (the table, the sheet's
    edge), or the largest of all when the rest are specks, and the parts near it at least a tenth of its size.
    A part along more than half of a side is the sheet's edge or a shadow, never the digit."""
    labels = _components(mask)
    ids, areas = labels[labels > 0].unique(return_counts=True)
    sides = (labels[0], labels[-1], labels[:, 0], labels[:, -1])
    along = torch.stack([(side[:, None] == ids).float().mean(0) for side in sides]).amax(0)
    ids, areas = ids[along <= 0.5], areas[along <= 0.5]
    if not len(ids):
        return torch.zeros_like(mask)
    touching = torch.isin(ids, torch.cat(sides).unique())
    inside = ~touching
    # A part inside wins over larger ones on the border unless it is a speck beside a digit cut by the border.
    use_inside = inside.any() and areas[inside].max() >= min(0.3 * areas.max(), 16)
    candidates = inside if use_inside else torch.ones_like(inside)
    main = int(candidates.nonzero()[areas[candidates].argmax()])
    rows, cols = (labels == ids[main]).nonzero(as_tuple=True)
    top, bottom, left, right = int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())
    margin = max(bottom - top, right - left) // 2 + 1
    near = torch.zeros_like(mask)
    near[max(0, top - margin) : bottom + margin + 1, max(0, left - margin) : right + margin + 1] = True
    kept = labels == ids[main]
    for i in range(len(ids)):
        if i == main or areas[i] < 0.1 * areas[main] or (touching[i] and not touching[main]):
            continue
        part = labels == ids[i]
        if (part & near).any():
            kept |= part
    return kept


def prepare(grey: torch.Tensor) -> torch.Tensor:
    """A picture of one digit (grey levels 0..1, ``[H, W]``) as MNIST draws it: float ``[28, 28]``, ink 1 on 0."""
    amount = ink(grey)
    strongest = _strokes(amount)
    if strongest < MIN_CONTRAST:
        raise NoInk(f"no ink found (the strongest strokes differ from the paper by {strongest:.0%} of full scale)")
    threshold = _otsu(amount.flatten().clamp(0, 1))
    mask = amount > threshold
    if mask.sum() < 4:
        raise NoInk("no ink found (fewer than 4 pixels stand out from the paper)")
    # The digit's parts, found on a copy at most 128 pixels a side (fast, and stroke gaps of a pixel are bridged).
    factor = max(1, math.ceil(max(mask.shape) / 128))
    coarse = F.max_pool2d(mask[None, None].float(), factor, factor, ceil_mode=True)[0, 0] > 0
    kept = _keep(coarse)
    kept = kept.repeat_interleave(factor, 0).repeat_interleave(factor, 1)[: mask.shape[0], : mask.shape[1]]
    mask &= kept
    if mask.sum() < 4:
        raise NoInk("no ink found (only the sheet's edge or specks stand out from the paper)")
    rows, cols = mask.nonzero(as_tuple=True)
    top, bottom, left, right = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    # Ink level: the strokes' cores are full ink (MNIST's 1.0), the paper's grain below half the threshold is none.
    core = amount[mask].quantile(0.75) if mask.sum() > 1 else amount[mask].max()
    low = threshold / 2
    level = ((amount - low) / (core - low).clamp(min=1e-6)).clamp(0, 1) * _dilate(kept.float(), 3)
    crop = _thicken(level[top:bottom, left:right], mask[top:bottom, left:right])
    height, width = crop.shape
    scale = BOX / max(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    digit = _resize(crop, size).clamp(0, 1)
    return _centre(digit)


def _thicken(crop: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Strokes thinner than MNIST's (a fine pen on a big digit) are widened to STROKE of the box side."""
    area = float(mask.sum())
    edge = float((mask & ~(_erode(mask.float(), 3) > 0)).sum())
    width = 2 * area / max(edge, 1.0)  # a stroke of width w and length L: area wL, edge pixels 2L
    k = int(round(STROKE * max(crop.shape) - width)) | 1
    if k <= 1:
        return crop
    return _dilate(F.pad(crop, (k // 2,) * 4), k)  # with room to grow on every side


def _centre(digit: torch.Tensor) -> torch.Tensor:
    """Place the digit in 28x28 with its centre of mass on MNIST's (pixel 14, 14)."""
    out = torch.zeros(SIDE + 2 * BOX, SIDE + 2 * BOX)  # room to shift without falling off
    height, width = digit.shape
    mass = digit.sum().clamp(min=1e-6)
    row = float((digit.sum(1) * torch.arange(height)).sum() / mass)
    col = float((digit.sum(0) * torch.arange(width)).sum() / mass)
    top, left = BOX + SIDE // 2 - round(row), BOX + SIDE // 2 - round(col)
    out[top : top + height, left : left + width] = digit
    return out[BOX : BOX + SIDE, BOX : BOX + SIDE]


# ------------------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------------------


def default_model() -> tuple[str, str]:
    """The tracking URI ($MLFLOW_TRACKING_URI, else the default config's) and the champion of the default config's
    registered model."""
    defaults = OmegaConf.create(
        {"data": OmegaConf.structured(config.DataConfig), "mlflow": OmegaConf.structured(config.MlflowConfig)}
    )
    uri = os.environ.get("MLFLOW_TRACKING_URI") or defaults.mlflow.tracking_uri
    return uri, tracking.champion_uri(defaults.mlflow.registered_model)


def load(model_uri: str, tracking_uri: str, trust_pickle: bool = False):
    """The model behind ``model_uri``; a one-line UserError that says how to get one when there is none, or why
    it is refused (a model that would run code from the store, unless ``trust_pickle``: ``tracking.load_model``)."""
    import mlflow

    tracking.quiet()
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    db = tracking.sqlite_path(tracking_uri)
    make_one = "a sweep registers its best model as champion: python train.py -m model.hidden=128,256"
    needs_store = model_uri.startswith(("models:/", "runs:/"))  # a folder or file:// URI needs none
    if needs_store and db is not None and not db.exists():
        raise UserError(
            f"no MLflow store at {db.resolve()} (run this where you trained, or set MLFLOW_TRACKING_URI); {make_one}"
        )
    if needs_store and tracking_uri.startswith(("http://", "https://")):
        tracking.check_server(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    try:
        return tracking.load_model(model_uri, trust_pickle=trust_pickle)
    except tracking.NoModelError as e:
        if model_uri.startswith("models:/") and "@" in model_uri:
            name = model_uri.removeprefix("models:/")
            raise UserError(f"no model registered as {name} in {tracking_uri}; {make_one}") from None
        raise UserError(str(e)) from e
    except UserError:
        raise
    except Exception as e:  # a path that holds no model, a damaged one
        raise UserError(f"cannot load {model_uri}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from e


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """A usage mistake in one line (argparse prints the whole usage first)."""
        self.exit(2, f"error: {message} (see: {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    tracking_uri, champion = default_model()
    parser = _Parser(
        prog="python -m mnist_sweep.predict",
        description="Classify photographed or scanned handwritten digits: one line per image, PATH DIGIT PROBABILITY.",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="JPEG or PNG files, one digit each")
    parser.add_argument("--model", default=champion, help=f"an MLflow model URI or folder (default: {champion})")
    parser.add_argument("--tracking-uri", default=tracking_uri, help=f"the MLflow store (default: {tracking_uri})")
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="also load pickled models (mlflow.model_format=pickle): they run whatever code their files hold, so "
        "only if you trust whoever can write the store",
    )
    args = parser.parse_args(argv)
    try:
        model = load(args.model, args.tracking_uri, args.trust_pickle)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    paths, digits, failed = [], [], 0
    for path in args.images:
        try:
            digits.append(prepare(read(path)))
            paths.append(path)
        except ValueError as e:
            print(f"error: {path}: {e}", file=sys.stderr)
            failed += 1
        except Exception as e:  # a picture Pillow reads in a way nobody foresaw: still one line, and the next one
            print(f"error: {path}: cannot use it ({type(e).__name__}: {str(e).splitlines()[0][:200]})", file=sys.stderr)
            failed += 1
    if digits:
        import numpy as np

        images = torch.stack(digits)[:, None].numpy()  # float32 [N,1,28,28]: what every model format takes
        scores = torch.as_tensor(np.asarray(model.predict(images)))
        probabilities = scores.float().softmax(1)
        for path, p in zip(paths, probabilities, strict=True):
            print(f"{path} {int(p.argmax())} {float(p.max()):.3f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
