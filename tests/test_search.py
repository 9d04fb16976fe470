"""The Optuna sweeper (hydra_plugins/mnist_sweep_optuna) with this project's additions (mnist_sweep/search.py):
search space, pruning, resume, the best-config preset, several objectives, and the fixed bugs.

Most checks drive a stand-in task (tests/search_app: no data, a known optimum at x = 0.3) with this project's
conf/hydra/sweeper/optuna.yaml, so they test the sweeper itself in seconds. Upstream's own suite runs in
test_optuna_peer.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import REPO
from hydra_plugins.mnist_sweep_optuna import _impl
from mnist_sweep import config, plots, search, sweep

APP = Path(__file__).parent / "search_app"
D = optuna.distributions


def _app(tmp_path) -> Path:
    """The stand-in app beside this project's conf/hydra/sweeper/optuna.yaml, as train.py is beside conf/."""
    app = tmp_path / "app"
    if not app.exists():
        (app / "hydra" / "sweeper").mkdir(parents=True)
        for name in ("app.py", "config.yaml"):
            shutil.copy(APP / name, app / name)
        shutil.copy(REPO / "conf" / "hydra" / "sweeper" / "optuna.yaml", app / "hydra" / "sweeper" / "optuna.yaml")
    return app / "app.py"


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
            [sys.executable, str(_app(tmp_path)), "-m", *overrides],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired as e:
        late = e
    if late is not None:  # failed outside the except block, so that the report is the child's output alone
        printed = late.stderr.decode(errors="replace") if isinstance(late.stderr, bytes) else late.stderr or ""
        pytest.fail(f"the stand-in search {overrides} still ran after 300 s; it printed:\n{printed[-3000:]}")
    lines = (tmp_path / "trials.log").read_text().splitlines() if (tmp_path / "trials.log").exists() else []
    return proc, lines


def _study(tmp_path, name="stand-in"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/optuna.db")


def _compose(conf_dir: Path, *overrides):
    config.register()
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def test_sweep_expressions_become_optuna_distributions():
    dims, fixed, deleted = _impl.create_params_from_overrides(
        [
            "model.hidden=choice(128,256)",
            "optimizer=adam,sgd",
            "model.depth=range(1,4)",
            "model.dropout=range(0,0.5,step=0.125)",
            "optimizer.lr=tag(log,interval(1e-4,1e-2))",
            "model.input_dropout=interval(0.0,0.5)",
            "data.batch_size=int(interval(64,512))",
            "trainer.epochs=3",
            "~note",
        ],
        range_includes_stop=False,  # this project's conf/hydra/sweeper/optuna.yaml
    )
    assert fixed == {"trainer.epochs": "3"} and deleted == ["~note"]
    assert dims["model.hidden"] == D.CategoricalDistribution([128, 256])
    assert dims["optimizer"] == D.CategoricalDistribution(["adam", "sgd"])
    assert dims["model.depth"] == D.IntDistribution(1, 3)  # range(1,4) is 1, 2, 3, as in Hydra's basic sweeper
    assert dims["model.dropout"] == D.FloatDistribution(0.0, 0.375, step=0.125)
    assert dims["optimizer.lr"] == D.FloatDistribution(1e-4, 1e-2, log=True)
    assert dims["model.input_dropout"] == D.FloatDistribution(0.0, 0.5)
    assert dims["data.batch_size"] == D.IntDistribution(64, 512)
    # hydra-optuna-sweeper's range includes its stop value, and so does any other app's by default
    dims, _, _ = _impl.create_params_from_overrides(["a=range(1,4)", "b=range(0,1,step=0.25)", "c=range(1,6,step=2)"])
    assert dims["a"] == D.IntDistribution(1, 4) and dims["b"] == D.FloatDistribution(0, 1, step=0.25)
    assert dims["c"] == D.IntDistribution(1, 5, step=2)
    with pytest.raises(_impl.SearchError, match="is empty"):
        _impl.create_params_from_overrides(["a=range(4,1)"])


def test_a_command_line_value_beats_the_preset_dimension_of_the_same_key():
    """`python train.py -m experiment=search model.depth=1` searches everything but depth."""
    cfg = _compose(REPO / "conf", "experiment=search")
    params = cfg.hydra.sweeper.params
    assert params["model.depth"] == "range(1,4)"
    sweeper = _impl.OptunaSweeperImpl(sampler=None, params=params, range_includes_stop=False)
    space = sweeper._space(["model.depth=1", "model.hidden=choice(64,128)", "trainer.epochs=3"])
    assert "model.depth" not in space.dimensions and space.fixed["model.depth"] == "1"
    assert space.dimensions["model.hidden"] == D.CategoricalDistribution([64, 128])  # the command line's space
    assert "optimizer.lr" in space.dimensions  # the rest of the preset's space is searched
    assert {"model.depth=1", "trainer.epochs=3"} <= set(space.overrides())


def test_a_fixed_value_on_the_command_line_reaches_every_trial(tmp_path):
    proc, lines = _search(
        tmp_path,
        "+hydra.sweeper.params.x='interval(0.0,1.0)'",
        "x=0.25",
        "note=choice(a,b)",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.test_best=false",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert lines and all(" x=0.25 " in line for line in lines)
    assert all("x" not in t.params for t in _study(tmp_path).trials)


def test_this_project_turns_the_additions_on_and_other_apps_get_upstream_defaults(tmp_path):
    ours = _compose(REPO / "conf", "hydra/sweeper=optuna").hydra.sweeper
    assert ours.direction == "maximize" and ours.pruner == "median" and ours.resume and ours.test_best
    assert ours.best_preset == "found" and ours.storage == "sqlite:///mlruns/optuna.db"
    assert ours.sampler._target_ == "optuna.samplers.TPESampler" and ours.sampler.seed == 0
    assert ours.range_includes_stop is False
    (tmp_path / "config.yaml").write_text("defaults:\n  - override hydra/sweeper: optuna\nx: 1\n")
    other = _compose(tmp_path).hydra.sweeper
    assert other.direction.name == "minimize" and other.pruner == "none" and not other.resume
    assert other.best_preset is None and other.test_best is False and other.storage is None
    assert other.n_jobs == 2 and other.sampler.seed is None and other.range_includes_stop is True
    assert other.sampler._target_ == "optuna.samplers.TPESampler"


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


def test_storage_null_is_an_in_memory_study_that_trials_in_this_process_prune_through(tmp_path):
    proc, lines = _search(
        tmp_path,
        "x=interval(0.0,1.0)",
        "hydra.sweeper.storage=null",
        "hydra.sweeper.n_trials=12",
        "hydra.sweeper.startup_trials=3",
        "hydra.sweeper.test_best=false",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SQLAlchemy" not in proc.stderr and not list(tmp_path.rglob("*.db"))  # no database, no file "None"
    assert not [p for p in tmp_path.rglob("None*")]
    assert len(lines) < 12 * 4  # pruned, through the study in the launching process's memory
    results = OmegaConf.load(tmp_path / "run" / "optimization_results.yaml")
    assert results.name == "optuna" and abs(results.best_params.x - 0.3) < 0.3


def test_a_deleted_key_does_not_stop_the_best_preset(tmp_path):
    presets = tmp_path / "presets"
    proc, lines = _search(
        tmp_path,
        "x=interval(0.0,1.0)",
        "~note",
        "hydra.sweeper.n_trials=3",
        f"hydra.sweeper.preset_dir={presets}",
        "hydra.sweeper.best_preset=found_test",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (presets / "found_test.yaml").read_text()
    assert yaml.safe_load(text) == {"x": _study(tmp_path).best_params["x"]}
    assert "experiment=found_test ~note" in text  # the rerun command keeps the deletion a preset cannot hold
    assert [line for line in lines if "test=True" in line]  # and the best config was tested


def test_when_every_trial_fails_the_task_s_own_error_is_shown_and_max_failure_rate_holds(tmp_path):
    proc, lines = _search(tmp_path, "x=interval(0.0,1.0)", "fail=true")  # 6 trials, max_failure_rate 0.5
    assert proc.returncode != 0
    assert "RuntimeError: stand-in failure" in proc.stderr
    assert "No trials are completed" not in proc.stderr + proc.stdout
    assert len(lines) == 4  # stopped at the 4th failure: more than half of the 6 trials
    proc, more = _search(
        tmp_path,
        "x=interval(0.0,1.0)",
        "fail=true",
        "hydra.sweeper.max_failure_rate=1.0",
        "hydra.sweeper.study_name=stand-in-2",
        name="tolerant",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]  # failures were allowed: all 6 ran, none is raised
    assert len(more) - len(lines) == 6
    assert "no trial of study 'stand-in-2' completed (6 failed" in proc.stdout
    assert "RuntimeError: stand-in failure" in proc.stdout and "No trials are completed" not in proc.stderr


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


def test_the_pruning_call_is_a_no_op_outside_a_pruning_search(tmp_path):
    """`search.reporter(cfg, epochs)` (the call the docs give other apps) with a config that has no optuna
    section - a bare app run on its own, Hydra's struct config - or one outside a search: no reporter, no error."""
    bare = OmegaConf.create({"x": 0.5, "trainer": {"epochs": 3}})
    OmegaConf.set_struct(bare, True)  # as Hydra hands it to the task: cfg.optuna would raise
    assert search.reporter(bare, 3) is None
    assert search.reporter(None, 3) is None and search.reporter(bare.get("optuna"), 3) is None
    ours = _compose(REPO / "conf")  # this project's config, outside a search: optuna.trial is null
    assert search.reporter(ours, 3) is None and search.reporter(ours.optuna, 3) is None
    assert search.reporter(config.OptunaTrialConfig(), 3) is None  # run.py passes the typed section
    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    number = study.ask().number
    section = {"storage": storage, "study": "s", "trial": number, "pruner": "none", "warmup_epochs": 1}
    trial = OmegaConf.create({"x": 0.5, "optuna": {**section, "startup_trials": 5}})
    r = search.reporter(trial, 3)  # in a trial, the whole config and its section give the same reporter
    assert r is not None and r.report(1, 0.5) is False and search.reporter(trial.optuna, 3) is not None
    assert study.trials[0].intermediate_values == {1: 0.5}


@pytest.mark.parametrize("name", ["none", "median", "asha", "hyperband"])
def test_pruners(name):
    assert search.make_pruner(name, 1, 5, 10) is not None
    with pytest.raises(search.SearchError, match="choose none, median, asha or hyperband"):
        search.make_pruner("asha2", 1, 5, 10)


@pytest.mark.e2e
def test_optuna_search_through_train_py(tmp_path, mnist_root, cache_dir):
    """A real (tiny) search: trials nested and logged, one pruned, the best config written, tested once; the
    model logged and registered is the tested rerun's, beside its test/acc, not a trial's."""
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
        "mlflow.registered_model=tiny-search",  # log_model and the registry on, as by default
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
    # The model is logged once, in the tested rerun of the best trial, and that is the version registered.
    (version,) = client.search_model_versions("name='tiny-search'")
    assert version.run_id == tested[0].info.run_id
    logged = client.search_logged_models(experiment_ids=[exp.experiment_id])
    assert [m.source_run_id for m in logged] == [tested[0].info.run_id]
    assert [r.info.run_id for r in children if r.data.tags.get("model.logged") == "true"] == [tested[0].info.run_id]
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


def test_the_pareto_front_of_two_objectives_is_marked_and_drawn(tmp_path):
    acc_weights = [(0.90, 100.0), (0.95, 200.0), (0.85, 150.0), (0.95, 200.0), (0.97, 5000.0)]
    front = search.pareto_front(acc_weights, ["maximize", "minimize"])
    assert front == [True, True, False, True, True]
    metrics = {f"r{i}": {"best_val/acc": a, "weights": w} for i, (a, w) in enumerate(acc_weights)}
    rows = [
        {"trial": i, "values": {}, "objective": a, "status": "FINISHED", "run_id": f"r{i}", "note": ""}
        for i, (a, _) in enumerate(acc_weights)
    ]
    rows.append({"trial": 5, "values": {}, "objective": None, "status": "FAILED", "run_id": None, "note": "x"})
    objectives = [("best_val/acc", "maximize"), ("weights", "minimize")]
    search.mark_pareto(rows, objectives, metrics.__getitem__)
    header, body = sweep.table(rows, [])
    assert header[1:4] == ["best_val/acc", "weights", "pareto"]
    assert {row[0]: row[3] for row in body} == {"0": "yes", "1": "yes", "2": "", "3": "yes", "4": "yes", "5": ""}
    files = sweep.write_leaderboard(tmp_path, rows, [])
    assert tmp_path / "pareto.png" in files and (tmp_path / "pareto.png").stat().st_size > 1000
    assert "| pareto |" in (tmp_path / "leaderboard.md").read_text()
    plain = [{k: v for k, v in r.items() if k not in ("scores", "pareto")} for r in rows]
    assert "pareto" not in sweep.table(plain, [])[0]  # a one-objective sweep: no such columns
    assert plots.pareto_png([], [], ("a", "b"), tmp_path / "empty.png").exists()


def test_the_pareto_preset_maximises_accuracy_and_minimises_weights():
    cfg = _compose(REPO / "conf", "experiment=search_pareto")
    assert list(cfg.optuna.objectives) == ["best_val/acc", "weights"]
    assert search.objectives(cfg) == [("best_val/acc", "maximize"), ("weights", "minimize")]
    assert cfg.hydra.sweeper.sampler._target_ == "optuna.samplers.NSGAIISampler"
    assert cfg.hydra.sweeper.pruner == "none" and not cfg.hydra.sweeper.test_best
    assert search.objectives(_compose(REPO / "conf", "experiment=search")) == []
    assert search.objective_values({"best_val/acc": 0.9, "weights": 5, "x": 1}, ["best_val/acc", "weights"]) == (0.9, 5)
    with pytest.raises(search.SearchError, match="weights not among"):
        search.objective_values({"best_val/acc": 0.9}, ["best_val/acc", "weights"])


def test_several_objectives_refuse_pruning_and_a_single_best(tmp_path):
    proc, lines = _search(tmp_path, "x=interval(0.0,1.0)", "hydra.sweeper.direction=[maximize,minimize]")
    assert proc.returncode != 0 and "cannot prune a study of 2 objectives" in proc.stderr and not lines
    proc, lines = _search(
        tmp_path, "x=interval(0.0,1.0)", "hydra.sweeper.direction=[maximize,minimize]", "hydra.sweeper.pruner=none"
    )
    assert proc.returncode != 0 and "hydra.sweeper.best_preset=null hydra.sweeper.test_best=false" in proc.stderr


@pytest.mark.e2e
def test_pareto_search_through_train_py(tmp_path, mnist_root, cache_dir):
    """experiment=search_pareto, tiny: trials return (val/acc, weights), the leaderboard and its plot mark the front."""
    from mlflow import MlflowClient

    from conftest import train_py

    proc = train_py(
        "-m",
        "experiment=search_pareto",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.sampler.population_size=2",
        "model.hidden=choice(16,32,64)",  # the command line's space replaces the preset's for these keys
        "model.depth=1",
        "trainer.epochs=1",
        "mlflow.log_model=false",
        f"data.root={mnist_root}",
        f"data.cache_dir={cache_dir}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("mnist-sweep")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert 1 <= len(children) <= 4 and all("weights" in r.data.metrics for r in children)
    assert {"leaderboard.md", "pareto.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    study = optuna.load_study(study_name="mnist-sweep-pareto", storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    assert len(study.trials) == 4 and all(len(t.values) == 2 for t in study.trials)
    assert all(t.params["model.hidden"] in (16, 32, 64) and "model.depth" not in t.params for t in study.trials)
    board = proc.stdout + proc.stderr
    assert "| pareto |" in board and "| yes |" in board
    results = OmegaConf.load(next(tmp_path.glob("outputs/multirun/*/*/optimization_results.yaml")))
    assert results.solutions and all(len(s["values"]) == 2 for s in results.solutions)
