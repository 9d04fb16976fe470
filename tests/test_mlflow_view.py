"""What the MLflow UI shows of a run, checked without training: short names, the params a run used, its dataset
inputs, its source tags, and the links printed at the end (issue 28). tests/test_ui.py follows a real link in a
browser."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace
from urllib.parse import parse_qs, urlparse

import mlflow
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import REPO, make_dataset
from mnist_sweep import config, data, run, sweep, tracking

CONF = REPO / "conf"


def _compose(*overrides: str):
    """The task's config and Hydra's (with the group choices), as a run gets them."""
    config.register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        task = compose(config_name="config", overrides=list(overrides))
        hc = compose(config_name="config", overrides=list(overrides), return_hydra_config=True).hydra
    return task, hc


def _params(*overrides: str) -> dict:
    return run.params(*_compose(*overrides))


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh SQLite store, current for MLflow in this test; its experiment id."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    experiment_id = tracking.prepare(uri, "view")
    yield uri, experiment_id
    mlflow.set_tracking_uri(None)


# ------------------------------------------------------------------------------------------------------------
# Names
# ------------------------------------------------------------------------------------------------------------


def test_labels_are_the_shortest_suffix_that_tells_keys_apart():
    assert sweep.labels(["model.hidden", "optimizer", "optimizer.lr"]) == {
        "model.hidden": "hidden",
        "optimizer": "optimizer",
        "optimizer.lr": "lr",
    }
    assert sweep.labels(["model.dropout", "data.augment.dropout"]) == {
        "model.dropout": "model.dropout",
        "data.augment.dropout": "augment.dropout",
    }


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0.0031622776601683794", "0.00316"),
        ("1e-4", "0.0001"),
        ("3e-05", "3e-05"),
        ("0.1", "0.1"),
        ("256", "256"),
        ("1024.6", "1025"),
        ("sgd", "sgd"),
        ("'quoted'", "quoted"),
        ("true", "true"),
    ],
)
def test_values_are_rounded_for_names(value, expected):
    assert sweep.shown(value) == expected


def test_a_trial_is_named_by_its_swept_values_only():
    overrides = ["model.hidden=64", "optimizer=sgd", "trainer.epochs=1", "data.root=/somewhere/else"]
    assert sweep.trial_name(["model.hidden", "optimizer"], overrides, 3) == "hidden=64 optimizer=sgd"
    # A search may draw the same values twice: its trials carry their number.
    assert sweep.trial_name(["model.hidden"], overrides, 3, numbered=True) == "#3 hidden=64"


def test_a_long_trial_name_is_cut_and_numbered():
    keys = ["model.hidden", "model.depth", "optimizer.lr", "optimizer.weight_decay", "scheduler.warmup"]
    overrides = ["model.hidden=1024", "model.depth=3", "optimizer.lr=0.000316227766", "optimizer.weight_decay=0.05"]
    overrides.append("scheduler.warmup=0.25")
    name = sweep.trial_name(keys, overrides, 17)
    assert len(name) <= sweep.TRIAL_NAME_MAX and name.startswith("#17 hidden=1024 depth=3 lr=0.000316")
    assert name.endswith("…")


def test_a_single_run_is_named_by_its_overrides_without_where_things_go():
    _, hc = _compose("model.hidden=512", "optimizer=sgd", "data.root=/data", "mlflow.experiment=x")
    assert run.run_name(hc) == "hidden=512 optimizer=sgd"


def _spec(overrides: list[str], sweeper: str = "BasicSweeper") -> dict:
    return {"overrides": overrides, "sweeper": sweeper}


def test_the_sweep_is_named_after_what_it_sweeps():
    spec = _spec(["model.hidden=16,32", "optimizer=sgd,adam", "trainer.epochs=1", "data.root=/x"])
    assert sweep._name(spec, {}) == "sweep hidden=16,32 optimizer=sgd,adam"
    grid = _spec(["experiment=optimizer_shootout"])
    named = sweep._name(grid, {"optimizer": "sgd,adam,adamw", "optimizer.lr": "0.0003,0.001,0.003,0.01,0.03"})
    assert named == "sweep optimizer_shootout optimizer lr"  # with the 3 x 5 values: over SWEEP_NAME_MAX
    small = sweep._name(grid, {"optimizer": "sgd,adam", "optimizer.lr": "0.001,0.003"})
    assert small == "sweep optimizer_shootout optimizer=sgd,adam lr=0.001,0.003"
    search = _spec(["model.hidden=choice(256,512)", "optimizer.lr=tag(log,interval(1e-4,1e-2))"], "OptunaSweeper")
    assert sweep._name(search, {}) == "search hidden=256,512 lr"
    many = _spec([f"model.hidden={','.join(str(16 * k) for k in range(1, 20))}", "seed=0,1,2"])
    assert sweep._name(many, {}) == "sweep hidden seed"  # too long with its values: the keys only
    assert sweep._name(_spec(["experiment=best"]), {}) == "sweep best"


# ------------------------------------------------------------------------------------------------------------
# Params: the settings the run used
# ------------------------------------------------------------------------------------------------------------


def test_params_hold_no_none_and_nothing_unused_by_a_plain_run():
    params = _params()
    assert None not in params.values()
    assert "optimizer.fused" not in params and "data.cache_dir" not in params  # null in the defaults
    assert not [k for k in params if k.startswith(("optuna.", "mlflow.", "sweep."))]
    assert params["data.augment.strength"] == 0.0  # augmentation off: its magnitudes say nothing
    assert not [k for k in params if k.startswith("data.augment.") and k != "data.augment.strength"]
    assert "data.num_workers" not in params  # the tensor loader has no workers
    assert "trainer.progress" not in params
    # What the run did use stays: the one-cycle schedule's start and final multipliers, the model, the data.
    assert params["scheduler.start"] == 0.04 and params["scheduler.final"] == 0.0
    assert params["model.hidden"] == 256 and params["data.name"] == "mnist" and params["seed"] == 0


def test_choice_params_only_where_they_add_information():
    params = _params("model=deep", "optimizer=sgd", "device=cpu")
    assert params["choice.model"] == "deep" and params["choice.scheduler"] == "onecycle"
    assert params["optimizer.name"] == "sgd" and params["device.type"] == "cpu" and params["data.name"] == "mnist"
    # Duplicates of those, a group of one option, where runs are logged, and no preset at all: left out.
    for group in ("optimizer", "device", "data", "trainer", "mlflow", "experiment"):
        assert f"choice.{group}" not in params
    assert _params("experiment=speedrun")["choice.experiment"] == "speedrun"


def test_params_follow_the_features_a_run_uses():
    constant = _params("scheduler=constant")  # no warm-up, no decay
    assert "scheduler.start" not in constant and "scheduler.final" not in constant
    cosine = _params("scheduler=cosine")  # decays, no warm-up
    assert "scheduler.start" not in cosine and cosine["scheduler.final"] == 0.0
    augmented = _params("data.augment.strength=1", "data.augment.elastic_alpha=0")
    assert augmented["data.augment.rotate"] == 12.0 and "data.augment.elastic_sigma" not in augmented
    assert _params("data.augment.strength=1")["data.augment.elastic_sigma"] == 4.0
    assert _params("optimizer.fused=true")["optimizer.fused"] is True
    assert _params("data.loader=torchvision")["data.num_workers"] == 0
    assert _params("data.cache_dir=/tmp/c")["data.cache_dir"] == "/tmp/c"
    sgd = _params("optimizer=sgd", "optimizer.momentum=0", "optimizer.nesterov=false")
    assert "optimizer.nesterov" not in sgd and sgd["optimizer.momentum"] == 0.0
    search = _params("optuna.study=s", "optuna.trial=3", "optuna.storage=sqlite:///o.db")
    assert search["optuna.study"] == "s" and search["optuna.trial"] == 3 and search["optuna.pruner"] == "median"


def test_a_sweeps_columns_are_its_swept_keys_and_the_objective():
    groups = {"model", "optimizer", "scheduler", "data", "device", "trainer", "mlflow", "experiment"}
    assert sweep.columns(["model.hidden", "optimizer", "model"], groups) == [
        "params.`model.hidden`",
        "params.`optimizer.name`",
        "params.`choice.model`",
        "metrics.`best_val/acc`",
    ]
    # Each column is a param a trial logs.
    logged = _params("model=wide", "optimizer=adamw")
    for column in sweep.columns(["model.hidden", "optimizer", "model"], groups)[:-1]:
        assert column[len("params.`") : -1] in logged


# ------------------------------------------------------------------------------------------------------------
# Tags, dataset inputs, progress bars
# ------------------------------------------------------------------------------------------------------------


def test_runs_carry_source_and_user_tags_as_mlflow_start_run_sets_them(store):
    _, experiment_id = store
    with tracking.start_run(experiment_id, "r", {"x": "1"}) as r:
        pass
    tags = mlflow.MlflowClient().get_run(r.id).data.tags
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.user"]
    assert tags["mlflow.source.name"] == mlflow.tracking.context.registry.resolve_tags()["mlflow.source.name"]
    assert tags["x"] == "1" and tags["mlflow.runName"] == "r"


def test_the_experiment_opens_on_model_training(store, tmp_path):
    uri, experiment_id = store
    client = mlflow.MlflowClient()
    assert client.get_experiment(experiment_id).tags[tracking.EXPERIMENT_KIND] == "custom_model_development"
    older = client.create_experiment("older")  # made before the tag existed
    tracking.prepare(uri, "older")
    assert client.get_experiment(older).tags[tracking.EXPERIMENT_KIND] == "custom_model_development"
    mine = client.create_experiment("genai", tags={tracking.EXPERIMENT_KIND: "genai_development"})
    tracking.prepare(uri, "genai")  # a kind someone chose stays
    assert client.get_experiment(mine).tags[tracking.EXPERIMENT_KIND] == "genai_development"


def _dataset_inputs(run_id: str) -> dict[str, object]:
    inputs = mlflow.MlflowClient().get_run(run_id).inputs.dataset_inputs
    return {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in inputs}


def _log_dataset(tmp_path, *overrides: str) -> dict[str, object]:
    task, _ = _compose(f"data.root={tmp_path / 'tiny'}", "data.verify=false", *overrides)
    settings = config.check(task)
    loaders = SimpleNamespace(n_train=100, n_val=20, n_test=40)
    ctx = SimpleNamespace(settings=settings)
    with tracking.start_run(mlflow.get_experiment_by_name("view").experiment_id, "r", {}) as r:
        run._log_dataset(ctx, r, loaders)
    return _dataset_inputs(r.id)


def test_the_dataset_is_logged_as_inputs_with_a_digest_per_split(store, tmp_path):
    make_dataset(tmp_path / "tiny")
    logged = _log_dataset(tmp_path, "data.val_size=20")
    assert set(logged) == {"train", "validation", "test"}
    assert {d.name for d in logged.values()} == {"mnist"}
    assert {json.loads(d.source)["uri"] for d in logged.values()} == {str(tmp_path / "tiny")}
    assert [json.loads(logged[k].profile)["num_rows"] for k in ("train", "validation", "test")] == [100, 20, 40]
    assert len({d.digest for d in logged.values()}) == 3
    again = _log_dataset(tmp_path, "data.val_size=20")
    assert {k: d.digest for k, d in again.items()} == {k: d.digest for k, d in logged.items()}
    # Another split of the same files is another training set; the test set stays the same.
    other = _log_dataset(tmp_path, "data.val_size=30")
    assert other["train"].digest != logged["train"].digest and other["test"].digest == logged["test"].digest
    # Other files: other digests.
    make_dataset(tmp_path / "tiny", seed=1)
    changed = _log_dataset(tmp_path, "data.val_size=20")
    assert changed["train"].digest != logged["train"].digest and changed["test"].digest != logged["test"].digest
    # A run that skips the test set does not list it; nothing of the images is copied into the store.
    assert set(_log_dataset(tmp_path, "data.val_size=20", "trainer.test=false")) == {"train", "validation"}
    assert not list((tmp_path / "mlruns").rglob("*-ubyte*"))


@pytest.mark.parametrize(
    "lost",
    [
        "RestException: BAD_REQUEST: (psycopg.errors.UniqueViolation) duplicate key value violates unique constraint "
        '"dataset_pk" DETAIL:  Key (experiment_id, name, digest)=(1, mnist, 9ed6f087) already exists.',  # seen in CI
        "(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, datasets.name, datasets.digest",
    ],
)
def test_a_trial_that_loses_the_race_to_log_a_new_dataset_links_it_on_a_second_try(store, tmp_path, monkeypatch, lost):
    """Parallel launches' trials log the same new dataset at once; the later insert fails on its key (CI, two
    launchers on a PostgreSQL-backed server): the run is linked to the dataset the other made, not failed."""
    make_dataset(tmp_path / "tiny")
    real, calls = mlflow.MlflowClient.log_inputs, []

    def racing(self, run_id, datasets=None, models=None):
        calls.append(run_id)
        if len(calls) == 1:
            raise mlflow.exceptions.MlflowException(lost)
        return real(self, run_id, datasets=datasets, models=models)

    monkeypatch.setattr(mlflow.MlflowClient, "log_inputs", racing)
    assert set(_log_dataset(tmp_path, "data.val_size=20")) == {"train", "validation", "test"} and len(calls) == 2
    calls.clear()
    monkeypatch.setattr(mlflow.MlflowClient, "log_inputs", lambda *a, **k: calls.append(1) or 1 / 0)
    with pytest.raises(ZeroDivisionError):  # anything else is not retried
        _log_dataset(tmp_path, "data.val_size=20")
    assert calls == [1]


def test_verified_files_are_described_by_their_published_checksums(store, tmp_path, monkeypatch):
    make_dataset(tmp_path / "tiny")
    hashed = []
    monkeypatch.setattr(data, "sha256_of", lambda path: hashed.append(path) or "x")
    task, _ = _compose(f"data.root={tmp_path / 'tiny'}", "data.verify=true")
    ctx = SimpleNamespace(settings=config.check(task))
    with tracking.start_run(mlflow.get_experiment_by_name("view").experiment_id, "r", {}) as r:
        run._log_dataset(ctx, r, SimpleNamespace(n_train=100, n_val=20, n_test=40))
    assert not hashed  # checked already (data.verify): the published hashes stand for the files, no re-read
    assert len(_dataset_inputs(r.id)) == 3


def test_quiet_turns_mlflows_artifact_progress_bars_off(monkeypatch):
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    tracking.quiet()
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR

    assert MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.get() is False
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "true")  # a user's own choice stays
    tracking.quiet()
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "true"


# ------------------------------------------------------------------------------------------------------------
# Links
# ------------------------------------------------------------------------------------------------------------


def test_the_ui_base_is_the_setting_else_the_server_else_mlflow_uis_default():
    assert tracking.ui_base("http://ui.example.org:8080/", "sqlite:///m.db") == "http://ui.example.org:8080"
    assert tracking.ui_base(None, "https://mlflow.example.org/") == "https://mlflow.example.org"
    assert tracking.ui_base(None, "sqlite:///mlruns/mlflow.db") == "http://127.0.0.1:5000"
    assert tracking.serve_hint(None, "sqlite:///mlruns/mlflow.db").strip() == (
        "(start it: mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db)"
    )
    assert tracking.serve_hint(None, "http://h:5000") == "" and tracking.serve_hint("http://u", "sqlite:///a") == ""


def test_a_run_link_opens_its_page_in_the_model_training_view():
    url = tracking.run_link("http://127.0.0.1:5000", "7", "abc")
    assert url == "http://127.0.0.1:5000/#/experiments/7/runs/abc?workflowType=machine_learning"


def test_the_comparison_link_opens_a_saved_view_of_the_trials(store):
    _, experiment_id = store
    columns = ["params.`model.hidden`", "metrics.`best_val/acc`"]
    trials = "tags.`mlflow.parentRunId` = 'p1'"
    url = tracking.comparison_link("http://h:5000", experiment_id, "p1", "sweep hidden=16,32", trials, columns)
    route, _, query = urlparse(url).fragment.partition("?")
    assert url.startswith("http://h:5000/#/") and route == f"/experiments/{experiment_id}/runs"
    assert parse_qs(query) == {"workflowType": ["machine_learning"], "viewStateShareKey": ["p1"]}
    saved = mlflow.MlflowClient().get_experiment(experiment_id).tags[tracking.SHARED_VIEW + "p1"]
    envelope = json.loads(saved)  # what the UI's own "save view" writes: name, times, and the state as JSON text
    assert envelope["name"] == "sweep hidden=16,32" and isinstance(envelope["createdAt"], int)
    state = json.loads(envelope["state"])
    assert state["searchFilter"] == trials and state["selectedColumns"] == columns
    assert state["orderByKey"] == "metrics.`best_val/acc`" and state["orderByAsc"] is False


def test_a_sweeps_view_filters_its_trials_and_shows_its_keys(store):
    uri, experiment_id = store
    cfg = OmegaConf.create(
        {
            "mlflow": {"ui_url": None, "tracking_uri": uri},
            "hydra": {"runtime": {"choices": {"optimizer": "adam", "model": "mlp"}}},
        }
    )
    spec = {"swept_keys": ["model.hidden", "optimizer"]}
    url = sweep._comparison(cfg, experiment_id, "parent9", spec, "sweep x")
    assert url.startswith("http://127.0.0.1:5000/#/experiments/") and "viewStateShareKey=parent9" in url
    tags = mlflow.MlflowClient().get_experiment(experiment_id).tags
    state = json.loads(json.loads(tags[tracking.SHARED_VIEW + "parent9"])["state"])
    assert state["searchFilter"] == "tags.`mlflow.parentRunId` = 'parent9'"
    assert state["selectedColumns"] == ["params.`model.hidden`", "params.`optimizer.name`", "metrics.`best_val/acc`"]


def test_render_ends_with_the_comparison_link(tmp_path):
    s = sweep.Sweep("p", "1", str(tmp_path), {"n_trials": 1, "swept_keys": ["seed"]}, "python train.py -m seed=0")
    s.link = "http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning&viewStateShareKey=p"
    row = {"trial": 0, "values": {"seed": "0"}, "objective": 0.5, "status": "FINISHED", "run_id": "r", "overrides": []}
    text = sweep.render([row], ["seed"], row, s)
    assert text.rstrip().splitlines()[-1] == f"compare the trials in MLflow: {s.link}"
