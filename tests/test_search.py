"""The Optuna sweeper (mnist_sweep/search.py): search space, pruning, resume, and the best-config preset.

Most checks drive a stand-in task (tests/search_app: no data, a known optimum at x = 0.3) through
`-m hydra/sweeper=...`, so they test the sweeper itself in seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from hydra import compose, initialize_config_dir

from conftest import REPO
from mnist_sweep import config, search

APP = Path(__file__).parent / "search_app" / "app.py"


def _search(tmp_path, *overrides, name="run"):
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),  # hydra finds the sweeper in REPO/hydra_plugins
        "SWEEP_LOG": str(tmp_path / "trials.log"),
        "SWEEP_DIR": str(tmp_path / name),
        "SWEEP_STORAGE": f"sqlite:///{tmp_path}/optuna.db",
    }
    late = None
    try:
        proc = subprocess.run(
            [sys.executable, str(APP), "-m", *overrides], env=env, capture_output=True, text=True, timeout=300
        )
    except subprocess.TimeoutExpired as e:
        late = e
    if late is not None:  # failed outside the except block, so that the report is the child's output alone
        printed = late.stderr.decode(errors="replace") if isinstance(late.stderr, bytes) else late.stderr or ""
        pytest.fail(f"the stand-in search {overrides} still ran after 300 s; it printed:\n{printed[-3000:]}")
    lines = (tmp_path / "trials.log").read_text().splitlines() if (tmp_path / "trials.log").exists() else []
    return proc, lines


def _study(tmp_path):
    return optuna.load_study(study_name="stand-in", storage=f"sqlite:///{tmp_path}/optuna.db")


def test_parse_space_maps_hydra_sweeps_to_optuna_distributions():
    fixed, space = search.parse_space(
        [
            "model.hidden=choice(128,256)",
            "optimizer=adam,sgd",
            "model.depth=range(1,4)",
            "optimizer.lr=tag(log,interval(1e-4,1e-2))",
            "model.dropout=interval(0.0,0.5)",
            "data.batch_size=int(interval(64,512))",
            "trainer.epochs=3",
        ]
    )
    assert fixed == ["trainer.epochs=3"]
    D = optuna.distributions
    assert space["model.hidden"] == D.CategoricalDistribution([128, 256])
    assert space["optimizer"] == D.CategoricalDistribution(["adam", "sgd"])
    assert space["model.depth"] == D.CategoricalDistribution([1, 2, 3])
    assert space["optimizer.lr"] == D.FloatDistribution(1e-4, 1e-2, log=True)
    assert space["model.dropout"] == D.FloatDistribution(0.0, 0.5)
    assert space["data.batch_size"] == D.IntDistribution(64, 512)


def test_search_finds_the_optimum_prunes_and_tests_only_the_best(tmp_path):
    proc, lines = _search(
        tmp_path, "x=interval(0.0,1.0)", "hydra.sweeper.n_trials=12", "hydra.sweeper.startup_trials=3"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = _study(tmp_path)
    states = [t.state for t in study.trials]
    assert len(states) == 12
    assert states.count(optuna.trial.TrialState.PRUNED) >= 1
    assert abs(study.best_params["x"] - 0.3) < 0.15
    trial_epochs = [line for line in lines if "test=False" in line]
    assert len(trial_epochs) < 12 * 4  # pruning cut some trials short
    tested = [line for line in lines if "test=True" in line]
    assert len(tested) == 4 and all(f"x={study.best_params['x']}" in line for line in tested)
    assert "best trial" in proc.stderr + proc.stdout


def test_pruner_none_runs_every_epoch(tmp_path):
    proc, lines = _search(
        tmp_path,
        "x=interval(0.0,1.0)",
        "hydra.sweeper.n_trials=5",
        "hydra.sweeper.pruner=none",
        "hydra.sweeper.test_best=false",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(lines) == 5 * 4
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in _study(tmp_path).trials)


def test_asha_through_the_sweeper_stops_trials_at_its_first_rung(tmp_path):
    proc, _ = _search(
        tmp_path,
        "x=interval(0.0,1.0)",
        "hydra.sweeper.n_trials=10",
        "hydra.sweeper.pruner=asha",
        "hydra.sweeper.warmup_epochs=2",
        "hydra.sweeper.test_best=false",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    pruned = [t for t in _study(tmp_path).trials if t.state == optuna.trial.TrialState.PRUNED]
    assert len(pruned) >= 3
    assert all(t.last_step == 2 for t in pruned)  # the only rung inside 4 epochs (the next is 8)


@pytest.mark.parametrize("name", ["asha", "median"])
def test_asha_keeps_the_top_quarter_at_its_rungs_and_judges_nowhere_else(name):
    """At epoch warmup_epochs (then 4x, 16x, ...) successive halving keeps a trial only in the top quarter of those
    that reached it, and between rungs it stops none; the median rule keeps the top half."""
    study = optuna.create_study(direction="maximize", pruner=search.make_pruner(name, 2, 0, 10))

    def trial(*values):
        t = study.ask()
        for epoch, value in enumerate(values, start=1):
            t.report(value, epoch)
            if t.should_prune():
                study.tell(t, state=optuna.trial.TrialState.PRUNED)
                return epoch
        study.tell(t, values[-1])
        return None

    for v in (0.9, 0.8, 0.7, 0.6):
        study.enqueue_trial({})
        t = study.ask()
        t.report(v, 1), t.report(v, 2), t.should_prune(), t.report(v, 3)  # records its value at the rung
        study.tell(t, v)
    assert trial(0.5, 0.85, 0.85) == (2 if name == "asha" else None)  # 2nd of 5 at epoch 2: not in the top quarter
    assert trial(0.5, 0.95, 0.1) is None  # top at epoch 2, promoted; epoch 3 is no rung, nothing judges its drop


def test_relaunch_resumes_the_study_and_runs_only_what_is_missing(tmp_path):
    first, lines1 = _search(
        tmp_path, "x=interval(0.0,1.0)", "hydra.sweeper.n_trials=3", "hydra.sweeper.test_best=false", name="a"
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert len(_study(tmp_path).trials) == 3
    second, lines2 = _search(
        tmp_path, "x=interval(0.0,1.0)", "hydra.sweeper.n_trials=5", "hydra.sweeper.test_best=false", name="b"
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert len(_study(tmp_path).trials) == 5
    assert len({line.split()[0] for line in lines2[len(lines1) :]}) == 2  # two new trials only


def test_relaunch_counts_a_diverged_trial_as_done(tmp_path):
    """A trial that failed by itself (diverged) used up its slot, in a relaunch as in the launch that ran it."""
    study = optuna.create_study(study_name="stand-in", storage=f"sqlite:///{tmp_path}/optuna.db", direction="maximize")
    space = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}
    study.tell(study.ask(space), state=optuna.trial.TrialState.FAIL)
    study.tell(study.ask(space), 0.9)
    proc, lines = _search(tmp_path, "x=interval(0.0,1.0)", "hydra.sweeper.n_trials=2", "hydra.sweeper.test_best=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 trials done, 0 to run" in proc.stderr + proc.stdout
    assert lines == [] and len(_study(tmp_path).trials) == 2  # nothing new ran
    proc, lines = _search(tmp_path, "x=interval(0.0,1.0)", "hydra.sweeper.n_trials=3", "hydra.sweeper.test_best=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(_study(tmp_path).trials) == 3  # a larger budget runs only the missing one


def test_trial_left_running_by_a_killed_launch_is_run_again(tmp_path):
    study = optuna.create_study(study_name="stand-in", storage=f"sqlite:///{tmp_path}/optuna.db", direction="maximize")
    orphan = study.ask({"x": optuna.distributions.FloatDistribution(0.0, 1.0)})  # never told: RUNNING
    proc, lines = _search(tmp_path, "x=interval(0.0,1.0)", "hydra.sweeper.n_trials=2", "hydra.sweeper.test_best=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = {t.number: t for t in _study(tmp_path).trials}
    states = {n: t.state for n, t in trials.items()}
    assert states[orphan.number] == optuna.trial.TrialState.FAIL
    assert trials[orphan.number].user_attrs == {"interrupted": True}  # told apart from a trial that failed itself
    assert any(f"x={orphan.params['x']}" in line for line in lines)  # same parameters, run again
    assert sum(s == optuna.trial.TrialState.COMPLETE for s in states.values()) == 2


def test_empty_search_space_is_a_clear_error(tmp_path):
    proc, _ = _search(tmp_path, "x=0.2")
    assert proc.returncode != 0
    assert "search space is empty" in proc.stderr


def test_search_without_a_validation_split_is_refused_before_any_trial(tmp_path):
    proc, lines = _search(tmp_path, "x=interval(0,1)", "+data.val_size=0")
    assert proc.returncode != 0
    assert "data.val_size=0 leaves no validation split" in proc.stderr and "data.val_size=5000" in proc.stderr
    assert lines == []  # no trial ran
    proc, lines = _search(tmp_path, "x=interval(0,1)", "+data.val_size=5000", "hydra.sweeper.n_trials=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert lines  # with a validation split the same search runs


def test_best_preset_yaml_composes_as_an_experiment(tmp_path):
    text = search.preset_yaml(
        {"optimizer": "sgd", "optimizer.lr": 0.02, "model.hidden": 512, "trainer.epochs": 3, "seed": 7},
        "# test preset\n",
        groups={"optimizer", "model", "scheduler"},
    )
    conf = tmp_path / "conf"
    import shutil

    shutil.copytree(REPO / "conf", conf)
    (conf / "experiment" / "found_test.yaml").write_text(text)
    config.register()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=found_test"])
    assert cfg.optimizer._target_ == "torch.optim.SGD" and cfg.optimizer.lr == 0.02
    assert cfg.model.hidden == 512 and cfg.trainer.epochs == 3
    assert cfg.seed == 7  # a top-level value, not a config group


@pytest.mark.parametrize("name", ["none", "median", "asha", "hyperband"])
def test_pruners(name):
    assert search.make_pruner(name, 1, 5, 10) is not None
    with pytest.raises(search.SearchError, match="choose none, median, asha or hyperband"):
        search.make_pruner("asha2", 1, 5, 10)


@pytest.mark.e2e
def test_optuna_search_through_train_py(tmp_path, mnist_root, cache_dir):
    """A real (tiny) search: trials nested and logged, one pruned, the best config written, tested once."""
    from mlflow import MlflowClient

    from conftest import train_py

    presets = tmp_path / "presets"
    # The search runs under an experiment preset (as `experiment=search` does): what it sets must reach the
    # written preset, which has to stand alone.
    extra = tmp_path / "extra" / "experiment"
    extra.mkdir(parents=True)
    (extra / "tiny_search.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /optimizer: sgd\n"
        "model:\n  depth: 1\ntrainer:\n  label_smoothing: 0.1\n"
    )
    proc = train_py(
        "-m",
        f"hydra.searchpath=[file://{extra.parent}]",
        "experiment=tiny_search",
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=6",
        "hydra.sweeper.startup_trials=1",
        "hydra.sweeper.warmup_epochs=0",
        f"hydra.sweeper.preset_dir={presets}",
        "hydra.sweeper.best_preset=found_e2e",
        "optimizer.lr=choice(0.00001,0.003)",
        "model.hidden=choice(16,24,32)",
        "trainer.epochs=2",
        "mlflow.log_model=false",
        f"data.root={mnist_root}",
        f"data.cache_dir={cache_dir}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("mnist-sweep")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    # 6 trials (a config suggested twice reuses its FINISHED run: sweeps resume) + the chosen config, tested once
    assert len(parents) == 1 and 4 <= len(children) <= 7
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    pruned = [r for r in children if r.data.tags.get("pruned") == "true"]
    assert pruned and all(r.info.status == "FINISHED" for r in pruned)
    tested = [r for r in children if "test/acc" in r.data.metrics]
    assert len(tested) == 1 and tested[0].data.params["trainer.test"] == "True"
    study = optuna.load_study(study_name="mnist-sweep-search", storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    assert any(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)
    preset = (presets / "found_e2e.yaml").read_text()
    assert preset.startswith("# @package _global_") and f"hidden: {study.best_params['model.hidden']}" in preset
    assert "optuna" not in preset.split("\n", 3)[-1] and "data:" not in preset  # no bookkeeping, no paths
    written = yaml.safe_load(preset)
    assert written["defaults"] == [{"override /optimizer": "sgd"}]  # the experiment's group pick
    assert written["model"]["depth"] == 1 and written["trainer"] == {"epochs": 2, "label_smoothing": 0.1}
    assert tested[0].data.params["model.depth"] == "1" and tested[0].data.params["optimizer.name"] == "sgd"
    board = proc.stdout + proc.stderr
    assert "pruned at epoch" in board  # the leaderboard says why a trial stopped early
    rerun = board.split("rerun it with:", 1)[1].splitlines()[1]
    assert "optuna." not in rerun and "trainer.test" not in rerun
