"""Subnormal floats on the CPU: the same training run with and without ``device.flush_denormal``, side by side.

    python -m benchmarks.denormal --epochs 30   # writes the "denormal" block of docs/BENCHMARKS.md (~12 min)

Two ``python train.py`` processes start together, one thread each (so on a 2-core machine each has a core), with
the same preset, seed and schedule; the only difference is ``device.flush_denormal=false`` / ``true``. Each
prints its per-epoch time; after ``--epochs`` epochs both are stopped (SIGTERM: the run is closed as KILLED in
its own throw-away MLflow store). Reported: epoch times in blocks, their ratio, and the validation accuracy of
each epoch, which shows whether flushing changed the numbers the run computes.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common

REPO = common.REPO
SILENCE = 900  # seconds without a line from either run before they count as stuck
EPOCH_LINE = re.compile(r"epoch (\d+)/\d+ .*\| val loss [\d.]+ acc ([\d.]+) \|.*\| ([\d.]+) s,")


def start(flush: bool, a, store: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "train.py",
        f"experiment={a.preset}",
        f"trainer.epochs={a.schedule_epochs}",
        f"seed={a.seed}",
        "device=cpu",
        "device.threads=1",
        f"device.flush_denormal={str(flush).lower()}",
        f"data.root={a.data_root}",
        f"mlflow.tracking_uri=sqlite:///{store}/flush-{flush}.db",
        "mlflow.experiment=bench-denormal",
        f"hydra.run.dir={store}/run-{flush}",
        *a.override,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def follow(procs: dict[bool, subprocess.Popen], epochs: int) -> dict[bool, dict[int, tuple[float, float]]]:
    """Read both runs' epoch lines until each has ``epochs`` of them (or ends), then stop them."""
    import selectors

    seen: dict[bool, dict[int, tuple[float, float]]] = {k: {} for k in procs}
    tails: dict[bool, list[str]] = {k: [] for k in procs}
    sel = selectors.DefaultSelector()
    for k, p in procs.items():
        sel.register(p.stdout, selectors.EVENT_READ, k)
    open_ = set(procs)
    while open_:
        ready = sel.select(timeout=SILENCE)
        if not ready:  # neither run printed anything for that long: stuck, not slow
            for proc in procs.values():
                proc.kill()
            raise SystemExit(f"benchmarks.denormal: no output from the runs for {SILENCE} s")
        for key, _ in ready:
            k = key.data
            line = key.fileobj.readline()
            if not line:
                sel.unregister(key.fileobj)
                open_.discard(k)
                continue
            tails[k] = (tails[k] + [line])[-20:]
            if m := EPOCH_LINE.search(line):
                seen[k][int(m[1])] = (float(m[3]), float(m[2]))
                if len(seen[k]) >= epochs and procs[k].poll() is None:
                    procs[k].send_signal(signal.SIGTERM)
    for k, p in procs.items():
        p.wait(timeout=120)  # SIGTERM closes the MLflow run and exits within seconds
        if len(seen[k]) < epochs:
            raise SystemExit(f"benchmarks.denormal: the flush_denormal={k} run stopped early:\n{''.join(tails[k])}")
    return seen


def markdown(a, command: str, seen, wall: float) -> str:
    lines = [
        "## Subnormal floats: `device.flush_denormal`",
        "",
        *common.header(command),
        f"Two `python train.py experiment={a.preset} trainer.epochs={a.schedule_epochs} seed={a.seed} device=cpu "
        "device.threads=1` runs started together (one core each), differing only in `device.flush_denormal`; "
        f"both stopped after {a.epochs} epochs ({wall:.0f} s wall).",
        "",
        "| epochs | s/epoch, flush off | s/epoch, flush on | off / on |",
        "| --- | --- | --- | --- |",
    ]
    for lo in range(1, a.epochs + 1, a.block):
        hi = min(lo + a.block - 1, a.epochs)
        off = statistics.fmean(seen[False][e][0] for e in range(lo, hi + 1))
        on = statistics.fmean(seen[True][e][0] for e in range(lo, hi + 1))
        lines.append(f"| {lo}-{hi} | {off:.2f} | {on:.2f} | {off / on:.2f} |")
    total_off = sum(seen[False][e][0] for e in range(1, a.epochs + 1))
    total_on = sum(seen[True][e][0] for e in range(1, a.epochs + 1))
    same = sum(seen[False][e][1] == seen[True][e][1] for e in range(1, a.epochs + 1))
    lines += [
        f"| all {a.epochs} | {total_off / a.epochs:.2f} | {total_on / a.epochs:.2f} | {total_off / total_on:.2f} |",
        "",
        f"**With flushing the {a.epochs} epochs took {total_on:.0f} s instead of {total_off:.0f} s "
        f"({total_off / total_on:.2f}x faster).** The validation accuracy after each epoch was identical in "
        f"{same} of {a.epochs} epochs (last epoch: {seen[False][a.epochs][1]:.4f} off, "
        f"{seen[True][a.epochs][1]:.4f} on).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=common.default_data_root())
    parser.add_argument("--preset", default="best")
    parser.add_argument("--schedule-epochs", type=int, default=120, help="trainer.epochs: the schedule's length")
    parser.add_argument("--epochs", type=int, default=40, help="epochs to time before both runs are stopped")
    parser.add_argument("--block", type=int, default=5, help="epochs per row of the table")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--override", action="append", default=[], help="one more train.py override (repeatable)")
    parser.add_argument("--out", default=str(common.BENCHMARKS_MD), help="markdown file: its 'denormal' block")
    a = parser.parse_args(argv)
    command = common.command_line("benchmarks.denormal", argv)
    with tempfile.TemporaryDirectory(prefix="bench-denormal-") as tmp:
        t0 = time.perf_counter()
        seen = follow({flush: start(flush, a, Path(tmp)) for flush in (False, True)}, a.epochs)
        wall = time.perf_counter() - t0
    common.write_report(a.out, markdown(a, command, seen, wall), block="denormal")
    return 0


if __name__ == "__main__":
    sys.exit(main())
