"""Benchmark the search: does a budget of N trials find a config close to the best preset, and how many
epochs does pruning save? Writes docs/BENCHMARKS-search.md, one report for every search benchmark run.

    python -m benchmarks.search --data-root ../shared/datasets/mnist \\
        --reference-experiment results --reference-uri sqlite:///mlruns/mlflow.db
    python -m benchmarks.search --render-only     # rebuild docs/BENCHMARKS-search.md from the saved records

Side by side, in one run: the same ``experiment=search`` (same space, same TPE seed, same trial budget and
epochs) launched twice at the same time, once with a pruner (``--pruner``: asha, the search preset's and the
default, median or hyperband) and once with ``pruner=none``. The epochs each spent are counted from the Optuna
study (one intermediate value per epoch a trial ran). The reference is the recipe ``--reference-recipe`` (the
``best`` preset, which like the search uses no augmentation) among the finished runs of
``--reference-experiment``, by mean validation accuracy over its seeds. Both the search and the reference are
judged on validation accuracy, the only thing either was allowed to look at; test accuracy is shown beside it.

Each run's outcome (command, machine, versions, both searches' counts, the reference) is saved as a record,
``benchmarks/records/search/NAME.json`` (``--name``, by default the workdir's folder name), and the report is
rendered from all the records there: a table per search space and budget, a row per pruner and TPE seed. The
studies themselves stay in ``--workdir`` (outputs/, not kept in git); the records are what the report needs.

``--report-only`` rebuilds the record from the stores a previous run left in ``--workdir``. ``--unpruned-from
DIR`` runs only the pruned search and takes the unpruned one from an earlier run's workdir with the same command
(the unpruned search does not depend on the pruner, and is deterministic on a CPU): its study is copied, the
relaunch finds every trial done and only tests the best, and the record says so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from benchmarks import common

REPO = common.REPO
OUT = common.DOCS / "BENCHMARKS-search.md"
RECORDS = common.RECORDS / "search"
# The command's options that do not change the searches themselves (the pruner is a row of the table).
_PER_RUN = ("--pruner", "--workdir", "--out", "--unpruned-from", "--name", "--records")


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
        log = open(workdir / f"search-{pruner}.log", "a")  # noqa: SIM115 (closed with the process); a resumed search adds
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


def _covered(spans: list[tuple[float, float]]) -> float:
    """The length of the union of the time intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        total += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return total


def reference(tracking_uri: str, experiment: str, recipe: str) -> dict | None:
    """The preset ``recipe`` (its best variant by mean validation accuracy) among the experiment's runs."""
    from benchmarks import results

    rows = [r for r in results.collect(tracking_uri, experiment) if r["recipe"] == recipe]
    if not rows:
        return None
    best = max(rows, key=lambda r: statistics.fmean(r["val"]))
    what = (
        f"{best['recipe']}: {best['model']}, {best['optimizer']}, {best['epochs']} epochs, data {best['data']}, "
        f"seeds {','.join(map(str, best['seeds']))}"
    )
    return {
        "preset": recipe,
        "experiment": experiment,
        "what": what,
        "val_mean": statistics.fmean(best["val"]),
        "test_mean": statistics.fmean(best["test"]),
    }


def _tpe_seed(overrides: list[str]) -> str:
    """The sampler's seed: the last `hydra.sweeper.sampler.seed=N` override (`hydra.sweeper.seed=N` in the records
    made before the sampler group), else this project's sweeper preset's."""
    seeds = [o.split("=", 1)[1] for o in overrides if _is_seed(o)]
    if seeds:
        return seeds[-1]
    return str(OmegaConf.load(common.CONF_DIR / "hydra" / "sweeper" / "optuna.yaml").sampler.seed)


def _is_seed(override: str) -> bool:
    return override.lstrip("+").startswith(("hydra.sweeper.sampler.seed=", "hydra.sweeper.seed="))


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


# --------------------------------------------------------------------------------------------------------------
# Records: one per benchmark run
# --------------------------------------------------------------------------------------------------------------


def make_record(a, setup: dict, summaries: dict[str, dict], ref: dict | None) -> dict:
    """What the report needs from one run: how it ran and what both searches found. A record may also hold,
    written by hand, a ``note`` and a ``variant`` (what set these searches apart from others with the same
    command, such as an older search space: it gets a table of its own)."""
    if ref:
        for s in summaries.values():
            s["gap"] = 100 * (ref["val_mean"] - s["best_val"])  # points of val acc the search fell short by
    return {
        "name": a.name,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        **setup,
        "pruner": a.pruner,
        "trials": a.trials,
        "epochs": a.epochs,
        "jobs": a.jobs,
        "tpe_seed": _tpe_seed(a.override),
        "space": [o for o in a.override if not _is_seed(o)],
        "searches": summaries,
        "reference": ref,
    }


def save_record(records: Path, record: dict) -> Path:
    records.mkdir(parents=True, exist_ok=True)
    path = records / f"{record['name']}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def load_records(records: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(records.glob("*.json"))]


# --------------------------------------------------------------------------------------------------------------
# The report: all records, grouped by what the searches were
# --------------------------------------------------------------------------------------------------------------


def _group_key(r: dict) -> tuple:
    """Records whose searches differ only in the pruner and the TPE seed share a table."""
    space = tuple(r.get("space", []))
    return (r.get("device", ""), r["trials"], r["epochs"], r.get("jobs", 1), space, r.get("variant", ""))


def _num(x, digits: int = 0, scale: float = 1.0) -> str:
    return "-" if x is None or x != x else f"{x * scale:.{digits}f}"


def _seed_key(r: dict):
    seed = str(r["tpe_seed"])
    return (r["pruner"], int(seed) if seed.isdigit() else seed, r["name"])


def _saved(r: dict) -> float:
    pruned, full = r["searches"][r["pruner"]]["epochs"], r["searches"]["none"]["epochs"]
    return 1 - pruned / full if full else float("nan")


def _title(r: dict) -> str:
    space = " ".join(f"`{o}`" for o in r.get("space", [])) or "the preset's space as it is"
    variant = f" ({r['variant']})" if r.get("variant") else ""
    return (
        f"{r['trials']} trials of at most {r['epochs']} epochs, {r.get('jobs', 1)} at a time, on "
        f"{r.get('device', 'a device not recorded')}; overrides: {space}{variant}"
    )


def render(records: list[dict], command: str) -> str:
    by_key: dict[tuple, list[dict]] = {}
    for r in records:
        by_key.setdefault(_group_key(r), []).append(r)
    # The most recent searches first; among those of a day, the most runs first.
    groups = sorted(by_key.values(), key=lambda g: (max(r.get("date", "") for r in g), len(g)), reverse=True)
    lines = [
        "# Search benchmark",
        "",
        f"Rendered by `{command}` from the saved records (benchmarks/records/search/ unless the command names "
        "other `--records`), one per run of `python -m benchmarks.search`; each run's own command, machine and "
        "versions are listed under Runs.",
        "",
        "Each run launches `experiment=search` twice at the same time, with a pruner and without "
        "(`pruner=none`), with the same space, TPE seed and budget. Epochs are counted from the Optuna study; "
        "failed trials diverged (their learning rate was too high) in their first epoch and count no epochs. "
        "Trial time is the time inside the trials, summed. The gap is the reference preset's mean validation "
        "accuracy minus the search's best trial's, in points (negative: the search found better). Targets: "
        "pruning saves ≥ 40% of the epochs, and the pruned search's best trial comes within 0.2 points of the "
        "reference.",
        "",
    ]
    for n, group in enumerate(groups, 1):
        lines += [f"## {n}. {_title(group[0])}", ""]
        refs = {
            (r["reference"]["what"], r["reference"]["val_mean"], r["reference"]["test_mean"])
            for r in group
            if r.get("reference")
        }
        for what, val, test in sorted(refs):
            lines.append(f"Reference: {what} (val {100 * val:.2f}%, test {100 * test:.2f}%).")
        if refs:
            lines.append("")
        rows = []
        for r in sorted(group, key=_seed_key):
            p, u = r["searches"][r["pruner"]], r["searches"]["none"]
            rows.append(
                [
                    r["pruner"],
                    r["tpe_seed"],
                    f"{p['trials']} ({p['pruned']} pruned, {_num(p.get('failed'))} failed)",
                    f"{p['epochs']} / {u['epochs']}",
                    f"**{100 * _saved(r):.0f}%**" if _saved(r) >= 0.4 else f"{100 * _saved(r):.0f}%",
                    f"{_num(p['best_val'], 2, 100)} / {_num(u['best_val'], 2, 100)}",
                    f"{_num(p['test'], 2, 100)} / {_num(u['test'], 2, 100)}",
                    f"{_num(p.get('gap'), 2)} / {_num(u.get('gap'), 2)}",
                    f"{_num(p.get('trial_s'))} / {_num(u.get('trial_s'))}",
                    f"[{r['name']}](#{r['name']})",
                ]
            )
        head = ["pruner", "TPE seed", "pruned search: trials", "epochs: pruned / none", "saved"]
        head += ["best val %: pruned / none", "its test %", "gap, points", "trial time s", "run"]
        lines += [common.table(head, rows), ""]
        summary = []
        for pruner in sorted({r["pruner"] for r in group}):
            mine = [r for r in group if r["pruner"] == pruner]
            if len({r["tpe_seed"] for r in mine}) < 2:
                continue
            spent = sum(r["searches"][pruner]["epochs"] for r in mine)
            full = sum(r["searches"]["none"]["epochs"] for r in mine)
            gaps = [g for r in mine if (g := r["searches"][pruner].get("gap")) is not None]
            summary.append(
                f"- {pruner} over {len(mine)} TPE seeds: {spent:,} epochs against {full:,} unpruned "
                f"({100 * (1 - spent / full):.0f}% saved; per seed {min(map(_saved, mine)) * 100:.0f}-"
                f"{max(map(_saved, mine)) * 100:.0f}%)"
                + (f", gap {min(gaps):.2f} to {max(gaps):.2f} points." if gaps else ".")
            )
        lines += [*summary, ""] if summary else []
    lines += ["## Runs", ""]
    for r in sorted(records, key=lambda r: r["name"]):
        lines += [f"### {r['name']}", "", f"- Command: `{r['command']}`"]
        lines.append(f"- Date: {r.get('date', 'not recorded')}" + (f"; {r['source']}" if r.get("source") else ""))
        lines.append(f"- Machine: {r.get('machine', 'not recorded')}; device {r.get('device', 'not recorded')}")
        lines.append(f"- Versions: {r.get('versions', 'not recorded')}")
        if r.get("unpruned_from"):
            lines.append(
                f"- The unpruned search was not run again: its study was copied from `{r['unpruned_from']}`, the "
                "workdir of the same command with another pruner; its relaunch only tested the best trial, and its "
                "times are that earlier run's."
            )
        for key, s in r["searches"].items():
            if s.get("interrupted"):
                lines.append(
                    f"- {s['interrupted']} trial(s) of the {key} search were interrupted and ran again from the "
                    "start on a relaunch; their partial epochs are not counted."
                )
            if s.get("unfinished"):
                lines.append(f"- **Not finished**: {s['unfinished']} trial(s) of the {key} search: counts are partial.")
        if r.get("note"):
            lines.append(f"- Note: {r['note']}")
        for key, s in r["searches"].items():
            params = " ".join(f"{k}={v}" for k, v in s.get("best_params", {}).items())
            lines.append(f"- Best trial, {key}: `{params}`")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=common.default_data_root())
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
    parser.add_argument("--name", default=None, help="the run's record name (default: the workdir's folder name)")
    parser.add_argument("--records", default=str(RECORDS), help="folder of the records the report is rendered from")
    parser.add_argument("--override", action="append", default=[], help="extra override for both searches")
    parser.add_argument("--report-only", action="store_true", help="rebuild the record from --workdir's stores")
    parser.add_argument("--render-only", action="store_true", help="only render --out from the saved records")
    parser.add_argument("--unpruned-from", default=None, help="an earlier run's workdir: reuse its unpruned search")
    parser.add_argument("--out", default=str(OUT))
    a = parser.parse_args(argv)
    records = Path(a.records)
    words = list(sys.argv[1:] if argv is None else argv)
    if a.render_only:
        common.write_report(a.out, render(load_records(records), common.command_line("benchmarks.search", words)))
        return 0
    workdir = Path(a.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    a.name = a.name or workdir.name
    a.data_root = str(Path(a.data_root).resolve())
    a.tracking_uri = a.tracking_uri or f"sqlite:///{workdir}/mlflow.db"
    # The record's command names the pruner and the epochs even when they were the defaults, so that it still
    # means the same searches after a default changes (the pruner's was median before the preset took asha).
    given = {w.split("=", 1)[0] for w in words}
    for flag, value in (("--pruner", a.pruner), ("--epochs", a.epochs)):
        if flag not in given:
            words += [flag, str(value)]
    command = common.command_line("benchmarks.search", words)

    # What ran, and where: --report-only reports it, also on another machine than the one that ran it.
    ran = workdir / "searches.json"
    if a.report_only:
        setup = json.loads(ran.read_text()) if ran.exists() else {"command": command}
    else:
        setup = {
            "command": command,
            "machine": common.machine(),
            "device": _device_name(a.device),
            "versions": common.versions_line(),
        }
        if a.unpruned_from:
            copy_unpruned(Path(a.unpruned_from).resolve(), workdir, command)
            setup["unpruned_from"] = a.unpruned_from
        ran.write_text(json.dumps(setup))
        run_searches(a, workdir)
    if not {"machine", "device", "versions"} <= setup.keys():  # a record from before those were kept
        setup = {**_setup_from_runs(a.tracking_uri, a.pruner), **setup}
    summaries = {p: study_summary(workdir, p, a.tracking_uri) for p in (a.pruner, "none")}
    ref_uri = a.reference_uri or a.tracking_uri
    ref = reference(ref_uri, a.reference_experiment, a.reference_recipe) if a.reference_experiment else None
    saved = save_record(records, make_record(a, setup, summaries, ref))
    print(f"record: {saved}")
    render_command = common.command_line("benchmarks.search", ["--render-only", "--records", str(records)])
    if records.resolve() == RECORDS.resolve():
        render_command = "python -m benchmarks.search --render-only"
    common.write_report(a.out, render(load_records(records), render_command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
