"""What augmentation costs a training step, and what making the elastic field by one matmul saves.

    python -m benchmarks.augment   # writes the "augment" block of docs/BENCHMARKS.md (about a minute)

The distortion of ``experiment=best_aug`` (or ``--preset``), as training applies it (``augment.from_config``), is
timed on random batches of its batch size beside one training step of the preset's net (forward, backward and
optimiser step, in its precision). Its elastic displacement field is made by one matmul with a fixed matrix;
before, each batch's coarse noise was blurred and interpolated up afresh. Both ways of making the field are
timed here, from this module's own code: ``blurred_fields`` (the way before) and ``field_matrix`` (that same
linear map as a matrix, the library's way now). Everything is timed in turns, ``--rounds`` times, and the
medians reported, so a slow spell of the shared machine falls on all of them. No data is read: the cost of
these operations does not depend on the pixels.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks import common
from mnist_sweep import augment, model, run, training


def coarse(h: int, w: int, sigma: float) -> tuple[int, int]:
    """The coarse grid the field's noise is drawn on: points ``sigma`` pixels apart (8x8 for 28x28 at 4)."""
    stride = max(1, int(sigma))
    return -(-(h - 1) // stride) + 1, -(-(w - 1) // stride) + 1


def blurred_fields(noise: torch.Tensor, h: int, w: int, sigma: float) -> torch.Tensor:
    """Coarse white noise [N, 1, gh, gw] -> smooth fields [N, h * w]: a separable Gaussian blur of sigma / stride
    cells on the coarse grid, then bicubic interpolation up to the image's size (the per-batch way)."""
    s = sigma / max(1, int(sigma))
    radius = max(1, int(3 * s))
    t = torch.arange(-radius, radius + 1, device=noise.device, dtype=noise.dtype)
    kernel = torch.exp(-(t**2) / (2 * s**2))
    kernel = kernel / kernel.sum()
    field = F.conv2d(F.pad(noise, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    field = F.conv2d(F.pad(field, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return F.interpolate(field, size=(h, w), mode="bicubic", align_corners=True).flatten(1)


def field_matrix(h: int, w: int, sigma: float) -> torch.Tensor:
    """``blurred_fields`` as a matrix [gh * gw, h * w]: padding, blur and interpolation are linear in the noise,
    so the fields of each coarse point alone, stacked, map any noise to its field in one matmul."""
    gh, gw = coarse(h, w, sigma)
    return blurred_fields(torch.eye(gh * gw).view(gh * gw, 1, gh, gw), h, w, sigma)


def training_step(cfg, settings, net, x, y, distort=None):
    """One training step of ``net`` on the batch ``x``, ``y`` as ``training.fit`` takes it: the distortion (if
    given), forward and loss in the preset's precision (an ensemble's members each with their own loss),
    backward, and the preset's optimiser."""
    from hydra.utils import instantiate

    optimizer = training.build_optimizer(instantiate(cfg.optimizer, _convert_="all"), net.parameters())
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=settings.trainer.label_smoothing)
    device = torch.device("cpu")

    def step():
        with training.autocast(device, settings.trainer.precision):
            logits = net(distort(x) if distort else x)
            members = len(logits) if logits.dim() == 3 else 1
            loss = loss_fn(logits.float().flatten(0, -2), y.repeat(members))
        optimizer.zero_grad(set_to_none=True)
        (loss * members).backward()
        optimizer.step()

    return step


def _ms_per_call(fn, calls: int) -> float:
    fn()  # warm-up: first-call allocations and the field matrix's one-off construction
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
    cfg, settings = common.compose([f"experiment={preset}", "device=cpu"])
    cpu = torch.device("cpu")
    settings.trainer.precision = training.resolve_precision(settings.trainer.precision, cpu)  # auto, resolved
    distort = augment.from_config(settings.data.augment)
    a = settings.data.augment
    if distort is None:
        raise SystemExit(f"experiment={preset} does not augment (data.augment.strength=0): nothing to time")
    if a.elastic_alpha <= 0:
        raise SystemExit(f"experiment={preset} has no elastic distortion (data.augment.elastic_alpha=0)")
    b, h, w = settings.data.batch_size, 28, 28
    x, y = torch.randn(b, 1, h, w), torch.randint(0, 10, (b,))
    gh, gw = coarse(h, w, a.elastic_sigma)
    matrix = field_matrix(h, w, a.elastic_sigma)

    def noise() -> torch.Tensor:  # dx and dy of every image: 2 fields per image, as the distortion draws them
        return torch.rand(b * 2, gh * gw) * 2 - 1

    # The two ways give the same fields from the same noise.
    n = noise()
    same = (blurred_fields(n.view(-1, 1, gh, gw), h, w, a.elastic_sigma) - n @ matrix).abs().max().item()

    net = model.build(**run.model_args(settings, 10))
    timed = {
        "per_batch": lambda: blurred_fields(noise().view(-1, 1, gh, gw), h, w, a.elastic_sigma),
        "matrix": lambda: noise() @ matrix,
        "distortion": lambda: distort(x),
        "step": training_step(cfg, settings, net, distort(x), y),
    }
    times = in_turns(timed, rounds, calls)
    return {
        "settings": settings,
        "max_diff": same,
        "ms": {k: statistics.median(v) for k, v in times.items()},
        "spread": {k: (min(v), max(v)) for k, v in times.items()},
    }


def markdown(command: str, preset: str, rounds: int, calls: int, r: dict) -> str:
    ms, s = r["ms"], r["settings"]
    b = s.data.batch_size
    n_train = 60_000 - s.data.val_size
    steps = -(-n_train // b)
    before = ms["distortion"] - ms["matrix"] + ms["per_batch"]  # the distortion with the field made per batch
    old_step, new_step = before + ms["step"], ms["distortion"] + ms["step"]
    a = s.data.augment

    def row(label: str, key: str) -> list[str]:
        lo, hi = r["spread"][key]
        return [label, f"{ms[key]:.2f}", f"{lo:.2f}-{hi:.2f}", f"{ms[key] / ms['step']:.2f}"]

    return "\n".join(
        [
            "## Augmentation's cost per training step",
            "",
            *common.header(command),
            f"`experiment={preset}`: batches of {b}, rotation {a.rotate}°, shear {a.shear}°, scale {a.scale}, "
            f"shift {a.shift}, elastic alpha {a.elastic_alpha} px and sigma {a.elastic_sigma} px, strength "
            f"{a.strength}; the net {s.model.depth} x {s.model.hidden}, {s.trainer.precision}. Each operation "
            f"timed over {calls} calls, in turns, {rounds} rounds; the median round, and the range.",
            "",
            common.table(
                ["per batch", "ms (median)", "ms (range)", "x a training step"],
                [
                    row("elastic field, blurred and interpolated per batch (before)", "per_batch"),
                    row("elastic field, by one matmul with its matrix (now)", "matrix"),
                    row("the whole distortion as training applies it (now)", "distortion"),
                    row("training step: forward, backward, optimiser", "step"),
                ],
            ),
            "",
            f"**The matrix makes the elastic field {ms['per_batch'] / ms['matrix']:.1f}x faster, and a distorted "
            f"training step (distortion + step) {old_step / new_step:.2f}x faster:** {old_step:.1f} ms before "
            f"(the distortion with the field made per batch: {before:.2f} ms), {new_step:.1f} ms now, about "
            f"{(old_step - new_step) * steps / 1000:.1f} s of an epoch of {n_train:,} images ({steps} steps). "
            f"The distortion costs {ms['distortion'] / ms['step']:.0%} of a step. Both ways give the same fields "
            f"from the same noise (largest difference {r['max_diff']:.1e}).",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="best_aug", help="an experiment that augments")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=50, help="calls per operation in each round")
    parser.add_argument("--out", default=str(common.BENCHMARKS_MD), help="markdown file: its 'augment' block")
    a = parser.parse_args(argv)
    command = common.command_line("benchmarks.augment", argv)
    text = markdown(command, a.preset, a.rounds, a.calls, measure(a.preset, a.rounds, a.calls))
    common.write_report(a.out, text, block="augment")
    return 0


if __name__ == "__main__":
    sys.exit(main())
