"""Fast checks of the sweep machinery (mnist_sweep/sweep.py, tracking.close_orphans) without training."""

from __future__ import annotations

import contextlib
import csv
import os
import subprocess
import sys

import mlflow
import pytest
from omegaconf import OmegaConf

from conftest import REPO
from mnist_sweep import sweep, tracking, trial


def launcher(target: str, **kw):
    return OmegaConf.create({"_target_": f"hydra_plugins.x.{target}", **kw})


@pytest.mark.parametrize(
    ("conf", "n_trials", "cores", "jobs", "threads"),
    [
        (None, 6, 8, 1, 0),  # the basic launcher: one at a time, torch's default threads
        (launcher("JoblibLauncher", n_jobs=2), 6, 2, 2, 1),
        (launcher("JoblibLauncher", n_jobs=4), 6, 16, 4, 4),
        (launcher("JoblibLauncher", n_jobs=-1), 6, 4, 4, 1),  # joblib's -1: one per core
        (launcher("JoblibLauncher", n_jobs=8), 2, 8, 2, 4),  # never more at once than there are trials
        (launcher("JoblibLauncher", n_jobs=4), 6, 2, 4, 1),  # at least one thread
        (launcher("LocalLauncher"), 3, 12, 3, 4),  # submitit_local starts every trial at once
        (launcher("SlurmLauncher", cpus_per_task=6), 100, 64, 1, 6),  # the cluster gives each trial its cores
    ],
)
def test_parallel_trials_divide_the_cores(conf, n_trials, cores, jobs, threads):
    assert trial.parallel_jobs(conf, n_trials, cores) == jobs
    assert trial.trial_threads(conf, n_trials, cores) == threads


def test_gpus_are_dealt_round_robin_to_parallel_trials():
    assert [trial.trial_device("cuda", k, 4, 2) for k in range(4)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert trial.trial_device("cuda", 3, 1, 2) == "cuda"  # sequential trials keep the default device
    assert trial.trial_device("cuda", 3, 2, 1) == "cuda"


def test_definition_counts_trials_and_names_swept_keys():
    config = OmegaConf.create(
        {
            "hydra": {
                "overrides": {"task": ["model.hidden=16,32", "seed=0,1,2", "trainer.epochs=1", "optimizer=adam,sgd"]},
                "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": None},
                "launcher": {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"},
            }
        }
    )
    spec = sweep.definition(config)
    assert spec["n_trials"] == 12 and spec["swept_keys"] == ["model.hidden", "seed", "optimizer"]
    assert spec["sweeper"] == "BasicSweeper" and spec["launcher"] == "JoblibLauncher"


def test_definition_includes_sweeper_params_and_explicit_trial_counts():
    config = OmegaConf.create(
        {
            "hydra": {
                "overrides": {"task": ["trainer.epochs=1"]},
                "sweeper": {"_target_": "x.OptunaSweeper", "params": {"model.depth": "1,2"}, "n_trials": 20},
                "launcher": {"_target_": "x.BasicLauncher"},
            }
        }
    )
    spec = sweep.definition(config)
    assert spec["n_trials"] == 20 and spec["swept_keys"] == ["model.depth"]


def _row(trial, hidden, seed, objective, status="FINISHED", note=""):
    return {
        "trial": trial,
        "values": {"model.hidden": hidden, "seed": seed},
        "objective": objective,
        "status": status,
        "run_id": f"run{trial}",
        "overrides": [f"model.hidden={hidden}", f"seed={seed}"],
        "note": note,
    }


def test_leaderboard_files_rank_trials_and_aggregate_seeds(tmp_path):
    rows = [
        _row(0, "64", "0", 0.90),
        _row(1, "64", "1", 0.92),
        _row(2, "128", "0", 0.95),
        _row(3, "128", "1", None, "FAILED", "DivergedError: boom"),
    ]
    files = sweep.write_leaderboard(tmp_path, rows, ["model.hidden", "seed"])
    assert {f.name for f in files} == {"leaderboard.csv", "leaderboard.md", "leaderboard_seeds.csv", "leaderboard.png"}
    with open(tmp_path / "leaderboard.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["trial"] for r in table] == ["2", "1", "0", "3"]  # best first, failures last
    assert table[-1]["status"] == "FAILED" and table[-1]["note"] == "DivergedError: boom"
    with open(tmp_path / "leaderboard_seeds.csv") as f:
        seeds = {r["model.hidden"]: r for r in csv.DictReader(f)}
    assert seeds["64"]["seeds"] == "2" and float(seeds["64"]["best_val/acc mean"]) == pytest.approx(0.91)
    assert float(seeds["64"]["best_val/acc std"]) == pytest.approx(0.01414, abs=1e-4)
    assert seeds["128"]["seeds"] == "1"  # the failed seed is not averaged in
    assert (tmp_path / "leaderboard.png").stat().st_size > 1000


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    experiment_id = tracking.prepare(uri, "unit")
    yield mlflow.MlflowClient(uri), experiment_id


def test_runs_of_dead_processes_are_closed_as_killed_on_the_next_launch(store):
    client, experiment_id = store
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=60)
    dead = client.create_run(experiment_id, tags={**tracking.owner_tags(), "owner.pid": str(gone.pid)})
    alive = client.create_run(experiment_id, tags=tracking.owner_tags())  # this very process
    remote = client.create_run(experiment_id, tags={"owner.host": "another-node", "owner.pid": str(gone.pid)})
    legacy = client.create_run(experiment_id)  # no owner recorded: not ours to judge
    assert tracking.close_orphans(experiment_id) == [dead.info.run_id]
    status = {r: client.get_run(r.info.run_id).info.status for r in (dead, alive, remote, legacy)}
    assert status == {dead: "KILLED", alive: "RUNNING", remote: "RUNNING", legacy: "RUNNING"}


def test_a_reused_pid_is_not_mistaken_for_the_owner(store):
    client, experiment_id = store
    tags = {**tracking.owner_tags(), "owner.started": "1"}  # our pid, but a process that started at another time
    run = client.create_run(experiment_id, tags=tags)
    assert tracking.close_orphans(experiment_id) == [run.info.run_id]


def test_a_requeued_slurm_job_closes_its_earlier_start_on_any_node(store, monkeypatch):
    """SLURM kills a requeued job's processes and starts it again under the same id, maybe on another node:
    the run of the earlier start (RUNNING if its process was killed before closing it) is closed, so the new
    start can go on in it; a run of the same allocation's current start, or of another job, is left alone."""
    client, experiment_id = store
    elsewhere = {"owner.host": "another-node", "owner.pid": "1"}
    earlier = client.create_run(experiment_id, tags={**elsewhere, "slurm.job_id": "41", "slurm.restart_count": "0"})
    current = client.create_run(experiment_id, tags={**elsewhere, "slurm.job_id": "41", "slurm.restart_count": "1"})
    other = client.create_run(experiment_id, tags={**elsewhere, "slurm.job_id": "42", "slurm.restart_count": "0"})
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert tracking.close_orphans(experiment_id) == []  # the first start sees no earlier one
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert tracking.close_orphans(experiment_id) == [earlier.info.run_id]
    assert {client.get_run(r.info.run_id).info.status for r in (current, other)} == {"RUNNING"}


def test_a_continued_run_is_running_again_until_it_ends(store):
    """The reopen path (resume=RUN_ID, a relaunched sweep, a requeued SLURM job): the interrupted run goes back
    to RUNNING while it trains, keeps its id and history, loses the old error, and ends FINISHED or KILLED."""
    client, experiment_id = store
    run_id = client.create_run(experiment_id, tags={"error": "KeyboardInterrupt: "}).info.run_id
    client.log_metric(run_id, "val/acc", 0.5, step=1)
    client.set_terminated(run_id, "KILLED")
    for ending, interrupted in (("KILLED", True), ("FINISHED", False)):
        with contextlib.suppress(KeyboardInterrupt):
            with tracking.start_run(experiment_id, "ignored", {}, reopen=run_id) as run:
                assert run.id == run_id
                live = client.get_run(run_id)
                assert live.info.status == "RUNNING" and "error" not in live.data.tags
                assert live.data.tags["owner.pid"] == str(os.getpid())  # this process owns it now
                if interrupted:
                    raise KeyboardInterrupt
                run.log_metrics({"val/acc": 0.6}, step=2)
        assert client.get_run(run_id).info.status == ending
    assert [m.step for m in client.get_metric_history(run_id, "val/acc")] == [1, 2]
    assert [r.info.run_id for r in client.search_runs([experiment_id])] == [run_id]  # no second run


def test_previous_result_finds_only_finished_runs_of_the_same_config(store):
    client, experiment_id = store
    failed = client.create_run(experiment_id, tags={"config_hash": "abc"})
    client.log_metric(failed.info.run_id, "best_val/acc", 0.5)
    client.set_terminated(failed.info.run_id, "FAILED")
    assert trial.previous_result(experiment_id, "abc") is None
    done = client.create_run(experiment_id, tags={"config_hash": "abc"})
    client.log_metric(done.info.run_id, "best_val/acc", 0.97)
    client.set_terminated(done.info.run_id, "FINISHED")
    other = client.create_run(experiment_id, tags={"config_hash": "xyz"})
    client.set_terminated(other.info.run_id, "FINISHED")
    found = trial.previous_result(experiment_id, "abc")
    assert found.info.run_id == done.info.run_id and found.data.metrics["best_val/acc"] == 0.97
    assert trial.previous_result(experiment_id, "xyz") is None  # finished, but without an objective


def test_a_missing_launcher_plugin_is_named_with_its_package():
    from mnist_sweep import cli

    e = RuntimeError("Unknown plugin class : 'hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher'")
    assert "pip install hydra-submitit-launcher" in cli.explain(e)
    e = RuntimeError("Unknown plugin class : 'hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher'")
    assert "pip install hydra-joblib-launcher" in cli.explain(e)


def test_processes_meeting_a_fresh_store_all_get_it_intact(tmp_path):
    """Independent commands started together on a new SQLite store (not one sweep: nothing prepared it first)."""
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    code = "import sys; from mnist_sweep import tracking; print(tracking.prepare(sys.argv[1], 'shared'))"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, uri], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(4)
    ]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        printed = [err.decode()[-800:] for _, err in (p.communicate(timeout=30) for p in procs)]
        pytest.fail(f"tracking.prepare still ran after 300 s; the processes printed: {printed}")
    assert [p.returncode for p in procs] == [0] * 4, [err.decode()[-800:] for _, err in outs]
    assert len({out.strip() for out, _ in outs}) == 1  # one experiment, the same id for all
    client = mlflow.MlflowClient(uri)
    run = client.create_run(client.get_experiment_by_name("shared").experiment_id)  # the tables work
    client.log_metric(run.info.run_id, "m", 1.0)
    assert client.get_run(run.info.run_id).data.metrics == {"m": 1.0}
