"""The accuracy presets on both kinds of CPU: a few epochs of each, with this CPU's instruction set and held to AVX2.

    python -m benchmarks.presets                  # writes the "presets" block of docs/BENCHMARKS.md
    python -m benchmarks.presets --epochs 1 --presets best --out /tmp/p.md    # a quick look
    python -m benchmarks.presets --epochs 1 --whole avx2       # and each preset's whole training, held to AVX2

``experiment=best`` and ``experiment=best_aug`` train for 20 minutes and more; this measures the seconds of training
per epoch of each (``python train.py experiment=X trainer.epochs=N``, the time it prints, start-up excluded), once as
the CPU is and once with oneDNN and torch's kernels held to AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2
ATEN_CPU_CAPABILITY=avx2``: a stand-in for an AVX2-only CPU, where ``trainer.precision=auto`` picks fp32), in turns,
and projects the preset's whole training time as per-epoch time x its epochs. A projection, said as one: the
one-cycle schedule and augmentation cost the same in every epoch, so the first epochs stand for the rest.
``--whole KIND`` also trains each preset to its end on that kind, one seed, and reports the time and test accuracy
measured.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import common
from benchmarks.speed import AVX2_ENV

REPO = common.REPO
KINDS = ("native", "avx2")


def train_seconds(preset: str, epochs: int, kind: str, data_root: str, work: Path) -> tuple[float, str, float]:
    """Training seconds of ``epochs`` epochs of ``preset``, the precision the run picked and its test accuracy."""
    env = {**os.environ, **(AVX2_ENV if kind == "avx2" else {})}
    cmd = [
        sys.executable, str(REPO / "train.py"), f"experiment={preset}", f"trainer.epochs={epochs}",
        f"data.root={data_root}", "mlflow.log_model=false", f"mlflow.tracking_uri=sqlite:///{work}/mlflow.db",
        f"hydra.run.dir={work}/{preset}-{kind}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=7200, cwd=work)
    out = proc.stdout + proc.stderr
    result = re.search(r"test/acc ([\d.]+)\s+\(([\d.]+) s training\)", out)
    precision = re.search(r"precision: (\w+)", out)
    if proc.returncode != 0 or result is None:
        raise RuntimeError(f"{' '.join(cmd[2:4])} failed ({proc.returncode}): {out.strip()[-800:]}")
    return float(result.group(2)), precision.group(1) if precision else "?", float(result.group(1))


def preset_epochs(preset: str) -> int:
    _, settings = common.compose([f"experiment={preset}"])
    return settings.trainer.epochs


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.presets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=common.default_data_root())
    parser.add_argument("--presets", nargs="+", default=["best", "best_aug"])
    parser.add_argument("--epochs", type=int, default=2, help="epochs timed per preset and kind")
    parser.add_argument("--whole", nargs="*", choices=KINDS, default=[], help="kinds to train each preset to its end")
    parser.add_argument("--out", default=str(common.BENCHMARKS_MD), help="markdown file: its 'presets' block")
    args = parser.parse_args(argv)
    data_root = str(Path(args.data_root).resolve())  # the runs start in a scratch folder

    rows = []
    with tempfile.TemporaryDirectory(prefix="mnist-sweep-presets-") as tmp:
        for preset in args.presets:
            full = preset_epochs(preset)
            measured = {}
            for kind in KINDS:  # in turns, so a slow spell of a shared machine hits both alike
                print(f"{preset}, {kind}: {args.epochs} epoch(s)...", file=sys.stderr, flush=True)
                measured[kind] = train_seconds(preset, args.epochs, kind, data_root, Path(tmp))
            per_epoch = {kind: seconds / args.epochs for kind, (seconds, _, _) in measured.items()}
            whole = {}
            for kind in args.whole:
                print(f"{preset}, {kind}: all {full} epochs...", file=sys.stderr, flush=True)
                whole[kind] = train_seconds(preset, full, kind, data_root, Path(tmp))
            for kind in KINDS:
                seconds, _, acc = whole.get(kind, (None, None, None))
                rows.append(
                    [
                        f"`{preset}` ({full} epochs)",
                        "this CPU" if kind == "native" else "held to AVX2",
                        measured[kind][1],
                        f"{per_epoch[kind]:.1f} s",
                        f"{per_epoch[kind] * full / 60:.0f} min",
                        f"{per_epoch[kind] / per_epoch['native']:.1f}×",
                        f"{seconds / 60:.1f} min ({seconds:.0f} s), {acc:.2%}" if seconds is not None else "",
                    ]
                )
    ratio = statistics.mean(float(r[5].rstrip("×")) for r in rows if r[1] != "this CPU")
    text = "\n".join(
        [
            "## The accuracy presets on both kinds of CPU",
            "",
            *common.header(common.command_line("benchmarks.presets", argv)),
            f"Each preset trained {args.epochs} epoch(s) per kind; the whole training time is projected as "
            'per-epoch time × the preset\'s epochs (start-up and the final test excluded). "Held to AVX2": '
            "`ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2` on the same CPU, a stand-in for an AVX2-only one "
            "(its cores, caches and clock are this CPU's)."
            + (" The last column: the preset trained to its end, seed 0, one run per kind." if args.whole else ""),
            "",
            common.table(
                [
                    "preset",
                    "instruction set",
                    "precision (auto)",
                    "training per epoch",
                    "projected whole",
                    "vs this CPU",
                    "whole, measured (test accuracy)",
                ],
                rows,
            ),  # fmt: skip
            "",
            f"Held to AVX2, an epoch takes {ratio:.1f}× as long on average over these presets.",
        ]
    )
    common.write_report(args.out, text, block="presets")
    return 0


if __name__ == "__main__":
    sys.exit(main())
