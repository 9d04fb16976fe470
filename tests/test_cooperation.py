"""Two launches of the same sweep (two terminals, a scheduler's retry) train each config once between them
(issue 31, item 5): a trial's MLflow run is its claim on the config; a claim whose process is alive is waited for,
then its result reused; one whose process is gone is taken over."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from conftest import make_dataset, start_train_py
from mnist_sweep import tracking, trial

pytestmark = pytest.mark.e2e

GRID = ("model.hidden=8,16,24", "trainer.epochs=3", "data.batch_size=4", "mlflow.log_model=false")
QUIET = ("data.val_size=20", "data.verify=false", "hydra.sweep.dir=multirun/same")


def test_two_launches_of_one_sweep_in_one_folder_train_each_config_once(tmp_path):
    make_dataset(tmp_path / "data", n_train=3000, n_test=40)
    args = ("-m", *GRID, *QUIET, f"data.root={tmp_path / 'data'}", f"data.cache_dir={tmp_path / 'cache'}")
    first = start_train_py(*args, cwd=tmp_path)
    first.read_until(lambda line: "epoch 1/" in line, 300)  # the first launch is training its first config
    second = start_train_py(*args, cwd=tmp_path)
    second.finish(600)
    first.finish(600)
    assert (first.returncode, second.returncode) == (0, 0), "".join(first.lines + second.lines)[-3000:]
    assert "waiting for it" in "".join(second.lines)  # it met the first launch's live run

    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("mnist-sweep").experiment_id])
    parents = [r for r in runs if r.data.tags.get(trial.ROLE) == "sweep"]
    trained = [r for r in runs if r.data.tags.get(trial.ROLE) != "sweep"]
    assert len(parents) == 2 and {r.info.status for r in parents} == {"FINISHED"}
    hashes = [r.data.tags["config_hash"] for r in trained]
    assert len(hashes) == 3 == len(set(hashes))  # each config trained once, by one of the launches
    assert {r.info.status for r in trained} == {"FINISHED"}
    for parent in parents:  # each launch's leaderboard lists the three configs, trained or reused
        outcomes = [k for k in parent.data.tags if k.startswith(trial.TRIAL_PREFIX)]
        assert len(outcomes) == 3, parent.data.tags


def test_a_claim_is_the_earliest_live_run_of_the_config(tmp_path):
    """Two runs of one config made at the same moment: both launches agree the earlier one trains it; a run of a
    dead process, or another host's that stopped logging, claims nothing."""
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    experiment_id = tracking.prepare(uri, "claims")
    client = MlflowClient(uri)
    me = tracking.owner_tags()
    dead = {**me, "owner.pid": "999999999"}
    stale = {"owner.host": "another-node", "owner.pid": "1"}
    for tags, start in ((dead, 1), (stale, 2), (me, 3), (me, 4)):
        client.create_run(experiment_id, start_time=start * 1000, tags={**tags, "config_hash": "h"})
    earlier, later = sorted(
        client.search_runs([experiment_id], "tags.owner.pid = '" + me["owner.pid"] + "'"),
        key=lambda r: r.info.start_time,
    )
    assert trial.live_claim(experiment_id, "h").info.run_id == earlier.info.run_id
    assert trial.live_claim(experiment_id, "h", me=earlier.info.run_id) is None  # it goes on: it came first
    assert trial.live_claim(experiment_id, "h", me=later.info.run_id).info.run_id == earlier.info.run_id
    assert trial.live_claim(experiment_id, "other") is None
