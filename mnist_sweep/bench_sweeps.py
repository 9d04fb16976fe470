"""Benchmarks of sweeps (issue 3): writes docs/BENCHMARKS-sweeps.md.

    python -m mnist_sweep.bench_sweeps [--data-root ../shared/datasets/mnist] [--repeats 2]

Every figure comes from real `python train.py -m ...` commands, each on a fresh SQLite store, read back
through MlflowClient:

* per-trial fixed cost of a sequential sweep: the time from one trial's MLflow run start to the next's, minus
  the epochs themselves (``train_time_s``) - i.e. Hydra's job set-up, loading the cached data, building the
  model, every MLflow call, the test-set evaluation, the artifacts;
* MLflow's share of a trial: a sequential sweep run under cProfile, summing the time spent in the tracking
  layer (``mnist_sweep/tracking.py`` and the sweep's per-trial MLflow calls), divided by the trials' time;
* 2 trials at a time (``hydra/launcher=joblib hydra.launcher.n_jobs=2``) against the same sweep run
  sequentially, back to back and alternating, as a throughput ratio (timings on a shared machine swing 2x:
  only ratios measured side by side mean anything);
* the 6-trial, 2-at-a-time sweep on a fresh store: trials FINISHED and per-epoch metrics present.
"""

from __future__ import annotations

import argparse
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "docs" / "BENCHMARKS-sweeps.md"
GRID = ("model.hidden=64,128,256", "seed=0,1")  # 6 small models (hidden <= 256)
EPOCHS = 2
PER_EPOCH = ("train/loss", "train/acc", "val/loss", "val/acc", "lr", "epoch_time_s")

# Functions whose time is "MLflow logging" inside a trial (cumulative time; none calls another of the list).
TRACKING = {
    ("tracking.py", "prepare"),
    ("tracking.py", "git_state"),
    ("tracking.py", "version_tags"),
    ("tracking.py", "start_run"),  # a generator: create_run + set_terminated, not the training in its body
    ("tracking.py", "log_params"),
    ("tracking.py", "log_metrics"),
    ("tracking.py", "set_tags"),
    ("tracking.py", "log_artifact"),
    ("tracking.py", "log_artifacts"),
    ("tracking.py", "log_model"),
    ("sweep.py", "begin_trial"),
    ("sweep.py", "previous_result"),
    ("sweep.py", "record"),
}


def _sweep(workdir: Path, args: list[str], common: list[str], profile: Path | None = None) -> float:
    if profile is None:
        cmd = [sys.executable, str(REPO / "train.py"), "-m", *args, *common]
    else:  # train.py's @hydra.main function under cProfile (app.cli's fast exit would lose the profile)
        code = (
            "import cProfile, sys; sys.path.insert(0, sys.argv[1]); sys.argv = ['train.py', *sys.argv[2:]]; "
            f"import train; cProfile.run('train.main()', {str(profile)!r})"
        )
        cmd = [sys.executable, "-c", code, str(REPO), "--config-path", str(REPO / "conf"), "-m", *args, *common]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"benchmark sweep failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    return wall


def _runs(workdir: Path):
    from mlflow import MlflowClient

    from mnist_sweep import sweep

    client = MlflowClient(f"sqlite:///{workdir}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("mnist-sweep")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    trials = sorted((r for r in runs if r.data.tags.get(sweep.ROLE) != "sweep"), key=lambda r: r.info.start_time)
    return client, trials


def fixed_cost(workdir: Path) -> tuple[float, float]:
    """Mean per-trial cycle (run start to next run start) and the part of it that is not the epochs."""
    _, trials = _runs(workdir)
    cycles = [(b.info.start_time - a.info.start_time) / 1000 for a, b in zip(trials, trials[1:], strict=False)]
    epochs = [t.data.metrics["train_time_s"] for t in trials[:-1]]
    return statistics.fmean(cycles), statistics.fmean(c - e for c, e in zip(cycles, epochs, strict=True))


def complete(workdir: Path, n: int) -> tuple[int, int, bool]:
    """(trials FINISHED, trials, every per-epoch metric present at every epoch)."""
    client, trials = _runs(workdir)
    finished = sum(t.info.status == "FINISHED" for t in trials)
    metrics_ok = all(
        [m.step for m in client.get_metric_history(t.info.run_id, key)] == list(range(1, EPOCHS + 1))
        for t in trials
        for key in PER_EPOCH
    )
    return finished, len(trials), metrics_ok and len(trials) == n


def _sweep_level(filename: str, name: str) -> bool:
    return Path(filename).name == "sweep.py" and name in ("start", "finish")


def breakdown(profile: Path, n: int) -> dict[str, float]:
    """Where a sequential trial's time goes (seconds per trial, cProfile), besides MLflow."""
    stats = pstats.Stats(str(profile))
    parts = {
        ("training.py", "fit"): "epochs (fit: training + validation)",
        ("data.py", "build_loaders"): "data from the cache (build_loaders)",
        ("app.py", "_save_artifacts"): "local artifacts (config, CSV, confusion matrix PNG, checkpoint)",
        ("config_loader_impl.py", "load_sweep_config"): "Hydra: composing each job's config",
    }
    out = {}
    for (filename, _, name), (_, _, _, ct, _) in stats.stats.items():
        key = (Path(filename).name, name)
        if key in parts:
            out[parts[key]] = out.get(parts[key], 0.0) + ct / n
    return out


def logging_share(profile: Path, workdir: Path) -> tuple[float, float, dict[str, float]]:
    """Seconds per trial in MLflow calls, their share of a trial, and the split by function."""
    stats = pstats.Stats(str(profile))
    split: dict[str, float] = {}
    for (filename, _, name), (_, _, _, _, callers) in stats.stats.items():
        if (Path(filename).name, name) in TRACKING and "mnist_sweep" in filename:
            # Only what trials call: the sweep's own start (store creation, parent run) is paid once per sweep.
            inside = sum(ct for (f, _, caller), (_, _, _, ct) in callers.items() if not _sweep_level(f, caller))
            split[name] = split.get(name, 0.0) + inside
    _, trials = _runs(workdir)
    n = len(trials)
    trial_time = sum((t.info.end_time - t.info.start_time) / 1000 for t in trials)
    # A trial also spends time before its MLflow run starts (job set-up, data): take the whole cycle.
    first, last = trials[0].info.start_time, trials[-1].info.end_time
    cycle = (last - first) / 1000 / n
    per_trial = sum(split.values()) / n
    return (
        per_trial,
        per_trial / cycle,
        {k: v / n for k, v in sorted(split.items(), key=lambda kv: -kv[1])} | {"_run_time": trial_time / n},
    )


def _machine() -> str:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores visible, {platform.system()} {platform.release()}"


def _versions() -> str:
    import hydra
    import joblib
    import mlflow
    import torch

    return (
        f"Python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"hydra-core {hydra.__version__}, mlflow {mlflow.__version__}, joblib {joblib.__version__}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_root = REPO.parent / "shared" / "datasets" / "mnist"
    parser.add_argument("--data-root", default=str(default_root if default_root.exists() else REPO / "data"))
    parser.add_argument("--repeats", type=int, default=2, help="alternating sequential/parallel pairs")
    parser.add_argument("--out", default=str(OUT))
    a = parser.parse_args(argv)

    base = Path(tempfile.mkdtemp(prefix="bench-sweeps-"))
    cache = base / "cache"
    common = [f"data.root={a.data_root}", f"data.cache_dir={cache}", "trainer.progress=false"]
    small = [*GRID, f"trainer.epochs={EPOCHS}", "mlflow.log_model=false"]
    n = 6

    print("warm-up: decoding the dataset into the cache once", flush=True)
    (base / "warmup").mkdir()
    _sweep(base / "warmup", ["model.hidden=16", "trainer.epochs=1", "mlflow.log_model=false"], common)

    seq_walls, par_walls, fixed, cycles, completeness = [], [], [], [], []
    for i in range(a.repeats):
        for mode in ("sequential", "parallel"):
            work = base / f"{mode}{i}"
            work.mkdir()
            extra = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"] if mode == "parallel" else []
            wall = _sweep(work, [*extra, *small], common)
            print(f"{mode} #{i + 1}: {n} trials in {wall:.1f} s", flush=True)
            if mode == "sequential":
                seq_walls.append(wall)
                c, f = fixed_cost(work)
                cycles.append(c)
                fixed.append(f)
            else:
                par_walls.append(wall)
                completeness.append(complete(work, n))

    print("profiling a sequential sweep (defaults: model logged) for MLflow's share", flush=True)
    prof_dir = base / "profile"
    prof_dir.mkdir()
    profile = base / "sweep.prof"
    _sweep(prof_dir, ["model.hidden=64,128,256", f"trainer.epochs={EPOCHS}"], common, profile=profile)
    per_trial, share, split = logging_share(profile, prof_dir)
    parts = breakdown(profile, 3)
    run_time = split.pop("_run_time")
    model_s = split.get("log_model", 0.0)

    ratios = [s / p for s, p in zip(seq_walls, par_walls, strict=True)]
    ratio = statistics.fmean(ratios)
    fixed_s = statistics.fmean(fixed)
    finished_ok = all(f == t == n and ok for f, t, ok in completeness)
    command = f"python -m mnist_sweep.bench_sweeps --repeats {a.repeats}"

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    lines = [
        "# Sweep benchmarks",
        "",
        f"Generated by `{command}` (data from `{a.data_root}`), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        f"- Machine: {_machine()}",
        f"- Versions: {_versions()}",
        "- Sweep measured: `python train.py -m " + " ".join(small) + "` (6 trials, each on a fresh SQLite store),",
        "  sequential (basic launcher) and `hydra/launcher=joblib hydra.launcher.n_jobs=2`, alternating, "
        f"{a.repeats} pair(s).",
        "- The machine is shared: absolute times swing; the ratios are measured side by side in this one run.",
        "",
        "| target | measured | |",
        "| --- | --- | --- |",
        f"| per-trial fixed cost in a sequential sweep (all but the epochs) ≤ 0.5 s | {fixed_s:.2f} s "
        f"(cycle {statistics.fmean(cycles):.2f} s per trial; runs: {', '.join(f'{x:.2f}' for x in fixed)} s) "
        f"| {verdict(fixed_s <= 0.5)} |",
        f"| MLflow logging ≤ 5% of a trial's time | {share:.1%} ({per_trial:.2f} s of a "
        f"{per_trial / share:.2f} s trial; without `log_model`: "
        f"{(per_trial - model_s) / (per_trial / share - model_s):.1%}) | {verdict(share <= 0.05)} |",
        f"| 2 parallel trials on 2 cores ≥ 1.3× sequential throughput (hidden ≤ 256) | {ratio:.2f}× "
        f"(pairs: {', '.join(f'{r:.2f}' for r in ratios)}; sequential "
        f"{', '.join(f'{w:.1f}' for w in seq_walls)} s, parallel {', '.join(f'{w:.1f}' for w in par_walls)} s) "
        f"| {verdict(ratio >= 1.3)} |",
        "| 6-trial sweep, 2 at a time, fresh store: 6/6 FINISHED, all per-epoch metrics | "
        + "; ".join(f"{f}/{t} FINISHED, metrics {'complete' if ok else 'MISSING'}" for f, t, ok in completeness)
        + f" | {verdict(finished_ok)} |",
        "",
        "MLflow time per trial, by call (cProfile, sequential sweep `model.hidden=64,128,256` with the model logged; "
        f"MLflow run open {run_time:.2f} s per trial):",
        "",
        "| call | seconds per trial |",
        "| --- | --- |",
        *(f"| `{k}` | {v:.3f} |" for k, v in split.items()),
        "",
        "Where the rest of a trial's time goes (same profile, seconds per trial):",
        "",
        "| part | seconds per trial |",
        "| --- | --- |",
        *(f"| {k} | {v:.3f} |" for k, v in parts.items()),
        "",
        "Reading the numbers: the fixed cost is everything a trial does besides its epochs (Hydra job set-up, "
        "loading the decoded dataset from the cache, building the model, MLflow, the test-set evaluation, "
        "artifacts); it is measured from MLflow's run start times of consecutive trials. Parallel trials each get "
        "`torch.set_num_threads(cores // n_jobs)`.",
        "",
    ]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"written: {a.out}")


if __name__ == "__main__":
    main()
