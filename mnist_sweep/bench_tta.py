"""Test-time augmentation (TTA): does a trained net vote better over distorted copies of each image?

    python -m mnist_sweep.bench_tta RUN_DIR [RUN_DIR ...]          # validation only
    python -m mnist_sweep.bench_tta RUN_DIR [RUN_DIR ...] --test S  # and the test set, for the chosen strength S

Each RUN_DIR is a finished run's output folder (``outputs/...``) or its MLflow artifacts folder
(``mlruns/<experiment id>/<run id>/artifacts``): either holds ``checkpoint/model.pt`` and the config saved beside
it, ``checkpoint/config.yaml``. Its net is rebuilt from the one and its data from the other, so it is scored on
the very validation split it was chosen on. Each validation image is scored as it is, then with TTA: the class
probabilities averaged over the image and ``--views`` distorted copies, at each of ``--strengths`` (multiples of
the run's own ``data.augment`` magnitudes). The copies come from a generator seeded with
``--tta-seed``, so a rerun gives the same numbers.

The choice is made on validation only: the test set is scored only with ``--test S``, for the one strength
chosen (0: plain evaluation won), beside the plain test accuracy the run reported. Writes
docs/BENCHMARKS-tta.md (``--out``).

``--ensemble`` adds one more row: the runs' nets voting together (their probabilities averaged, no TTA), an
ensemble of N nets that cost N runs' training time.

``--recalibrate`` adds one more column, for nets with batch norm (``model.norm=batch``): plain validation accuracy
after each BatchNorm's running mean and variance are estimated again, as a plain average over one pass of the
clean training split (deskewed where the run deskewed, never distorted), in place of training's running average
over its last distorted batches.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mnist_sweep.bench_sweeps import command_line, write_report

REPO = Path(__file__).resolve().parent.parent


@dataclasses.dataclass
class Scored:
    run: str
    seed: int
    val: dict[float, float]  # strength (0 = plain) -> accuracy
    test: dict[float, float]
    seconds: dict[float, float]  # strength -> seconds to score the validation split
    # --ensemble: split -> (plain probabilities, labels)
    votes: dict[str, tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict)
    recalibrated: float | None = None  # --recalibrate: plain val accuracy with batch norm re-estimated


def load_run(folder: Path, device: str, root: str | None):
    """The run's settings (the config saved beside its weights), net (from its checkpoint) and data loaders."""
    from mnist_sweep import config, model, training
    from mnist_sweep.app import make_loaders
    from mnist_sweep.bench import compose

    ckpt_path, saved_path = folder / "checkpoint" / "model.pt", folder / "checkpoint" / "config.yaml"
    for path in (ckpt_path, saved_path):
        if not path.is_file():
            raise SystemExit(
                f"{path} not found: give the output folder of a finished run (outputs/...) "
                "or its MLflow artifacts folder (mlruns/<experiment id>/<run id>/artifacts)"
            )
    # The config saved beside the weights is the one the net was trained with, resolved; not .hydra/overrides.yaml,
    # which two runs started in the same second once shared (one's folder then held the other's overrides).
    # Only where to run and where the digits are come from this command: the device preset it names, composed
    # as `python train.py device=...` would, and --data-root.
    here, _ = compose([f"device={device}"])
    saved = OmegaConf.merge(OmegaConf.structured(config.Config), OmegaConf.load(saved_path))
    saved.device = here.device
    if root:
        saved.data.root = root
    settings = config.check(saved)
    net = model.load_checkpoint(ckpt_path).net  # the trained net, without the export's own preprocessing
    dev = training.resolve_device(settings.device.type)
    loaders = make_loaders(settings, dev, torch.Generator().manual_seed(0))
    if not len(loaders.val):
        raise SystemExit(f"{folder} ran without a validation split (data.val_size=0): nothing to choose on")
    return settings, net.to(dev).eval(), loaders, dev


def score(folder: Path, strengths: list[float], views: int, test: float | None, a) -> Scored:
    from mnist_sweep import training
    from mnist_sweep.app import tta_augmenter

    settings, net, loaders, dev = load_run(folder, a.device, a.data_root)
    classes, precision = len(loaders.classes), settings.trainer.precision

    def evaluate(loader, strength: float) -> float:
        if strength == 0:
            return training.evaluate(net, loader, dev, classes, precision).acc
        augment = tta_augmenter(settings.data.augment, strength, dev, a.tta_seed)
        if augment is None:
            raise SystemExit(f"{folder}: data.augment has no distortion to apply at test time")
        return training.evaluate(net, loader, dev, classes, precision, augment, views).acc

    result = Scored(str(folder), settings.seed, {}, {}, {})
    for s in [0.0, *strengths]:
        t0 = time.perf_counter()
        result.val[s] = evaluate(loaders.val, s)
        result.seconds[s] = time.perf_counter() - t0
        print(f"{folder}: val acc {result.val[s]:.4f} at strength {s} ({result.seconds[s]:.1f} s)", file=sys.stderr)
    for s in _tested(test):
        result.test[s] = evaluate(loaders.test, s)
    if a.ensemble:
        splits = {"val": loaders.val, **({"test": loaders.test} if test is not None else {})}
        result.votes = {k: _probabilities(net, loader, dev, precision) for k, loader in splits.items()}
    if a.recalibrate:
        try:
            clean = recalibrate(copy.deepcopy(net), loaders.train, dev, precision)  # the net itself stays as trained
        except ValueError as e:
            raise SystemExit(f"{folder}: {e}") from None
        result.recalibrated = training.evaluate(clean, loaders.val, dev, classes, precision).acc
    return result


@torch.no_grad()
def recalibrate(net: torch.nn.Module, loader, dev, precision: str) -> torch.nn.Module:
    """Re-estimate every BatchNorm's running mean and variance over one pass of ``loader`` (a plain average)."""
    from mnist_sweep import training

    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise ValueError("--recalibrate needs a net with batch norm (model.norm=batch)")
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # None: a cumulative average over the batches, not an exponential one
    net.train()  # batch norm updates its running statistics only in training mode (no_grad: nothing else moves)
    for m in net.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()  # no dropout while measuring: evaluation runs without it
    for x, _ in loader:
        with training.autocast(dev, precision):
            net(x.to(dev))
    return net.eval()


def _tested(test: float | None) -> list[float]:
    """The strengths the test set is scored at: none, or plain and the one chosen (``--test``)."""
    return [] if test is None else sorted({0.0, test})


@torch.inference_mode()
def _probabilities(net, loader, dev, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image's class probabilities [N, classes] and its label [N], in the loader's order."""
    from mnist_sweep import training

    probs, labels = [], []
    for x, y in loader:
        with training.autocast(dev, precision):
            probs.append(net(x.to(dev)).float().softmax(-1).cpu())
        labels.append(y.cpu())
    return torch.cat(probs), torch.cat(labels)


def ensemble(rows: list[Scored]) -> dict[str, float]:
    """The accuracy of the runs' mean vote on each split they were all scored on."""
    out = {}
    for split in rows[0].votes:
        labels = rows[0].votes[split][1]
        if any(not torch.equal(r.votes[split][1], labels) for r in rows):
            raise SystemExit(f"the runs' {split} splits differ (data.split_seed, data.val_size): no common vote")
        mean = torch.stack([r.votes[split][0] for r in rows]).mean(0)
        out[split] = (mean.argmax(1) == labels).sum().item() / len(labels)
    return out


def markdown(command: str, views: int, strengths: list[float], test: float | None, rows: list[Scored]) -> str:
    from mnist_sweep.bench_sweeps import _machine, _versions

    columns = [0.0, *strengths]

    def name(s: float) -> str:
        return "plain" if s == 0 else f"TTA {s:g}"

    def pct(v: float) -> str:
        return f"{100 * v:.2f}"

    recalibrated = rows[0].recalibrated is not None
    head = ["run", "seed", *(f"val {name(s)}" for s in columns)] + (["val recalibrated"] if recalibrated else [])
    head += [f"test {name(s)}" for s in _tested(test)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [f"`{r.run}`", str(r.seed), *(pct(r.val[s]) for s in columns)]
        cells += [pct(r.recalibrated)] if recalibrated else []
        cells += [pct(r.test[s]) for s in _tested(test)]
        lines.append("| " + " | ".join(cells) + " |")
    mean = {s: statistics.mean(r.val[s] for r in rows) for s in columns}
    cells = ["mean", "", *(pct(mean[s]) for s in columns)]
    cells += [pct(statistics.mean(r.recalibrated for r in rows))] if recalibrated else []
    cells += [pct(statistics.mean(r.test[s] for r in rows)) for s in _tested(test)]
    lines.append("| " + " | ".join(cells) + " |")
    if rows[0].votes:
        voted = ensemble(rows)
        cells = [f"ensemble of the {len(rows)} nets (mean vote)", "", pct(voted["val"]), *["-"] * len(strengths)]
        cells += ["-"] if recalibrated else []
        cells += [pct(voted["test"]), *["-"] * (len(_tested(test)) - 1)] if test is not None else []
        lines.append("| " + " | ".join(cells) + " |")
    best = max(strengths, key=lambda s: mean[s]) if strengths else 0.0
    cost = statistics.mean(r.seconds[best] / r.seconds[0.0] for r in rows) if strengths else 1.0
    runs = f"mean of {len(rows)} run{'s' if len(rows) > 1 else ''}"
    gain = pct(mean[best] - mean[0.0])
    if not strengths:
        summary = f"Plain evaluation only ({runs})"
    elif mean[best] > mean[0.0]:
        summary = f"Best on validation: {name(best)}, {gain} points over plain ({runs}), at {cost:.1f}x its time"
    else:
        summary = f"Best on validation: plain; the best TTA ({name(best)}, {cost:.1f}x the time): {gain} ({runs})"
    if recalibrated:
        change = pct(statistics.mean(r.recalibrated for r in rows) - mean[0.0])
        summary += f". Batch norm recalibrated on the clean training images: {change} points against plain"
    summary += "."
    return "\n".join(
        [
            "# Test-time augmentation" + (" and batch-norm recalibration" if recalibrated else ""),
            "",
            f"Command: `{command}`",
            "",
            f"Machine: {_machine()}. {_versions()}.",
            "",
            f"Each run's validation split scored as it is (plain) and with test-time augmentation (TTA {{strength}}): "
            f"the class probabilities averaged over the image and {views} distorted copies, the run's own "
            "data.augment magnitudes times the strength. "
            + (
                "Val recalibrated: plain, after each BatchNorm's running mean and variance were estimated again "
                "over one pass of the clean (undistorted) training split. "
                if recalibrated
                else ""
            )
            + "Accuracies in %.",
            "",
            *lines,
            "",
            summary,
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished runs' output folders")
    parser.add_argument("--views", type=int, default=8, help="distorted copies per image, beside the image")
    parser.add_argument("--strengths", type=float, nargs="*", default=[0.25, 0.5, 1.0])
    parser.add_argument(
        "--test", type=float, default=None, metavar="S", help="score the test set at strength S (0: plain)"
    )
    parser.add_argument("--ensemble", action="store_true", help="also score the runs' nets voting together")
    parser.add_argument(
        "--recalibrate", action="store_true", help="also score them with batch norm re-estimated on clean images"
    )
    parser.add_argument("--tta-seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-root", default=None, help="where the MNIST files are, if not where the runs read them")
    parser.add_argument("--out", default=str(REPO / "docs" / "BENCHMARKS-tta.md"))
    a = parser.parse_args(argv)
    if a.views < 1 or any(s <= 0 for s in a.strengths):
        parser.error("--views must be 1 or more and every --strengths value above 0")
    if a.test is not None and a.test not in [0.0, *a.strengths]:
        parser.error(f"--test {a.test}: choose one of --strengths {a.strengths} (on validation) first")
    command = command_line("mnist_sweep.bench_tta", argv)
    rows = [score(folder, a.strengths, a.views, a.test, a) for folder in a.runs]
    text = markdown(command, a.views, a.strengths, a.test, rows)
    write_report(a.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
