"""What augmentation costs a training step, and what the elastic field's matrix saves, side by side.

    python -m mnist_sweep.bench_augment   # writes docs/BENCHMARKS-augment.md

The distortion of ``experiment=best_aug`` (or ``--preset``) is timed on random batches of its batch size, two ways:
the elastic field made by blurring and interpolating each batch's coarse noise (``Augment._smooth``, the way it
was made before), and by one matmul with that operation's matrix (``Augment._basis``, the way it is made now).
Beside them, one training step of the preset's net (forward, backward and optimiser step, in its precision).
The three are timed in turns, ``--rounds`` times, and the medians reported, so a slow spell of the shared machine
falls on all of them. No data is read: the cost of these operations does not depend on the pixels.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from mnist_sweep import training
from mnist_sweep.augment import Augment
from mnist_sweep.bench_sweeps import command_line, write_report


class PerBatchElastic(Augment):
    """The distortion with the elastic field blurred and interpolated afresh for every batch (the old way)."""

    def _elastic(self, b: int, h: int, w: int, s: float, device) -> torch.Tensor:
        gh, gw = self._coarse(h, w)
        noise = torch.rand(b * 2, 1, gh, gw, device=device) * 2 - 1
        return self._to_grid(self._smooth(noise, h, w).view(b * 2, h * w), b, h, w, s)


def training_step(cfg, settings, net, x, y, augment=None):
    """One training step of ``net`` on the batch ``x``, ``y`` as ``training.fit`` takes it: the distortion (if
    given), forward and loss in the preset's precision (an ensemble's members each with their own loss),
    backward, and the preset's optimiser."""
    from hydra.utils import instantiate

    optimizer = instantiate(cfg.optimizer, _convert_="all")(net.parameters())
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=settings.trainer.label_smoothing)
    device = torch.device("cpu")

    def step():
        with training.autocast(device, settings.trainer.precision):
            logits = net(augment(x) if augment else x)
            members = len(logits) if logits.dim() == 3 else 1
            loss = loss_fn(logits.float().flatten(0, -2), y.repeat(members))
        optimizer.zero_grad(set_to_none=True)
        (loss * members).backward()
        optimizer.step()

    return step


def _ms_per_call(fn, calls: int) -> float:
    fn()  # warm-up: first-call allocations and the basis' one-off construction
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1000


def in_turns(timed: dict, rounds: int, calls: int) -> dict[str, list[float]]:
    """Each function's ms per call, timed in turns for ``rounds`` rounds (a slow spell falls on all of them)."""
    times: dict[str, list[float]] = {k: [] for k in timed}
    for _ in range(rounds):
        for name, fn in timed.items():
            times[name].append(_ms_per_call(fn, calls))
    return times


def measure(preset: str, rounds: int, calls: int) -> dict:
    from mnist_sweep import model
    from mnist_sweep.app import _augmenter, make_model_args
    from mnist_sweep.bench import compose

    cfg, settings = compose([f"experiment={preset}", "device=cpu"])
    matrix = _augmenter(settings.data.augment)
    if matrix is None:
        raise SystemExit(f"experiment={preset} does not augment (data.augment.strength=0): nothing to time")
    per_batch = _augmenter(settings.data.augment, PerBatchElastic)
    b = settings.data.batch_size
    x, y = torch.randn(b, 1, 28, 28), torch.randint(0, 10, (b,))

    # The two ways draw the same random numbers in the same order, so they give the same images.
    torch.manual_seed(0)
    old = per_batch(x)
    torch.manual_seed(0)
    new = matrix(x)
    same = (old - new).abs().max().item()

    net = model.build(**make_model_args(settings, 10))
    step = training_step(cfg, settings, net, matrix(x), y)
    timed = {"per_batch": lambda: per_batch(x), "matrix": lambda: matrix(x), "step": step}
    times = in_turns(timed, rounds, calls)
    return {
        "settings": settings,
        "max_diff": same,
        "ms": {k: statistics.median(v) for k, v in times.items()},
        "spread": {k: (min(v), max(v)) for k, v in times.items()},
    }


def markdown(command: str, preset: str, rounds: int, calls: int, r: dict) -> str:
    from mnist_sweep.bench_sweeps import _machine, _versions

    ms, s = r["ms"], r["settings"]
    b = s.data.batch_size
    n_train = 60_000 - s.data.val_size
    steps = -(-n_train // b)
    old_step, new_step = ms["per_batch"] + ms["step"], ms["matrix"] + ms["step"]
    a = s.data.augment
    row = "| {} | {:.2f} | {:.2f}-{:.2f} | {:.2f} |"
    return "\n".join(
        [
            "# Augmentation's cost per training step",
            "",
            f"Command: `{command}`",
            "",
            f"Machine: {_machine()}. {_versions()}.",
            "",
            f"`experiment={preset}`: batches of {b}, rotation {a.rotate}°, shear {a.shear}°, scale {a.scale}, "
            f"shift {a.shift}, elastic alpha {a.elastic_alpha} px and sigma {a.elastic_sigma} px, strength "
            f"{a.strength}; the net {s.model.depth} x {s.model.hidden}, {s.trainer.precision}. Each operation "
            f"timed over {calls} calls, in turns, {rounds} rounds; the median round, and the range.",
            "",
            "| per batch | ms (median) | ms (range) | x a training step |",
            "| --- | --- | --- | --- |",
            row.format(
                "distortion, elastic field blurred per batch (before)",
                ms["per_batch"],
                *r["spread"]["per_batch"],
                ms["per_batch"] / ms["step"],
            ),
            row.format(
                "distortion, elastic field by its matrix (now)",
                ms["matrix"],
                *r["spread"]["matrix"],
                ms["matrix"] / ms["step"],
            ),
            row.format("training step: forward, backward, optimiser", ms["step"], *r["spread"]["step"], 1.0),
            "",
            f"**The matrix makes the distortion {ms['per_batch'] / ms['matrix']:.1f}x faster, and a distorted "
            f"training step (distortion + step) {old_step / new_step:.2f}x faster:** {old_step:.1f} ms before, "
            f"{new_step:.1f} ms now, about {(old_step - new_step) * steps / 1000:.1f} s of an epoch of "
            f"{n_train:,} images ({steps} steps). Both ways give the same images from the same random numbers "
            f"(largest pixel difference {r['max_diff']:.1e}, on the normalised scale).",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="best_aug", help="an experiment that augments")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=50, help="calls per operation in each round")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS-augment.md"))
    a = parser.parse_args(argv)
    command = command_line("mnist_sweep.bench_augment", argv)
    text = markdown(command, a.preset, a.rounds, a.calls, measure(a.preset, a.rounds, a.calls))
    write_report(a.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
