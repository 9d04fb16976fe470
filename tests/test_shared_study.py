"""One search, many launchers (issue 29, item 3): launchers pointed at the same study storage run n_trials in
total between them, no trial twice, and all report the same best.

The SQLite case drives the stand-in app of test_search.py (seconds); the PostgreSQL case runs train.py on tiny
synthetic data against a real PostgreSQL (started by scripts/tracking_server.sh, with its MLflow server).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from test_search import _app
from test_tracking_server import server  # noqa: F401  (the fixture: PostgreSQL and an MLflow server)

from conftest import REPO, make_dataset
from hydra_plugins.mnist_sweep_optuna import _impl
from mnist_sweep import search

BEST = re.compile(r"best trial #(\d+): value (\S+) with (.*)")


def _launch_together(args: list[str], envs: list[dict], cwd: Path, timeout: int = 420) -> list[str]:
    """Start one process per env within a second, wait for all (each with a deadline), return their outputs."""
    procs = []
    for env in envs:
        procs.append(
            subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
        time.sleep(0.3)
    outputs = []
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
                p.wait(timeout=30)
            pytest.fail(f"a launcher still ran after {timeout} s")
        outputs.append(out)
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out[-3000:]
    return outputs


def _check_study(study, outputs: list[str], n_trials: int) -> list:
    counted = [t for t in study.trials if not t.user_attrs.get(_impl.SURPLUS_ATTR)]
    assert len(counted) == n_trials, [(t.number, t.state, t.user_attrs) for t in study.trials]
    assert all(t.state.is_finished() and t.state != optuna.trial.TrialState.FAIL for t in counted)
    assert len({t.user_attrs[_impl.OWNER_ATTR] for t in counted}) == 2  # both launchers ran some
    bests = [BEST.findall(out) for out in outputs]
    assert all(len(b) == 1 for b in bests), outputs[0][-2000:]
    assert bests[0] == bests[1] and int(bests[0][0][0]) == study.best_trial.number  # the same best, the study's
    for out in outputs:
        assert "UpdateFinishedTrialError" not in out and "Traceback" not in out
    return counted


def test_two_launchers_share_a_sqlite_study(tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    optuna.create_study(study_name="stand-in", storage=storage, direction="maximize")  # tables exist before the race
    envs = [
        {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "SWEEP_LOG": str(tmp_path / f"trials{i}.log"),
            "SWEEP_DIR": str(tmp_path / f"run{i}"),
            "SWEEP_STORAGE": storage,
        }
        for i in range(2)
    ]
    args = [sys.executable, str(_app(tmp_path)), "-m", "x=interval(0.0,1.0)", "hydra.sweeper.n_trials=6"]
    outputs = _launch_together(args, envs, tmp_path)
    study = optuna.load_study(study_name="stand-in", storage=storage)
    counted = _check_study(study, outputs, 6)
    logs = [(tmp_path / f"trials{i}.log").read_text().splitlines() for i in range(2)]
    ran = [{line.split()[0] for line in lines if "test=False" in line} for lines in logs]
    assert not ran[0] & ran[1]  # no trial ran in both
    assert ran[0] | ran[1] == {f"trial={t.number}" for t in counted}  # and each counted trial ran
    tests = [line for lines in logs for line in lines if "test=True" in line and "epoch=1" in line]
    assert len(tests) == 1  # the best config is tested once, by the launcher that ran it


def _create_database(folder: Path, name: str) -> str:
    """A database of its own for the study, in the PostgreSQL of scripts/tracking_server.sh; its URL."""
    import psycopg

    port = int((folder / "pg" / "postmaster.pid").read_text().splitlines()[3])
    with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"postgresql+psycopg://postgres@127.0.0.1:{port}/{name}"


def test_two_launchers_share_a_postgresql_study(server, tmp_path):  # noqa: F811
    from mlflow import MlflowClient

    uri, folder = server
    storage = _create_database(folder, "shared_study")
    make_dataset(tmp_path / "tiny", n_train=200)
    MlflowClient(uri).create_experiment("shared")  # not created by two launchers at once
    args = [
        sys.executable,
        str(REPO / "train.py"),
        "-m",
        "hydra/sweeper=optuna",
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.n_trials=6",
        "hydra.sweeper.best_preset=null",
        "hydra.sweeper.test_best=false",
        "hydra.sweeper.startup_trials=2",
        "model.hidden=choice(8,16,24,32)",
        "optimizer.lr=tag(log,interval(1e-4,1e-2))",
        "trainer.epochs=2",
        f"data.root={tmp_path / 'tiny'}",
        "data.val_size=40",
        "data.verify=false",
        "data.download=false",
        "mlflow.experiment=shared",
        "mlflow.log_model=false",
        f"mlflow.tracking_uri={uri}",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    outputs = _launch_together(args, [env, env], tmp_path)
    study = optuna.load_study(study_name="shared-search", storage=storage)
    counted = _check_study(study, outputs, 6)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("shared").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    trials = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 2 and all(r.info.status == "FINISHED" for r in parents)
    numbers = [r.data.params["optuna.trial"] for r in trials]
    assert sorted(numbers) == sorted(str(t.number) for t in counted)  # each trial once, none lost
    for parent in parents:  # each launcher's run lists the trials it ran
        rows = [json.loads(v) for k, v in parent.data.tags.items() if k.startswith("trial.")]
        mine = {r.info.run_id for r in trials if r.data.tags["mlflow.parentRunId"] == parent.info.run_id}
        assert rows and {row["run_id"] for row in rows} == mine


def test_an_unreachable_study_storage_is_one_line_before_any_trial(tmp_path):
    args = [
        sys.executable,
        str(REPO / "train.py"),
        "-m",
        "hydra/sweeper=optuna",
        "hydra.sweeper.storage=postgresql+psycopg://postgres@127.0.0.1:9/none",
        "model.hidden=choice(8,16)",
        f"data.root={tmp_path / 'absent'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
    ]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "hydra.sweeper.storage=postgresql+psycopg://postgres@127.0.0.1:9/none" in line  # the storage
    assert "cannot open the study database" in line and "Connection refused" in line  # what is wrong
    assert "scripts/tracking_server.sh start" in line and "fix the URL" in line  # and the fix
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob(".hydra"))  # no trial ran
    # Refused before the sweep's MLflow parent run was created: no run at all, not even a deleted one.
    store = tmp_path / "mlflow.db"
    runs = _all_runs(f"sqlite:///{store}") if store.exists() else []
    assert runs == [] and not store.exists()  # nothing was written to the MLflow store


def _all_runs(uri: str) -> list:
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return list(client.search_runs(experiments, run_view_type=ViewType.ALL)) if experiments else []


@pytest.mark.parametrize(
    "lost",
    [
        'duplicate key value violates unique constraint "pg_type_typname_nsp_index"',  # PostgreSQL's catalogue
        "(sqlite3.IntegrityError) UNIQUE constraint failed: alembic_version.version_num",  # SQLite: the schema stamp
    ],
)
def test_a_launcher_that_loses_the_race_to_create_the_tables_opens_the_study_again(tmp_path, monkeypatch, lost):
    """Two launchers meeting a new database both create Optuna's tables; the loser's CREATE fails (on
    PostgreSQL's catalogue, seen once in this file's PostgreSQL test; on the schema's version stamp in a new
    SQLite file, seen once in CI's side-by-side searches): it opens the storage again, once made."""
    from hydra_plugins.mnist_sweep_optuna import _impl

    real, calls = optuna.storages.RDBStorage, []

    def racing(url, **kwargs):
        calls.append(url)
        if len(calls) == 1:
            raise RuntimeError(lost)
        return real(url, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    url = f"sqlite:///{tmp_path}/optuna.db"
    assert isinstance(_impl._open_storage(url), real) and len(calls) == 2
    calls.clear()
    monkeypatch.setattr(optuna.storages, "RDBStorage", lambda url, **kw: calls.append(url) or 1 / 0)
    with pytest.raises(_impl.SearchError, match="cannot open the study database"):  # anything else: one line
        _impl._open_storage(url)
    assert len(calls) == 1


_OTHER_LAUNCHER = """
import json, sys
import optuna
from mnist_sweep import search
storage, study = sys.argv[1], sys.argv[2]
trial = optuna.load_study(study_name=study, storage=storage).ask()  # what a launcher does before it starts a trial
section = {"storage": storage, "study": study, "trial": trial.number, "pruner": "median", "warmup_epochs": 0,
           "startup_trials": 2}
r = search.reporter({"optuna": section}, 5)
print(json.dumps({"trial": trial.number, "pruned": r.report(1, 0.10)}))
"""


@pytest.mark.parametrize("others_reported", [True, False])
def test_pruning_is_shared_a_trial_is_judged_against_the_other_launchers_trials(tmp_path, others_reported):
    """A trial in another process is pruned by the epochs the first launcher's trials reported in the shared study;
    in a study without them (the control) the same report goes on: nothing is judged from a launcher's own memory."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="shared", storage=storage, direction="maximize")
    if others_reported:
        for _ in range(3):  # this launcher's trials: 0.9 at epoch 1, each through the reporter a trial uses
            trial = study.ask()
            section = {"storage": storage, "study": "shared", "trial": trial.number, "pruner": "median"}
            r = search.reporter({"optuna": {**section, "warmup_epochs": 0, "startup_trials": 2}}, 5)
            assert r.report(1, 0.90) is False
            study.tell(trial, 0.90)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _OTHER_LAUNCHER, storage, "shared"], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    outcome = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outcome == {"trial": 3 if others_reported else 0, "pruned": others_reported}
