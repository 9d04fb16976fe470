"""Sweeps end to end: `train.py -m` on the real MNIST files, checked through MlflowClient (issue 3).

Kept small: 1-3 epochs of 16-64 unit models without logging the model, so the whole file runs in about a minute.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal

import mlflow
import pytest
from mlflow import MlflowClient

from conftest import raw_test_images, read_until, start_train_py, train_py
from mnist_sweep import sweep

pytestmark = pytest.mark.e2e

SMALL = ("trainer.epochs=1", "mlflow.log_model=false")


def _store(workdir):
    uri = f"sqlite:///{workdir}/mlruns/mlflow.db"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("mnist-sweep")
    runs = client.search_runs([exp.experiment_id], max_results=1000) if exp else []
    parents = [r for r in runs if r.data.tags.get(sweep.ROLE) == "sweep"]
    trials = [r for r in runs if r.data.tags.get(sweep.ROLE) != "sweep"]
    return client, parents, trials


def _data(mnist_root, cache_dir):
    return (f"data.root={mnist_root}", f"data.cache_dir={cache_dir}")


def _leaderboard(client, parent_id) -> list[dict[str, str]]:
    path = client.download_artifacts(parent_id, "leaderboard.csv")
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def failing_sweep(tmp_path_factory, mnist_root, cache_dir):
    """Three trials, one of which diverges at once (lr 1e6). Models on (the default): the best gets one.

    The digits are deskewed (data.deskew), so the logged model must deskew raw images itself. Shared by the tests
    below, which only read it: a test that launches again does so in its own folder.
    """
    workdir = tmp_path_factory.mktemp("failing_sweep")
    common = ("model.hidden=16", "trainer.epochs=1", "data.deskew=true", *_data(mnist_root, cache_dir))
    args = ("-m", "optimizer.lr=0.001,1e6,0.003", *common)
    proc = train_py(*args, cwd=workdir)
    return workdir, args, proc


def test_trials_are_nested_under_one_parent_that_records_the_sweep(failing_sweep):
    workdir, _, proc = failing_sweep
    client, parents, trials = _store(workdir)
    assert len(parents) == 1, proc.stderr[-3000:]
    parent = parents[0]
    p = parent.data.params
    assert p["sweep.n_trials"] == "3" and p["sweep.swept_keys"] == "optimizer.lr"
    assert p["sweep.sweeper"] == "BasicSweeper" and p["sweep.launcher"] == "BasicLauncher"
    assert "optimizer.lr=0.001,1e6,0.003" in p["sweep.overrides"].split()
    assert parent.data.tags[sweep.SWEEP_DIR].startswith(str((workdir / "outputs" / "multirun").resolve()))
    assert len(trials) == 3
    assert {t.data.tags["mlflow.parentRunId"] for t in trials} == {parent.info.run_id}
    assert sorted(t.data.tags["hydra.job.num"] for t in trials) == ["0", "1", "2"]


def test_only_the_best_trial_gets_a_logged_model_when_the_sweep_ends(failing_sweep, mnist_root):
    import numpy as np

    from mnist_sweep import tracking

    workdir, _, proc = failing_sweep
    client, parents, trials = _store(workdir)
    finished = [t for t in trials if t.info.status == "FINISHED"]
    best = max(finished, key=lambda t: t.data.metrics["val/acc"])
    with_model = [t for t in trials if t.data.tags.get(tracking.MODEL_LOGGED) == "true"]
    assert [t.info.run_id for t in with_model] == [best.info.run_id], proc.stderr[-2000:]
    assert all(client.list_artifacts(t.info.run_id, "checkpoint") for t in finished)  # every trial keeps weights
    images, labels = raw_test_images(mnist_root)
    scores = np.asarray(mlflow.pyfunc.load_model(f"runs:/{best.info.run_id}/model").predict(images))
    assert (scores.argmax(1) == labels).mean() > 0.8
    assert "data: mnist, deskewed, via tensor loader" in proc.stdout + proc.stderr  # the progress output says so
    # Raw images in: the model does the training preprocessing (deskew, then Normalize) itself.
    import torch

    from mnist_sweep import data, model

    ckpt = torch.load(client.download_artifacts(best.info.run_id, "checkpoint/model.pt"), weights_only=True)
    assert ckpt["deskew"] is True
    net = model.build(**ckpt["model_args"])
    net.load_state_dict(ckpt["state_dict"])
    x = (data.deskew(torch.from_numpy(images)) - ckpt["mean"]) / ckpt["std"]
    np.testing.assert_allclose(scores, net.eval()(x).detach().numpy(), rtol=1e-4, atol=1e-4)


def test_a_diverging_trial_fails_alone_and_the_command_exits_non_zero_after_all(failing_sweep):
    workdir, _, proc = failing_sweep
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 of 3 trials failed") and "diverged" in last
    client, parents, trials = _store(workdir)
    by_lr = {t.data.params["optimizer.lr"]: t for t in trials}
    failed = by_lr["1000000.0"]
    assert failed.info.status == "FAILED" and "diverged" in failed.data.tags["error"]
    assert "DivergedError" in open(client.download_artifacts(failed.info.run_id, "traceback.txt")).read()
    for lr in ("0.001", "0.003"):  # the trial after the failed one ran too
        run = by_lr[lr]
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")] == [1]
    assert parents[0].info.status == "FAILED"
    assert parents[0].data.metrics["trials/failed"] == 1 and parents[0].data.metrics["trials/finished"] == 2


def test_leaderboard_lists_swept_keys_objective_and_status_of_every_trial(failing_sweep):
    workdir, _, proc = failing_sweep
    client, parents, trials = _store(workdir)
    parent_id = parents[0].info.run_id
    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert artifacts >= {"leaderboard.csv", "leaderboard.md", "leaderboard.png"}
    rows = _leaderboard(client, parent_id)
    assert list(rows[0]) == ["trial", "optimizer.lr", "best_val/acc", "status", "run_id", "note"]  # swept keys only
    assert [r["status"] for r in rows] == ["FINISHED", "FINISHED", "FAILED"]  # best first, failures last
    best = max(trials, key=lambda t: t.data.metrics.get("best_val/acc", 0))
    assert rows[0]["run_id"] == best.info.run_id
    assert float(rows[0]["best_val/acc"]) == pytest.approx(best.data.metrics["best_val/acc"], abs=1e-4)
    assert "diverged" in rows[2]["note"]
    md = open(client.download_artifacts(parent_id, "leaderboard.md")).read()
    assert "| optimizer.lr |" in md and "FAILED" in md
    # The terminal shows the same table and how to rerun the best trial as a single run.
    assert "Sweep leaderboard (3 of 3 trials: 1 FAILED, 2 FINISHED)" in proc.stdout
    rerun = proc.stdout.split("rerun it with:\n", 1)[1].splitlines()[0]
    assert "train.py" in rerun and f"optimizer.lr={best.data.params['optimizer.lr']}" in rerun and " -m" not in rerun


def test_relaunch_runs_only_what_did_not_finish(tmp_path, mnist_root, cache_dir):
    workdir = tmp_path
    args = ("-m", "optimizer.lr=0.001,1e6,0.003", "model.hidden=16", *SMALL, *_data(mnist_root, cache_dir))
    first = train_py(*args, cwd=workdir)
    assert first.returncode == 1 and "1 of 3 trials failed" in first.stderr, first.stderr[-3000:]
    proc = train_py(*args, cwd=workdir)
    assert proc.returncode == 1, proc.stderr[-3000:]  # the diverging trial ran again, and failed again
    assert proc.stdout.count("skipped: this config already FINISHED") == 2
    client, parents, trials = _store(workdir)
    assert len(parents) == 2
    finished = [t for t in trials if t.info.status == "FINISHED"]
    assert len(finished) == 2 and len({t.data.tags["config_hash"] for t in finished}) == 2  # not trained twice
    assert sum(t.info.status == "FAILED" for t in trials) == 2
    newest = max(parents, key=lambda r: r.info.start_time)
    rows = _leaderboard(client, newest.info.run_id)
    assert sorted(r["note"] for r in rows if r["status"] == "FINISHED") == ["reused: finished before"] * 2
    assert {r["run_id"] for r in rows if r["status"] == "FINISHED"} == {t.info.run_id for t in finished}
    # sweep.rerun=true trains a finished config again (the very same config: args[2:] is everything but the lr).
    proc = train_py("-m", "optimizer.lr=0.001", "sweep.rerun=true", *args[2:], cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipped" not in proc.stdout
    _, _, trials = _store(workdir)
    assert sum(t.info.status == "FINISHED" and t.data.params["optimizer.lr"] == "0.001" for t in trials) == 2


def test_resume_after_kill_9_finishes_each_config_exactly_once(tmp_path, mnist_root, cache_dir):
    args = ("-m", "model.hidden=16,24,32", "trainer.epochs=3", "mlflow.log_model=false", *_data(mnist_root, cache_dir))
    proc = start_train_py(*args, cwd=tmp_path)
    results = 0

    def second_trial_training(line: str) -> bool:  # kill -9 in the middle of the second trial
        nonlocal results
        results += line.startswith("val/acc ")
        return results == 1 and "epoch 1/3" in line

    read_until(proc, second_trial_training, 300)
    proc.send_signal(signal.SIGKILL)
    proc.finish(60)
    client, parents, trials = _store(tmp_path)
    assert [p.info.status for p in parents] == ["RUNNING"]  # nobody could close them...
    assert sorted(t.info.status for t in trials) == ["FINISHED", "RUNNING"]

    relaunch = train_py(*args, cwd=tmp_path)
    assert relaunch.returncode == 0, relaunch.stderr[-3000:]
    assert relaunch.stdout.count("skipped: this config already FINISHED") == 1
    client, parents, trials = _store(tmp_path)
    statuses = [r.info.status for r in parents + trials]
    assert "RUNNING" not in statuses  # ...so the next launch did
    assert sorted(p.info.status for p in parents) == ["FINISHED", "KILLED"]
    # The trial killed in the middle went on from its last saved epoch, in its own run: no second run of it.
    assert len(trials) == 3 and all(t.info.status == "FINISHED" for t in trials)
    assert relaunch.stdout.count("resuming from") + relaunch.stderr.count("resuming from") == 1
    assert sorted(t.data.params["model.hidden"] for t in trials) == ["16", "24", "32"]  # each exactly once
    for t in trials:
        assert [m.step for m in client.get_metric_history(t.info.run_id, "val/acc")] == [1, 2, 3]


def _one_sweep_folder(workdir, jobs: int) -> None:
    """Jobs in worker processes resolve the sweep folder (which ends in the process id) to their parent's."""
    sweeps = [p for p in (workdir / "outputs" / "multirun").glob("*/*") if p.is_dir()]
    assert len(sweeps) == 1, sweeps
    jobs_run = sorted(p.name for p in sweeps[0].iterdir() if p.is_dir() and p.name.isdigit())  # not .submitit/
    assert jobs_run == [str(n) for n in range(jobs)]


def test_parallel_trials_on_a_fresh_store_lose_nothing(tmp_path, mnist_root, cache_dir):
    proc = train_py(
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=4",
        "model.hidden=16,24,32,48",
        *SMALL,
        *_data(mnist_root, cache_dir),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "leaked" not in proc.stderr
    client, parents, trials = _store(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.params["sweep.launcher"] == "JoblibLauncher"
    assert sorted(t.data.params["model.hidden"] for t in trials) == ["16", "24", "32", "48"]
    expected_threads = str(max(1, len(os.sched_getaffinity(0)) // 4))
    for t in trials:
        assert t.info.status == "FINISHED"
        assert t.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert t.data.tags["owner.pid"] != parents[0].data.tags["owner.pid"]  # ran in a worker process
        assert t.data.tags["torch.threads"] == expected_threads  # the cores are divided, not oversubscribed
        for key in ("train/loss", "train/acc", "val/loss", "val/acc", "lr", "epoch_time_s"):
            assert [m.step for m in client.get_metric_history(t.info.run_id, key)] == [1], key
        assert {"test/acc", "best_val/acc", "train_time_s"} <= set(t.data.metrics)
    assert len(_leaderboard(client, parents[0].info.run_id)) == 4
    _one_sweep_folder(tmp_path, jobs=4)


def test_submitit_local_runs_each_trial_in_its_own_process(tmp_path, mnist_root, cache_dir):
    proc = train_py(
        "-m",
        "hydra/launcher=submitit_local",
        "model.hidden=16,32",
        *SMALL,
        *_data(mnist_root, cache_dir),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, parents, trials = _store(tmp_path)
    assert len(parents) == 1 and parents[0].data.params["sweep.launcher"] == "LocalLauncher"
    assert [t.info.status for t in trials] == ["FINISHED", "FINISHED"]
    pids = {t.data.tags["owner.pid"] for t in trials} | {parents[0].data.tags["owner.pid"]}
    assert len(pids) == 3
    assert {t.data.tags["mlflow.parentRunId"] for t in trials} == {parents[0].info.run_id}
    _one_sweep_folder(tmp_path, jobs=2)
    assert (tmp_path / "outputs" / "multirun").is_dir()


def test_seed_axis_is_aggregated_mean_and_std(tmp_path, mnist_root, cache_dir):
    proc = train_py(
        "-m", "seed=0,1", "model.hidden=16", "data.val_size=1000", *SMALL, *_data(mnist_root, cache_dir), cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, parents, trials = _store(tmp_path)
    accs = [t.data.metrics["best_val/acc"] for t in trials]
    path = client.download_artifacts(parents[0].info.run_id, "leaderboard_seeds.csv")
    (row,) = list(csv.DictReader(io.StringIO(open(path).read())))
    assert row["seeds"] == "2"
    assert float(row["best_val/acc mean"]) == pytest.approx(sum(accs) / 2, abs=1e-4)
    assert "Mean ± std over seeds" in proc.stdout


@pytest.mark.parametrize(
    ("override", "fragment"),
    [("mlflow.tracking_uri=http://127.0.0.1:9", "unreachable"), ("data.batch_size=0", "data.batch_size=0")],
)
def test_a_mistake_stops_the_sweep_before_any_trial_in_one_line(tmp_path, mnist_root, cache_dir, override, fragment):
    proc = train_py("-m", "model.hidden=16,32", override, *_data(mnist_root, cache_dir), cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], proc.stderr
    assert "epoch" not in proc.stdout and "Launching" not in proc.stdout
    _, parents, trials = _store(tmp_path)
    assert parents == [] and trials == []  # nothing half-logged


def test_trial_outcome_tags_are_json(failing_sweep):
    client, parents, _ = _store(failing_sweep[0])
    (parent,) = parents  # nothing launched the fixture's sweep again
    tags = {k: json.loads(v) for k, v in parent.data.tags.items() if k.startswith(sweep.TRIAL_PREFIX)}
    assert sorted(t["status"] for t in tags.values()) == ["FAILED", "FINISHED", "FINISHED"]


def test_sigterm_closes_the_sweep_and_its_running_trial_as_killed(tmp_path, mnist_root, cache_dir):
    args = ("-m", "model.hidden=16,24", "trainer.epochs=50", *SMALL[1:], *_data(mnist_root, cache_dir))
    proc = start_train_py(*args, cwd=tmp_path)
    read_until(proc, lambda line: "epoch 1/50" in line, 300)  # the first trial is training
    proc.send_signal(signal.SIGTERM)
    rest = proc.finish(120)
    assert proc.returncode == 130, rest[-2000:]
    client, parents, trials = _store(tmp_path)
    assert [p.info.status for p in parents] == ["KILLED"]
    assert [t.info.status for t in trials] == ["KILLED"]  # the second trial never started
    assert "Sweep leaderboard (1 of 2 trials: 1 KILLED)" in rest
