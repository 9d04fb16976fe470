"""Benchmarks of sweeps: writes docs/BENCHMARKS-sweeps.md.

    python -m benchmarks.sweeps [--data-root ../shared/datasets/mnist] [--repeats 2]

Every figure comes from real `python train.py -m ...` commands, each on a fresh SQLite store, read back
through MlflowClient:

* per-trial fixed cost of a sequential sweep: the time from one trial's MLflow run start to the next's, minus
  the epochs themselves (``train_time_s``) - i.e. Hydra's job set-up, loading the cached data, building the
  model, every MLflow call, the test-set evaluation, the artifacts;
* MLflow's share of a trial: a sequential sweep with wall-clock timers around every MLflow call of the tracking
  layer (``mnist_sweep/tracking.py`` and the trial's MLflow calls in ``mnist_sweep/trial.py``), divided by the
  trials' time;
* 2 trials at a time (``hydra/launcher=joblib hydra.launcher.n_jobs=2``) against the same sweep run
  sequentially, back to back and alternating, as a throughput ratio (timings on a shared machine swing 2x:
  only ratios measured side by side mean anything);
* the 6-trial, 2-at-a-time sweep on a fresh store: trials FINISHED and per-epoch metrics present.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common

REPO = common.REPO
OUT = common.DOCS / "BENCHMARKS-sweeps.md"
GRID = ("model.hidden=64,128,256", "seed=0,1")  # 6 small models (hidden <= 256)
EPOCHS = 5  # the default trainer.epochs
PER_EPOCH = ("train/loss", "train/acc", "val/loss", "val/acc", "lr", "epoch_time_s")

# What the timed sweep wraps in wall-clock timers: (module of mnist_sweep, attribute, kind). Kinds: "mlflow"
# (every MLflow call a trial makes), "rest" (the other parts of a trial), "sweep" (the sweep's own start and
# finish in the launching process: paid once per sweep, so what runs inside them is not counted).
# Only public names; tests/test_benchmarks.py checks that each still exists.
TIMED_CALLS = (
    ("tracking", "prepare", "mlflow"),
    ("tracking", "git_state", "mlflow"),
    ("tracking", "version_tags", "mlflow"),
    ("tracking", "Run.log_params", "mlflow"),
    ("tracking", "Run.log_metrics", "mlflow"),
    ("tracking", "Run.set_tags", "mlflow"),
    ("tracking", "Run.log_artifact", "mlflow"),
    ("tracking", "Run.log_artifacts", "mlflow"),
    ("tracking", "Run.log_model", "mlflow"),
    ("trial", "join", "mlflow"),
    ("trial", "previous_result", "mlflow"),
    ("trial", "record", "mlflow"),
    ("sweep", "start", "sweep"),
    ("sweep", "finish", "sweep"),
    ("training", "fit", "rest"),
    ("training", "evaluate", "rest"),
    ("data", "build_loaders", "rest"),
    ("run", "notebook", "rest"),
)
PARTS = {
    "fit": "epochs (training + validation)",
    "evaluate": "test-set evaluation",
    "build_loaders": "data from the cache (build_loaders)",
    "notebook": "the lab notebook (run.notebook): local artifacts and their upload (also in the MLflow row)",
    "load_sweep_config": "Hydra: composing the job's config (twice: checked up front, then launched)",
}


def resolve(module: str, name: str):
    """(owner, attribute) of ``mnist_sweep.MODULE`` for ``name`` ("f" or "Class.method"); raises if gone."""
    import importlib

    owner = importlib.import_module(f"mnist_sweep.{module}")
    *path, attr = name.split(".")
    for part in path:
        owner = getattr(owner, part)
    if not callable(getattr(owner, attr, None)):
        raise AttributeError(f"benchmarks.sweeps times mnist_sweep.{module}.{name}, which no longer exists")
    return owner, attr


# A sweep run in-process (train.py's @hydra.main function, not the CLI wrapper, whose fast exit would lose the
# figures) with wall-clock timers around the calls of TIMED_CALLS. The logging of the best trial's model happens
# once per sweep, inside finish: recorded on its own.
TIMED = r"""
import contextlib, json, sys, time
sys.path.insert(0, sys.argv[1])
out, calls = sys.argv[2], json.loads(sys.argv[3])
sys.argv = ["train.py", *sys.argv[4:]]
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from benchmarks.sweeps import resolve
from mnist_sweep import sweep, tracking

T, state = {}, {"sweep_level": 0, "in_fit": 0}

def add(kind, name, t0):
    if not state["sweep_level"]:
        key = f"{kind}:{name}"
        T[key] = T.get(key, 0.0) + time.perf_counter() - t0

def timed(owner, name, kind, flag=None):
    f = getattr(owner, name)
    def wrapper(*a, **k):
        if kind == "rest" and name == "evaluate" and state["in_fit"]:
            return f(*a, **k)  # validation inside fit: already counted as fit
        if flag:
            state[flag] += 1
        t0 = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            if flag:
                state[flag] -= 1
            if flag != "sweep_level":
                add(kind, name, t0)
    setattr(owner, name, wrapper)

for module, name, kind in calls:
    owner, attr = resolve(module, name)
    flag = {"sweep": "sweep_level", "fit": "in_fit"}.get(kind if kind == "sweep" else attr)
    timed(owner, attr, kind, flag=flag)
timed(ConfigLoaderImpl, "load_sweep_config", "rest")
original = tracking.start_run

@contextlib.contextmanager
def start_run(*a, **k):
    cm = original(*a, **k)
    t0 = time.perf_counter()
    run = cm.__enter__()
    add("mlflow", "start_run", t0)
    try:
        yield run
    except BaseException:
        t0 = time.perf_counter()
        swallowed = cm.__exit__(*sys.exc_info())
        add("mlflow", "start_run", t0)
        if not swallowed:
            raise
    else:
        t0 = time.perf_counter()
        cm.__exit__(None, None, None)
        add("mlflow", "start_run", t0)

tracking.start_run = start_run
best_model = sweep.log_best_model

def log_best_model(*a, **k):
    t0 = time.perf_counter()
    try:
        return best_model(*a, **k)
    finally:
        T["once:log_best_model"] = T.get("once:log_best_model", 0.0) + time.perf_counter() - t0

sweep.log_best_model = log_best_model
import train
train.main()
json.dump(T, open(out, "w"))
"""


def _sweep(workdir: Path, args: list[str], shared: list[str], timings: Path | None = None) -> float:
    if timings is None:
        cmd = [sys.executable, str(REPO / "train.py"), "-m", *args, *shared]
    else:
        calls = json.dumps(TIMED_CALLS)
        cmd = [sys.executable, "-c", TIMED, str(REPO), str(timings), calls, "--config-path", str(REPO / "conf"), "-m"]
        cmd += [*args, *shared]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"benchmark sweep failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    return wall


def _runs(workdir: Path):
    from mlflow import MlflowClient

    from mnist_sweep import trial

    client = MlflowClient(f"sqlite:///{workdir}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("mnist-sweep")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    trials = sorted((r for r in runs if r.data.tags.get(trial.ROLE) != "sweep"), key=lambda r: r.info.start_time)
    return client, trials


def fixed_cost(workdir: Path) -> tuple[float, float]:
    """Mean per-trial cycle (run start to next run start) and the part of it that is not the epochs."""
    _, trials = _runs(workdir)
    cycles = [(b.info.start_time - a.info.start_time) / 1000 for a, b in zip(trials, trials[1:], strict=False)]
    epochs = [t.data.metrics["train_time_s"] for t in trials[:-1]]
    return statistics.fmean(cycles), statistics.fmean(c - e for c, e in zip(cycles, epochs, strict=True))


def span(workdir: Path) -> float:
    """From the first trial's start to the last trial's end: the sweep without the command's start-up
    (imports; for joblib also starting the worker processes, paid once per sweep)."""
    _, trials = _runs(workdir)
    return (max(t.info.end_time for t in trials) - min(t.info.start_time for t in trials)) / 1000


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


# One training job of the sweep's largest model (2 epochs, no MLflow), in a fresh process with N threads:
# prints its training throughput (samples/s of the last epoch).
THROUGHPUT = r"""
import json, sys
import torch
torch.set_num_threads(int(sys.argv[1]))
sys.path.insert(0, sys.argv[4])
from benchmarks import speed
t = speed.project_trial("x", ["model.hidden=256", f"data.cache_dir={sys.argv[3]}"], sys.argv[2], epochs=2,
                        test_each_epoch=False)
print(json.dumps(t.samples_per_s[-1]))
"""


def thread_scaling(data_root: str, cache: Path) -> dict[str, float]:
    """The machine's own ceiling for 2 trials at once: samples/s of one job with 2 threads (how a sequential
    sweep runs), of one with 1 thread, and of two 1-thread jobs running at the same time (their sum)."""

    def start(threads: int) -> subprocess.Popen:
        args = [sys.executable, "-c", THROUGHPUT, str(threads), data_root, str(cache), str(REPO)]
        return subprocess.Popen(args, stdout=subprocess.PIPE, text=True)

    def result(proc: subprocess.Popen) -> float:
        out, _ = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            raise SystemExit("thread-scaling job failed")
        return float(out.strip().splitlines()[-1])

    two_threads = result(start(2))
    one_thread = result(start(1))
    pair = [start(1), start(1)]
    together = sum(result(p) for p in pair)
    return {"2 threads": two_threads, "1 thread": one_thread, "2 x 1 thread at once": together}


def logging_share(timings: Path, workdir: Path) -> tuple[float, float, dict[str, float], dict[str, float], float]:
    """Seconds per trial in MLflow calls, their share of a trial, the split by call, the other parts, and the
    once-per-sweep logging of the best trial's model."""
    figures = json.loads(timings.read_text())
    _, trials = _runs(workdir)
    n = len(trials)
    # A trial also spends time before its MLflow run starts (job set-up, data): take the whole cycle.
    cycle = (max(t.info.end_time for t in trials) - min(t.info.start_time for t in trials)) / 1000 / n
    split = {k.split(":", 1)[1]: v / n for k, v in figures.items() if k.startswith("mlflow:")}
    parts = {PARTS[k.split(":", 1)[1]]: v / n for k, v in figures.items() if k.startswith("rest:")}
    per_trial = sum(split.values())
    parts["MLflow (all calls above)"] = per_trial
    parts["a whole trial (first trial's start to the last one's end, per trial)"] = cycle
    once = figures.get("once:log_best_model", 0.0)
    return per_trial, per_trial / cycle, dict(sorted(split.items(), key=lambda kv: -kv[1])), parts, once


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=common.default_data_root())
    parser.add_argument("--repeats", type=int, default=2, help="alternating sequential/parallel pairs")
    parser.add_argument("--out", default=str(OUT))
    a = parser.parse_args(argv)

    base = Path(tempfile.mkdtemp(prefix="bench-sweeps-"))
    cache = base / "cache"
    shared = [f"data.root={a.data_root}", f"data.cache_dir={cache}", "trainer.progress=false"]
    small = [*GRID, f"trainer.epochs={EPOCHS}", "mlflow.log_model=false"]
    n = 6

    print("warm-up: decoding the dataset into the cache once", flush=True)
    (base / "warmup").mkdir()
    _sweep(base / "warmup", ["model.hidden=16", "trainer.epochs=1", "mlflow.log_model=false"], shared)

    seq_walls, par_walls, fixed, cycles, completeness = [], [], [], [], []
    spans: dict[str, list[float]] = {"sequential": [], "parallel": []}
    for i in range(a.repeats):
        for mode in ("sequential", "parallel"):
            work = base / f"{mode}{i}"
            work.mkdir()
            extra = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"] if mode == "parallel" else []
            wall = _sweep(work, [*extra, *small], shared)
            spans[mode].append(span(work))
            print(f"{mode} #{i + 1}: {n} trials in {wall:.1f} s ({spans[mode][-1]:.1f} s of trials)", flush=True)
            if mode == "sequential":
                seq_walls.append(wall)
                c, f = fixed_cost(work)
                cycles.append(c)
                fixed.append(f)
            else:
                par_walls.append(wall)
                completeness.append(complete(work, n))

    print("the machine's ceiling: one job with 2 threads vs two 1-thread jobs at once", flush=True)
    scaling = thread_scaling(a.data_root, cache)
    ceiling = scaling["2 x 1 thread at once"] / scaling["2 threads"]

    print("timing the MLflow calls of a sequential sweep at the defaults (5 epochs)", flush=True)
    timed_dir = base / "timed"
    timed_dir.mkdir()
    timings = base / "timings.json"
    _sweep(timed_dir, ["model.hidden=64,128,256"], shared, timings=timings)
    per_trial, share, split, parts, best_model_s = logging_share(timings, timed_dir)

    ratios = [s / p for s, p in zip(seq_walls, par_walls, strict=True)]
    ratio = statistics.fmean(ratios)
    steady = [s / p for s, p in zip(spans["sequential"], spans["parallel"], strict=True)]
    fixed_s = statistics.fmean(fixed)
    finished_ok = all(f == t == n and ok for f, t, ok in completeness)
    command = common.command_line("benchmarks.sweeps", argv)

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    lines = [
        "# Sweep benchmarks",
        "",
        f"Generated by `{command}` (data from `{a.data_root}`), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        f"- Machine: {common.machine()}",
        f"- Versions: {common.versions_line()}",
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
        f"{per_trial / share:.2f} s trial; once per sweep, logging the best trial's model: {best_model_s:.2f} s) "
        f"| {verdict(share <= 0.05)} |",
        f"| 2 parallel trials on 2 cores ≥ 1.3× sequential throughput (hidden ≤ 256) | whole command "
        f"{ratio:.2f}×; trials alone (first start to last end) {statistics.fmean(steady):.2f}× "
        f"(pairs: {', '.join(f'{r:.2f}/{q:.2f}' for r, q in zip(ratios, steady, strict=True))}; sequential "
        f"{', '.join(f'{w:.1f}' for w in seq_walls)} s, parallel {', '.join(f'{w:.1f}' for w in par_walls)} s) "
        f"| {verdict(ratio >= 1.3)} (command), {verdict(statistics.fmean(steady) >= 1.3)} (trials) |",
        "| (the machine's ceiling for that ratio: two 1-thread training jobs at once vs one 2-thread job, "
        "`model.hidden=256`) | "
        f"{ceiling:.2f}× ({', '.join(f'{k}: {v:,.0f} samples/s' for k, v in scaling.items())}) | |",
        "| 6-trial sweep, 2 at a time, fresh store: 6/6 FINISHED, all per-epoch metrics | "
        + "; ".join(f"{f}/{t} FINISHED, metrics {'complete' if ok else 'MISSING'}" for f, t, ok in completeness)
        + f" | {verdict(finished_ok)} |",
        "",
        "MLflow time per trial, by call (wall-clock timers around each call; sequential sweep "
        "`model.hidden=64,128,256` at the defaults: 5 epochs, `mlflow.sweep_models=best`):",
        "",
        "| call | seconds per trial |",
        "| --- | --- |",
        *(f"| `{k}` | {v:.3f} |" for k, v in split.items()),
        "",
        "Where a trial's time goes (same sweep, seconds per trial):",
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
        "Where a target is missed, the time goes to: (1) the fixed cost - Hydra composing each job's config, the "
        "first trial's data load (later trials in the same process reuse the prepared tensors), MLflow and "
        "the local artifacts (the tables above give each part); (2) MLflow: trials of a sweep log metrics, "
        "params, tags and artifacts, and only the best trial's model is logged, once, when the sweep ends "
        "(`mlflow.sweep_models=best`: `log_model` is slow the first time in a process - MLflow maps the files of "
        "every installed package to check the model's requirements - and `mlflow.sweep_models=all` pays it in "
        "every trial process and a fraction of it in every trial); "
        "(3) joblib's worker processes start fresh interpreters "
        "that import torch and MLflow once per sweep (the gap between the whole command and the trials alone); "
        "over the trials themselves 2 parallel jobs give "
        f"{statistics.fmean(steady):.2f}x, so the longer the sweep, the closer the command gets to that; "
        "(4) the ceiling: one trial already keeps both cores busy (one job with 2 threads runs "
        f"{scaling['2 threads'] / scaling['1 thread']:.2f}x as fast as with 1), so two 1-thread trials at once "
        f"can only reach {ceiling:.2f}x of it on this machine, whatever the launcher does.",
        "",
    ]
    common.write_report(a.out, "\n".join(lines))


if __name__ == "__main__":
    main()
