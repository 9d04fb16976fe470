"""Benchmark the search (issue 4): does a budget of N trials find a config close to the best preset, and how
many epochs does pruning save? Writes docs/BENCHMARKS-search.md.

    python -m mnist_sweep.bench_search --data-root ../shared/datasets/mnist \\
        --reference-experiment results --reference-uri sqlite:///mlruns/mlflow.db

Side by side, in one run: the same ``experiment=search`` (same space, same TPE seed, same trial budget and
epochs) launched twice at the same time, once with a pruner (``--pruner``: asha, the search preset's and the
default, median or hyperband) and once with ``pruner=none``. The epochs each spent are counted from the Optuna
study (one intermediate value per epoch a trial ran). The reference is the recipe ``--reference-recipe`` (the ``best``
preset, which like the search uses no augmentation) among the finished runs of ``--reference-experiment``, by
mean validation accuracy over its seeds. Both the search and the reference are judged on validation accuracy,
the only thing either was allowed to look at; test accuracy is shown beside it.

``--report-only`` rewrites the report from the stores a previous run left in ``--workdir``. ``--unpruned-from DIR``
runs only the pruned search and takes the unpruned one from an earlier run's workdir with the same command
(the unpruned search does not depend on the pruner, and is deterministic on a CPU): its study is copied, the
relaunch finds every trial done and only tests the best, and the report says so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "docs" / "BENCHMARKS-search.md"


def _search_command(a, workdir: Path, pruner: str) -> list[str]:
    cmd = [sys.executable, str(REPO / "train.py"), "-m", "experiment=search"]
    cmd += [
        f"hydra.sweeper.n_trials={a.trials}",
        f"hydra.sweeper.n_jobs={a.jobs}",
        f"hydra.sweeper.pruner={pruner}",
        f"hydra.sweeper.study_name=bench-{pruner}",
        f"hydra.sweeper.storage=sqlite:///{workdir}/optuna.db",
        f"hydra.sweeper.preset_dir={workdir}/presets",
        f"hydra.sweeper.best_preset=found_{pruner}",
        f"hydra.sweep.dir={workdir}/multirun/{pruner}",
        f"mlflow.experiment=bench-search-{pruner}",
        f"mlflow.tracking_uri={a.tracking_uri}",
        "mlflow.log_model=false",
        f"trainer.epochs={a.epochs}",
        "trainer.progress=false",
        f"data.root={a.data_root}",
        f"device.type={a.device}",
    ]
    if a.jobs > 1:
        cmd += ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={a.jobs}"]
    return cmd + list(a.override)


def run_searches(a, workdir: Path) -> None:
    """Both searches at once (their times are read back from the studies).

    A search whose trials are all done exits 1 when some of them failed (a trial whose learning rate made it
    diverge): that is an outcome of the search, counted in the report, not a failed benchmark. Each search
    runs to its end whatever the other does.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = {}
    for pruner in (a.pruner, "none"):
        log = open(workdir / f"search-{pruner}.log", "a")  # noqa: SIM115 (closed with the process); a resumed search adds to it
        procs[pruner] = (
            subprocess.Popen(
                _search_command(a, workdir, pruner), cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT
            ),
            log,
        )
    codes = {}
    for pruner, (proc, log) in procs.items():
        codes[pruner] = proc.wait()
        log.close()
    for pruner, rc in codes.items():
        if rc != 0 and _unfinished(workdir, pruner, a.trials):
            tail = (workdir / f"search-{pruner}.log").read_text()[-3000:]
            raise SystemExit(f"the {pruner} search failed (exit {rc}):\n{tail}")


_PER_RUN = ("--pruner", "--workdir", "--out", "--unpruned-from")


def _same_searches(command: str) -> list[str]:
    """The command's words that fix the searches: all but the pruner, where it writes, and --unpruned-from."""
    words, kept = command.split(), []
    for i, word in enumerate(words):
        if word.split("=", 1)[0] in _PER_RUN or (i and words[i - 1] in _PER_RUN):
            continue
        kept.append(word)
    return kept


def copy_unpruned(source: Path, workdir: Path, command: str) -> None:
    """Take the unpruned study of an earlier run of the same command (see the module's docstring)."""
    import optuna

    record = source / "searches.json"
    if not record.exists():
        raise SystemExit(f"--unpruned-from {source}: no searches.json there; give the workdir of an earlier run")
    theirs = json.loads(record.read_text())["command"]
    if _same_searches(theirs) != _same_searches(command):
        raise SystemExit(f"--unpruned-from {source}: it ran other searches:\n  {theirs}\nnot\n  {command}")
    try:
        _load_study(workdir, "none")
        return  # copied by an earlier launch of this command
    except KeyError:
        pass
    optuna.copy_study(
        from_study_name="bench-none",
        from_storage=f"sqlite:///{source}/optuna.db",
        to_storage=f"sqlite:///{workdir}/optuna.db",
    )


def _load_study(workdir: Path, pruner: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=f"bench-{pruner}", storage=f"sqlite:///{workdir}/optuna.db")


def _unfinished(workdir: Path, pruner: str, trials: int) -> bool:
    """True when the study does not exist, has a trial still running (its launch was killed) or fewer than
    ``trials`` finished ones (COMPLETE, PRUNED or FAIL)."""
    try:
        study = _load_study(workdir, pruner)
    except Exception:  # no study at all: the search died before its first trial
        return True
    finished = [t.state.is_finished() for t in study.trials]
    return not all(finished) or sum(finished) < trials


def study_summary(workdir: Path, pruner: str, tracking_uri: str) -> dict:
    import optuna
    from mlflow import MlflowClient

    study = _load_study(workdir, pruner)
    state = optuna.trial.TrialState
    trials = [t for t in study.trials if t.state in (state.COMPLETE, state.PRUNED)]
    # An interrupted trial's end is when the next launch marked it failed: its span would cover the pause.
    timed = [t for t in study.trials if t.datetime_complete and not t.user_attrs.get("interrupted")]
    spans = [(t.datetime_start.timestamp(), t.datetime_complete.timestamp()) for t in timed]
    best = study.best_trial
    # The sweeper runs the chosen config once more with the test set: the only test score of the search.
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(f"bench-search-{pruner}")
    tested = [r for r in client.search_runs([exp.experiment_id]) if "test/acc" in r.data.metrics] if exp else []
    return {
        "trials": len(trials),
        "pruned": sum(t.state == state.PRUNED for t in trials),
        "failed": sum(t.state == state.FAIL and not t.user_attrs.get("interrupted") for t in study.trials),
        "interrupted": sum(bool(t.user_attrs.get("interrupted")) for t in study.trials),
        "unfinished": sum(not t.state.is_finished() for t in study.trials),
        "epochs": sum(len(t.intermediate_values) for t in trials),
        # Time inside the trials, summed (with several trials at a time it exceeds the wall time), and the wall
        # time during which any trial ran: a resumed search's pause between launches is not counted.
        "trial_s": sum(end - start for start, end in spans),
        "wall_s": _covered(spans),
        "best_val": best.value,
        "best_params": best.params,
        "test": tested[0].data.metrics["test/acc"] if tested else float("nan"),
    }


def _label(a, key: str) -> str:
    return "no pruning" if key == "none" else f"{a.pruner} pruner"


def _covered(spans: list[tuple[float, float]]) -> float:
    """The length of the union of the time intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        total += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return total


def reference(tracking_uri: str, experiment: str, recipe: str) -> dict | None:
    """The preset ``recipe`` (its best variant by mean validation accuracy) among the experiment's runs."""
    from mnist_sweep import results

    rows = [r for r in results.collect(tracking_uri, experiment) if r["recipe"] == recipe]
    if not rows:
        return None
    best = max(rows, key=lambda r: statistics.fmean(r["val"]))
    return {**best, "val_mean": statistics.fmean(best["val"]), "test_mean": statistics.fmean(best["test"])}


def _tpe_seed(overrides: list[str]) -> str:
    """The sampler's seed: the last `hydra.sweeper.seed=N` override, else the sweeper's default."""
    seeds = [o.split("=", 1)[1] for o in overrides if o.lstrip("+").startswith("hydra.sweeper.seed=")]
    if seeds:
        return seeds[-1]
    from mnist_sweep.search import OptunaSweeperConf

    return str(OptunaSweeperConf().seed)


def markdown(a, setup: dict, summaries: dict[str, dict], ref: dict | None) -> str:
    pruned, full = summaries[a.pruner], summaries["none"]
    saved = 1 - pruned["epochs"] / full["epochs"] if full["epochs"] else float("nan")
    lines = [
        "# Search benchmark",
        "",
        f"Command: `{setup['command']}`",
        "",
        f"Machine: {setup['machine']}; device {setup['device']}. {setup['versions']}.",
        "",
        f"Both searches: `experiment=search`, {a.trials} trials of at most {a.epochs} epochs, "
        f"TPE seed {_tpe_seed(a.override)}, "
        f"{a.jobs} trial(s) at a time, launched together (side by side). Epochs are counted from the Optuna study.",
        "",
    ]
    if setup.get("unpruned_from"):
        lines += [
            f"The unpruned search was not run again here: its study was copied from `{setup['unpruned_from']}`, "
            "the workdir of the same command with another pruner (`--unpruned-from`). Its relaunch found every "
            "trial done and only tested the best trial; its times are that earlier run's.",
            "",
        ]
    lines += [
        "| search | trials | pruned | failed | epochs spent | best val acc % | its test acc % "
        "| trial time s | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, s in ((a.pruner, pruned), ("none", full)):
        name = _label(a, key)
        lines.append(
            f"| {name} | {s['trials']} | {s['pruned']} | {s['failed']} | {s['epochs']} | {100 * s['best_val']:.2f} | "
            f"{100 * s['test']:.2f} | {s['trial_s']:.0f} | {s['wall_s']:.0f} |"
        )
    lines += [
        "",
        "Failed trials diverged (their learning rate was too high) in their first epoch and count no epochs. "
        "Trial time is the time inside the trials, summed; wall is the time during which any of its trials ran "
        "(from the study's timestamps, so a pause between an interrupted launch and its resumption is left out).",
    ]

    def count(key: str) -> str:
        return ", ".join(f"{s[key]} in the {_label(a, k)} search" for k, s in summaries.items() if s[key])

    if count("interrupted"):
        lines += [
            "",
            f"Interrupted and resumed (trials that were running when a launch stopped: {count('interrupted')}): "
            "relaunching the same command ran them again from the start; their partial epochs are not counted.",
        ]
    if count("unfinished"):
        lines += ["", f"**Not finished**: trials still running or waiting ({count('unfinished')}): counts are partial."]
    lines += ["", f"**Pruning saved {100 * saved:.0f}% of the epochs** (target ≥ 40%)."]
    if ref:
        gaps = {k: 100 * (ref["val_mean"] - s["best_val"]) for k, s in summaries.items()}
        lines += [
            "",
            f"Reference, the `{a.reference_recipe}` preset in `{a.reference_experiment}` "
            f"({ref['recipe']}: {ref['model']}, {ref['optimizer']}, {ref['epochs']} epochs, data {ref['data']}, seeds "
            f"{','.join(map(str, ref['seeds']))}): "
            f"val {ref['val_mean'] * 100:.2f}%, test {ref['test_mean'] * 100:.2f}%.",
            "",
            f"**Gap of the pruned search's best trial to it: {gaps[a.pruner]:.2f} points of val acc** "
            f"(no pruning: {gaps['none']:.2f}; target ≤ 0.2).",
        ]
    lines += ["", "Best trials:", ""]
    for key in summaries:
        params = " ".join(f"{k}={v}" for k, v in summaries[key]["best_params"].items())
        lines.append(f"- {key}: `{params}`")
    return "\n".join(lines) + "\n"


def _setup_from_runs(tracking_uri: str, pruner: str) -> dict:
    """Device and versions as the search's own runs recorded them (for a record older than those fields)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(f"bench-search-{pruner}")
    runs = client.search_runs([exp.experiment_id], "tags.`device.name` != ''", max_results=1) if exp else []
    tags = runs[0].data.tags if runs else {}
    versions = ", ".join(
        f"{name} {tags[f'version.{key}']}"
        for key, name in (("python", "Python"), ("torch", "torch"), ("hydra", "hydra-core"), ("mlflow", "mlflow"))
        if f"version.{key}" in tags
    )
    return {"machine": "not recorded", "device": tags.get("device.name", "not recorded"), "versions": versions}


def _device_name(device: str) -> str:
    from mnist_sweep import training

    return training.device_name(training.resolve_device(device))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_root = REPO.parent / "shared" / "datasets" / "mnist"
    parser.add_argument("--data-root", default=str(default_root if default_root.exists() else REPO / "data"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--trials", type=int, default=40)
    # The defaults are the search preset's (conf/experiment/search.yaml): a bare run measures the preset.
    parser.add_argument("--epochs", type=int, default=10, help="per trial, at most")
    parser.add_argument("--pruner", default="asha", choices=["median", "asha", "hyperband"], help="the pruned search's")
    parser.add_argument("--jobs", type=int, default=1, help="trials at once in each search (joblib)")
    parser.add_argument("--tracking-uri", default=None, help="default: sqlite:///WORKDIR/mlflow.db")
    parser.add_argument("--reference-experiment", default=None, help="MLflow experiment holding the preset grid")
    parser.add_argument("--reference-uri", default=None, help="its tracking URI (default: --tracking-uri)")
    parser.add_argument("--reference-recipe", default="best", help="the preset to compare with (no augmentation)")
    parser.add_argument("--workdir", default="outputs/bench-search")
    parser.add_argument("--override", action="append", default=[], help="extra override for both searches")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--unpruned-from", default=None, help="an earlier run's workdir: reuse its unpruned search")
    parser.add_argument("--out", default=str(OUT))
    a = parser.parse_args(argv)
    workdir = Path(a.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    a.data_root = str(Path(a.data_root).resolve())
    a.tracking_uri = a.tracking_uri or f"sqlite:///{workdir}/mlflow.db"
    words = list(sys.argv[1:] if argv is None else argv)
    # The report's command names the pruner and the epochs even when they were the defaults, so that it still
    # means the same searches after a default changes (the pruner's was median before the preset took asha).
    given = {w.split("=", 1)[0] for w in words}
    for flag, value in (("--pruner", a.pruner), ("--epochs", a.epochs)):
        if flag not in given:
            words += [flag, str(value)]
    command = " ".join(["python -m mnist_sweep.bench_search", *words])

    # What ran, and where: --report-only reports it, also on another machine than the one that ran it.
    record = workdir / "searches.json"
    if a.report_only:
        setup = json.loads(record.read_text()) if record.exists() else {"command": command}
    else:
        from mnist_sweep.bench_sweeps import _machine, _versions

        setup = {"command": command, "machine": _machine(), "device": _device_name(a.device), "versions": _versions()}
        if a.unpruned_from:
            copy_unpruned(Path(a.unpruned_from).resolve(), workdir, command)
            setup["unpruned_from"] = a.unpruned_from
        record.write_text(json.dumps(setup))
        run_searches(a, workdir)
    if not {"machine", "device", "versions"} <= setup.keys():  # a record from before those were kept
        setup = {**_setup_from_runs(a.tracking_uri, a.pruner), **setup}
    summaries = {p: study_summary(workdir, p, a.tracking_uri) for p in (a.pruner, "none")}
    ref_uri = a.reference_uri or a.tracking_uri
    ref = reference(ref_uri, a.reference_experiment, a.reference_recipe) if a.reference_experiment else None
    text = markdown(a, setup, summaries, ref)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
