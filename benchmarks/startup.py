"""What a run costs beyond its training, and a whole 3-epoch trial against lightning-hydra-template's.

    python -m benchmarks.startup                                  # writes the "startup" block of docs/BENCHMARKS.md
    python -m benchmarks.startup --template ../lightning-hydra-template   # adds the template, side by side

Every process is started the way a user starts it and timed from outside (wall clock, start-up, MLflow logging
and exit included), in turns - import torch, this project, the template, again - so a slow spell of a shared
machine hits all of them alike; the report gives medians and ratios.

* ``python -c "import torch"``: the floor every PyTorch program pays before it does anything.
* the floor of any run that logs to MLflow in its own process: ``import torch, hydra, mlflow`` and the SQLite
  store opened, nothing else (``FLOOR``).
* ``python train.py trainer.epochs=3``: this project's default net for 3 epochs, logged to a fresh SQLite store.
  Its overhead is the wall time minus the training time it prints: start-up, data loading, MLflow, model logging.
* lightning-hydra-template (``--template DIR``, a checkout of github.com/ashleve/lightning-hydra-template):
  ``python src/train.py trainer=cpu trainer.max_epochs=3 logger=mlflow``, its SimpleDenseNet on the CPU with its
  MLflow logger, fit then test. It runs in its own environment (``--template-python``, a venv with
  ``pip install torch torchvision lightning torchmetrics rootutils rich hydra-colorlog hydra-core==1.3.2 mlflow``:
  mlflow.pytorch imports Lightning where it is installed, which would slow this project's runs down too),
  ``MLFLOW_ALLOW_FILE_STORE=true`` (its logger writes a plain folder store) and the uncompressed IDX files in its
  ``data/MNIST/raw/`` (made here from ``--data-root``). Its test step reloads the best checkpoint with
  ``torch.load``, which refuses Lightning's checkpoint under torch >= 2.6's ``weights_only=True`` default: the
  benchmark sets torch's own switch ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` for that process, so the template runs
  to its end unchanged.
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common

REPO = common.REPO
SKIP = (".git", "logs", "data")  # the template's own top-level folders that a fresh copy starts without
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def timed(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> tuple[float, str]:
    """Wall seconds of one process, and what it printed; a failure stops the benchmark with its last lines."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    return wall, proc.stdout + proc.stderr


def python_c(env: dict[str, str], cwd: Path, code: str = "import torch") -> dict:
    """Wall seconds of `python -c CODE`."""
    wall, _ = timed([sys.executable, "-c", code], cwd, env)
    return {"wall": wall}


def project_trial(data_root: Path, cwd: Path, env: dict[str, str], epochs: int) -> dict:
    """``python train.py trainer.epochs=N`` in ``cwd``, whose SQLite store the warm-up run created (a user's
    first run creates it once: a second or more, see docs/BENCHMARKS-sweeps.md)."""
    work = cwd
    cmd = [sys.executable, str(REPO / "train.py"), f"data.root={data_root}", f"trainer.epochs={epochs}"]
    wall, text = timed(cmd, work, env)
    m = re.search(r"test/acc ([\d.]+)\s+\(([\d.]+) s training\)", text)
    if m is None:
        raise RuntimeError(f"train.py printed no result line: {text[-500:]}")
    return {"wall": wall, "train_s": float(m.group(2)), "test_acc": float(m.group(1))}


# The imports that make a run's start-up (torchvision and torch._dynamo: none, since a default run needs neither)
WATCHED = ("torch", "mlflow", "mlflow.store.tracking.sqlalchemy_store", "hydra", "torchvision", "torch._dynamo")


def import_seconds(stderr: str) -> tuple[dict[str, float], float]:
    """From ``python -X importtime``'s trace: the seconds of each ``WATCHED`` module's import (its own line, with
    everything it imported), and of all imports together (the top-level lines: made by the program or by a
    function, not inside another import)."""
    found, total = {}, 0.0
    for line in stderr.splitlines():
        if not line.startswith("import time:") or line.count("|") != 2:
            continue
        _, cumulative, name = line.split("|")
        if not cumulative.strip().isdigit():  # the header line
            continue
        seconds = int(cumulative) / 1e6
        if name.strip() in WATCHED:
            found[name.strip()] = seconds
        if not name.startswith("  "):
            total += seconds
    return found, total


def import_breakdown(data_root: Path, cwd: Path, env: dict[str, str], epochs: int) -> list[str]:
    """One more ``python train.py`` under Python's import timer: what its imports cost."""
    cmd = [sys.executable, "-X", "importtime", str(REPO / "train.py"), f"data.root={data_root}"]
    _, text = timed([*cmd, f"trainer.epochs={epochs}"], cwd, env)
    found, total = import_seconds(text)
    named = ", ".join(f"`{m}` {found[m]:.2f} s" for m in WATCHED if m in found)
    missing = " and ".join(f"`{m}`" for m in WATCHED if m not in found)
    return [
        f"Imports of one such run (`python -X importtime train.py ...`; the timer slows them a little): "
        f"{total:.2f} s in all; {named} (the store's module is imported when the store is opened)"
        + (f"; {missing} not imported." if missing else "."),
        "",
    ]


# What MLflow costs a run before its first write: the package and the SQLite store (imported when it is opened)
OPEN_STORE = (
    "import mlflow; from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore; "
    "SqlAlchemyStore('sqlite:///mlruns/mlflow.db', 'mlruns/artifacts')"
)
# The least a run pays that imports what it must (torch, Hydra, MLflow) and opens its store, doing nothing else
FLOOR = "import torch, hydra; " + OPEN_STORE


def overlap(cwd: Path, env: dict[str, str]) -> dict:
    """``import torch`` and MLflow's import with the store's opening, in two processes one after the other and
    then side by side: how much of MLflow's start-up a second process could hide behind torch's on this machine."""
    torch_s, mlflow_s = python_c(env, cwd)["wall"], python_c(env, cwd, OPEN_STORE)["wall"]
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=cwd, env=env) for code in ("import torch", OPEN_STORE)]
    if any(p.wait(timeout=300) for p in procs):
        raise RuntimeError("import torch or opening the MLflow store failed")
    return {"torch": torch_s, "mlflow": mlflow_s, "apart": torch_s + mlflow_s, "together": time.perf_counter() - t0}


def prepare_template(template: Path, data_root: Path, cwd: Path) -> Path:
    """A copy of the template with MNIST where its datamodule looks (uncompressed, data/MNIST/raw/)."""
    work = cwd / "template"
    top = Path(template)
    shutil.copytree(template, work, ignore=lambda d, names: [n for n in names if Path(d) == top and n in SKIP])
    raw = work / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in FILES:
        plain, packed = data_root / name, data_root / f"{name}.gz"
        if plain.exists():
            shutil.copy(plain, raw / name)
        else:
            with gzip.open(packed, "rb") as src, open(raw / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
    (work / ".project-root").touch()
    return work


def template_trial(work: Path, python: str, env: dict[str, str], epochs: int) -> dict:
    env = {**env, "MLFLOW_ALLOW_FILE_STORE": "true", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", "PROJECT_ROOT": str(work)}
    cmd = [python, "src/train.py", "trainer=cpu", f"trainer.max_epochs={epochs}", "logger=mlflow"]
    wall, text = timed(cmd, work, env)
    m = re.search(r"test/acc\s*│\s*([\d.]+)", text) or re.search(r"'test/acc': (?:tensor\()?([\d.]+)", text)
    return {"wall": wall, "test_acc": float(m.group(1)) if m else float("nan")}


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def run_bench(args: argparse.Namespace) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    data_root = Path(args.data_root).resolve()
    torch_runs, floor, ours, theirs = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        work = prepare_template(Path(args.template).resolve(), data_root, cwd) if args.template else None
        if work is not None:
            # A first run pays the template's one-time costs (its data, .pyc files).
            template_trial(work, args.template_python, env, 1)
        project_trial(data_root, cwd, env, 1)  # and ours (the decoded-tensor cache, .pyc files)
        for i in range(args.repeats):
            torch_runs.append(python_c(env, cwd))
            floor.append(python_c(env, cwd, FLOOR))
            ours.append(project_trial(data_root, cwd, env, args.epochs))
            if work is not None:
                theirs.append(template_trial(work, args.template_python, env, args.epochs))
            if not args.silent:
                last = f", template {theirs[-1]['wall']:.1f} s" if theirs else ""
                first = f"torch {torch_runs[-1]['wall']:.2f} s, floor {floor[-1]['wall']:.2f} s"
                print(f"round {i + 1}: {first}, ours {ours[-1]['wall']:.1f} s{last}")
        breakdown = import_breakdown(data_root, cwd, env, args.epochs)
        side = [overlap(cwd, env) for _ in range(args.repeats)]  # the store exists: the rounds' runs made it

    t_torch, t_ours, t_train = median(torch_runs, "wall"), median(ours, "wall"), median(ours, "train_s")
    t_floor = median(floor, "wall")
    overhead = [r["wall"] - r["train_s"] for r in ours]
    out = [f"## Start-up and wrap-up: what a run costs beyond its training ({args.repeats} rounds, in turns)", ""]
    out += common.header(common.command_line("benchmarks.startup", args.argv))
    rows = [
        ['`python -c "import torch"`', f"{t_torch:.2f} s", "", ""],
        ["`import torch, hydra, mlflow` and the store opened (`FLOOR`)", f"{t_floor:.2f} s", "", ""],
        [
            f"`python train.py trainer.epochs={args.epochs}`",
            f"{t_ours:.2f} s",
            f"{t_train:.2f} s",
            f"{statistics.median(r['test_acc'] for r in ours):.2%}",
        ],
    ]
    if theirs:
        rows.append(
            [
                f"lightning-hydra-template, `trainer.max_epochs={args.epochs} logger=mlflow`, fit and test",
                f"{median(theirs, 'wall'):.2f} s",
                "",
                f"{statistics.median(r['test_acc'] for r in theirs):.2%}",
            ]
        )
    out += [common.table(["process", "wall (median)", "training", "test accuracy"], rows), ""]
    ratio = statistics.median(overhead) / t_torch
    out += [
        f"Overhead of a run (wall minus training), median: **{statistics.median(overhead):.2f} s = "
        f"{ratio:.2f}x** the time of `import torch` (target ≤ 2x, stretch 1.5x). Per round: "
        + ", ".join(f"{o:.2f} s" for o in overhead)
        + ".",
        "",
        f"The floor alone, the imports a run cannot do without and its store, nothing trained or logged: "
        f"**{t_floor / t_torch:.2f}x** `import torch`; this project's own work adds {t_ours - t_train - t_floor:.2f} s "
        f"to it (data, Hydra's composition, the run's records, the model). "
        + (
            "A run that imports MLflow in its own process cannot reach the 2x target on this machine."
            if t_floor / t_torch > 2
            else ""
        ),
        "",
    ]
    out += breakdown
    apart, together = median(side, "apart"), median(side, "together")
    out += [
        f"MLflow's import and its SQLite store opened, {median(side, 'mlflow'):.2f} s alone, beside `import torch` "
        f"({median(side, 'torch'):.2f} s) in two processes: **{apart:.2f} s one after the other, {together:.2f} s "
        f"side by side** (medians of {len(side)}): what a run could save by opening MLflow in a second process "
        f"while it imports torch, {apart - together:.2f} s, is not built yet.",
        "",
    ]
    if theirs:
        per_round = [t["wall"] / o["wall"] for t, o in zip(theirs, ours, strict=True)]
        out += [
            f"Whole {args.epochs}-epoch trial, lightning-hydra-template / this project: **"
            f"{median(theirs, 'wall') / t_ours:.1f}x** (medians; per round "
            + ", ".join(f"{r:.1f}x" for r in per_round)
            + "; target ≥ 6x). The most a run that imports MLflow in its own process could reach here, the floor "
            f"plus this run's training: {median(theirs, 'wall') / (t_floor + t_train):.1f}x.",
            "",
        ]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--template", help="a checkout of lightning-hydra-template, to time side by side")
        parser.add_argument("--template-python", default=sys.executable, help="the Python of the template's venv")
        parser.add_argument("--epochs", type=int, default=3)
        parser.add_argument("--repeats", type=int, default=3)

    return common.block_main("startup", __doc__, options, run_bench, argv)


if __name__ == "__main__":
    sys.exit(main())
