"""This project on a CUDA GPU: what ``trainer.precision=auto`` picks there, and the presets' speed and accuracy,
bf16 against fp32 side by side in one run.

    python -m benchmarks.gpu                  # writes the "gpu" block of docs/BENCHMARKS.md (a CUDA device needed)

Every run takes the code path of ``python train.py device=cuda OVERRIDES`` (``benchmarks.speed.project_trial``:
the composed config, the dataset as tensors on the GPU, ``training.fit``), without MLflow, so the benchmark
needs torch, hydra-core and omegaconf only. Before any run it checks, on the GPU, that the optimizer a run
builds (``training.build_optimizer``) reaches the same weights as torch's own class and imports no
``torch._dynamo``. Times are the runs' training time (training and validation, data already loaded); the first
run of each kind is preceded by a short warm-up (CUDA's context, kernel selection) that is not counted.

On a GPU box whose Python has torch but not this project's other packages, the pure-Python ``hydra``,
``omegaconf`` and ``antlr4`` folders copied from a venv onto ``PYTHONPATH`` suffice, with MNIST in any folder:
``PYTHONPATH=site:. python -m benchmarks.gpu --data-root mnist``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

from benchmarks import common
from benchmarks.speed import pct, project_trial, ratio, secs
from mnist_sweep import model, training

PRESETS = (  # (label, overrides): each runs with trainer.precision=auto (bf16 on a GPU that has it) and fp32
    ("`experiment=speedrun`", ["experiment=speedrun"]),
    ("defaults", []),
)
ONE_EPOCH = (("`experiment=best`", ["experiment=best"]), ("`experiment=best_aug`", ["experiment=best_aug"]))


def optimizer_check(device: torch.device) -> tuple[list[str], bool]:
    """Each optimizer preset built by ``build_optimizer`` against torch's own class, four steps on ``device``;
    and whether ``torch._dynamo`` was imported by the time all of ours had stepped (before torch's are built:
    those import it)."""
    from hydra.utils import instantiate

    def steps(net, opt, x, y) -> None:
        for _ in range(4):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()

    cases = []
    for preset in ("sgd", "adam", "adamw", "speedrun"):
        cfg, _ = common.compose([f"optimizer={preset}"] if preset != "speedrun" else ["experiment=speedrun"])
        make = instantiate(cfg.optimizer, _convert_="all")
        torch.manual_seed(0)
        net = model.build(hidden=64, depth=1).to(device)
        x, y = torch.randn(32, 1, 28, 28, device=device), torch.randint(0, 10, (32,), device=device)
        cases.append((preset, make, net, copy.deepcopy(net), x, y))
        steps(net, training.build_optimizer(make, net.parameters()), x, y)
    dynamo = "torch._dynamo" in sys.modules
    lines = []
    for preset, make, ours, theirs, x, y in cases:
        opt = make(theirs.parameters())
        steps(theirs, opt, x, y)
        same = all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters(), strict=True))
        lines.append(f"{preset}: {'same weights' if same else 'DIFFERENT weights'} as torch's {type(opt).__name__}")
    return lines, dynamo


def run_bench(args: argparse.Namespace) -> str:
    if not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device here; this benchmark measures one (CPU figures: benchmarks.speed)")
    device = torch.device("cuda")
    data_root = Path(args.data_root)
    auto = training.resolve_precision("auto", device)
    checks, dynamo = optimizer_check(device)

    def say(text: str) -> None:
        if not args.silent:
            print(text, file=sys.stderr, flush=True)

    rows, summary = [], []
    for label, overrides in PRESETS:
        extra = ["device=cuda"]
        project_trial("warm-up", [*overrides, *extra], data_root, epochs=1, limit=4096)
        trials = {"auto": [], "fp32": []}
        for seed in range(args.seeds):
            for precision in trials:  # in turns, so a slow spell of the machine hits both alike
                t = project_trial(label, [*overrides, *extra, f"trainer.precision={precision}"], data_root, seed=seed)
                trials[precision].append(t)
                say(f"{label} {precision} ({t.precision}) seed {seed}: {t.final_acc:.4f}, {t.train_seconds:.2f} s")
        for precision, ts in trials.items():
            ran = ts[0].precision
            rows.append(
                [
                    label,
                    f"{precision} ({ran})" if precision == "auto" else precision,
                    f"{len(ts)} x {ts[0].epochs_run}",
                    " / ".join(pct(t.final_acc) for t in ts),
                    secs(statistics.median(t.train_seconds for t in ts)),
                    f"{statistics.median(t.throughput for t in ts):,.0f}",
                    secs(statistics.median(t.time_to(0.98) or float("nan") for t in ts)),
                ]
            )
        fp32, amp = (statistics.median(t.train_seconds for t in trials[p]) for p in ("fp32", "auto"))
        summary.append(f"{label}: auto ({trials['auto'][0].precision}) trains {ratio(fp32, amp)} as fast as fp32")
    for label, overrides in ONE_EPOCH:
        t = project_trial(label, [*overrides, "device=cuda"], data_root, epochs=1, test_each_epoch=False)
        epochs = common.compose(overrides)[1].trainer.epochs
        rows.append([label, f"auto ({t.precision})", "1 x 1", "", secs(t.train_seconds), f"{t.throughput:,.0f}", ""])
        summary.append(
            f"{label}: one epoch {secs(t.train_seconds)} -> its {epochs} epochs about "
            f"{t.train_seconds * epochs / 60:.1f} min"
        )
        say(summary[-1])

    out = ["## On a CUDA GPU: precision auto, and the presets bf16 against fp32", ""]
    out += common.header(common.command_line("benchmarks.gpu", args.argv))
    out += [
        f"`trainer.precision=auto` on this GPU resolves to **{auto}**. The optimizer a run builds, against torch's "
        f"own class on the GPU (4 steps): " + "; ".join(checks) + f". `torch._dynamo` imported: {dynamo}.",
        "",
        common.table(
            ["preset", "precision", "seeds x epochs", "test accuracy", "training (median)", "samples/s", "to 98%"],
            rows,
        ),
        "",
        *[f"- {line}" for line in summary],
        "",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--seeds", type=int, default=3)

    return common.block_main("gpu", __doc__, options, run_bench, argv)


if __name__ == "__main__":
    sys.exit(main())
