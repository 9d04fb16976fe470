"""What the dropout mask costs on the CPU: torch's ``nn.Dropout`` and a mask drawn all at once, side by side.

    python -m mnist_sweep.bench_dropout   # writes docs/BENCHMARKS-dropout.md

On the CPU, torch draws the dropout mask one Bernoulli sample at a time, in a loop that branches on every draw;
at ``p = 0.5`` that branch is a coin flip the processor cannot predict. The candidate, ``UniformMaskDropout``,
draws uniform numbers for the whole batch and compares them with ``p``: the same distribution, another random
stream. Measured here, it was not adopted (docs/BENCHMARKS-dropout.md says why): the model keeps torch's.

Two measurements, each timed in turns ``--rounds`` times (so a slow spell of the shared machine falls on both
ways alike), the median round reported:

1. the dropout layer alone, forward and backward, on a batch of hidden units (``--shape``, in bf16 as the
   presets train), at each rate of ``--ps``;
2. one training step of each preset of ``--presets`` (the distortion where it augments, forward, backward, the
   optimiser), its net built twice from the same weights: once with torch's dropout, once with the candidate.

No data is read: what these operations cost does not depend on the pixels.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

from mnist_sweep import model
from mnist_sweep.bench_augment import in_turns, training_step
from mnist_sweep.bench_sweeps import command_line, write_report


class UniformMaskDropout(nn.Dropout):
    """``nn.Dropout`` whose CPU mask is ``rand >= p``: each unit kept with probability 1 - p, scaled by 1 / (1 - p)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p in (0, 1) or x.device.type != "cpu":
            return super().forward(x)
        keep = torch.rand(x.shape, device=x.device) >= self.p
        return x * keep * (1 / (1 - self.p))


def with_uniform_mask(net: nn.Module) -> nn.Module:
    """A copy of ``net`` whose dropout layers are ``UniformMaskDropout`` (same rates, same weights)."""
    net = copy.deepcopy(net)
    for parent in list(net.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Dropout:
                setattr(parent, name, UniformMaskDropout(child.p))
    return net


def measure_layer(ps: list[float], shape: tuple[int, int], rounds: int, calls: int) -> list[dict]:
    rows = []
    for p in ps:
        x = torch.randn(shape, dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(shape, dtype=torch.bfloat16)
        layers = {"torch": nn.Dropout(p).train(), "uniform": UniformMaskDropout(p).train()}
        timed = {k: (lambda d=d, x=x, grad=grad: d(x).backward(grad)) for k, d in layers.items()}
        times = in_turns(timed, rounds, calls)
        rows.append({"p": p, **{k: statistics.median(v) for k, v in times.items()}})
    return rows


def measure_step(preset: str, rounds: int, calls: int) -> dict:
    from mnist_sweep.app import _augmenter, make_model_args
    from mnist_sweep.bench import compose

    cfg, settings = compose([f"experiment={preset}", "device=cpu"])
    torch.manual_seed(0)
    net = model.build(**make_model_args(settings, 10))
    nets = {"torch": net, "uniform": with_uniform_mask(net)}
    b = settings.data.batch_size
    x, y = torch.randn(b, 1, 28, 28), torch.randint(0, 10, (b,))
    augment = _augmenter(settings.data.augment)
    timed = {k: training_step(cfg, settings, n, x, y, augment) for k, n in nets.items()}
    times = in_turns(timed, rounds, calls)
    return {"preset": preset, "settings": settings, **{k: statistics.median(v) for k, v in times.items()}}


def markdown(command: str, a, layer: list[dict], steps: list[dict]) -> str:
    from mnist_sweep.bench_sweeps import _machine, _versions

    lines = [
        "# The dropout mask on the CPU: torch's `nn.Dropout` and a uniform draw compared with p",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {_machine()}. {_versions()}.",
        "",
        "Both ways keep each unit with probability 1 - p and scale it by 1 / (1 - p). torch's (the model's) draws",
        "the mask one Bernoulli sample at a time; the candidate (`UniformMaskDropout` in mnist_sweep/bench_dropout.py)",
        "draws uniform numbers for the whole batch and compares them with p.",
        f"Each timed over {a.calls} calls, in turns, {a.rounds} rounds; the median round.",
        "",
        f"## The layer alone: forward and backward on [{a.shape[0]}, {a.shape[1]}] bf16 units",
        "",
        "| p | torch's, ms | uniform draw, ms | torch's / uniform |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {r['p']} | {r['torch']:.2f} | {r['uniform']:.2f} | {r['torch'] / r['uniform']:.2f} |" for r in layer]
    lines += [
        "",
        "## One training step of a preset (distortion, forward, backward, optimiser)",
        "",
        "| preset | dropout (pixels, hidden) | nets | torch's, ms | uniform draw, ms | torch's / uniform "
        "| s an epoch would save |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in steps:
        s = r["settings"]
        n_steps = -(-(60_000 - s.data.val_size) // s.data.batch_size)
        saved = (r["torch"] - r["uniform"]) * n_steps / 1000
        lines.append(
            f"| `experiment={r['preset']}` | {s.model.input_dropout}, {s.model.dropout} | {s.model.members} "
            f"| {r['torch']:.1f} | {r['uniform']:.1f} | {r['torch'] / r['uniform']:.2f} "
            f"| {saved:.1f} ({n_steps} steps) |"
        )
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["best", "best_aug"])
    parser.add_argument("--ps", nargs="+", type=float, default=[0.1, 0.2, 0.5])
    parser.add_argument("--shape", nargs=2, type=int, default=[128, 2048], metavar=("BATCH", "UNITS"))
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=20, help="calls per way in each round")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS-dropout.md"))
    a = parser.parse_args(argv)
    command = command_line("mnist_sweep.bench_dropout", argv)
    layer = measure_layer(a.ps, tuple(a.shape), a.rounds, a.calls)
    steps = [measure_step(p, a.rounds, a.calls) for p in a.presets]
    write_report(a.out, markdown(command, a, layer, steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
