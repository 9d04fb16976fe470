"""Sweeps through a real SLURM: `hydra/launcher=submitit_slurm` on a one-node cluster (issue 29).

The cluster (munged, slurmctld, slurmd on 127.0.0.1, every file in a temporary folder) is started once for the
session by scripts/slurm_cluster.sh, as a user would, and stopped at the end whatever happened. It needs Debian's
`slurm-wlm` and `munge` packages and root (bash .ci/run installs them): where slurmctld is missing these tests
are skipped, except in CI (CI=true), where that is a failure. The data is the tiny synthetic set of conftest.py.
"""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from mlflow import MlflowClient
from test_tracking_server import read_credentials

from conftest import REPO, make_dataset, train_py
from mnist_sweep import slurm, sweep

CLUSTER = REPO / "scripts" / "slurm_cluster.sh"
SERVER = REPO / "scripts" / "tracking_server.sh"
PARTITION = "mnisttest"  # not a usual name: the sweeps must pass it, and an unknown one must be named
TRIAL = ("trainer.epochs=1", "mlflow.log_model=false", "data.val_size=20", "data.verify=false", "data.download=false")
# One CPU and 1 GB per trial: the preset's 4 CPUs and 8 GB do not fit this machine's node.
SMALL_JOBS = (f"hydra.launcher.partition={PARTITION}", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1")


def _free_ports(n: int = 1) -> int:
    """A port p such that p .. p+n-1 are free now (slurmctld takes p, slurmd p+1)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            for k in range(1, n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + k))
            return port
        except OSError:
            continue
    raise RuntimeError("no free ports")


@pytest.fixture(scope="session")
def cluster():
    """SLURM_CONF of a one-node cluster running for the whole session; stopped at its end, even after failures."""
    if shutil.which("slurmctld") is None:
        message = "SLURM is not installed: apt-get install slurm-wlm munge (bash .ci/run does it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    base = Path(tempfile.mkdtemp(prefix="mnist-sweep-slurm-"))
    base.chmod(0o755)
    folder = base / "cluster"
    start = ["bash", str(CLUSTER), "start", "--dir", str(folder), "--partition", PARTITION]
    start += ["--port", str(_free_ports(2)), "--timeout", "90"]
    try:
        started = subprocess.run(start, capture_output=True, text=True, timeout=150)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-3000:]
        yield str(folder / "slurm.conf")
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop", "--dir", str(folder)], capture_output=True, timeout=120)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    make_dataset(root / "data")
    return f"data.root={root / 'data'}", f"data.cache_dir={root / 'cache'}"


def _sweep(cluster: str, cwd: Path, tiny, *overrides: str, env: dict | None = None):
    return train_py(
        "-m", "hydra/launcher=submitit_slurm", *SMALL_JOBS, *TRIAL, *tiny, *overrides,
        cwd=cwd, timeout=420, env={"SLURM_CONF": cluster, **(env or {})},
    )  # fmt: skip


def _check_sweep(client: MlflowClient, n: int, hidden: list[str]):
    """One FINISHED parent, ``n`` FINISHED trials nested under it, each tagged with its own SLURM array task."""
    exp = client.get_experiment_by_name("mnist-sweep")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    (parent,) = [r for r in runs if r.data.tags.get(sweep.ROLE) == "sweep"]
    trials = [r for r in runs if r.data.tags.get(sweep.ROLE) != "sweep"]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["sweep.launcher"] == "SlurmLauncher" and parent.data.params["sweep.n_trials"] == str(n)
    assert sorted(t.data.params["model.hidden"] for t in trials) == sorted(hidden)
    for t in trials:
        assert t.info.status == "FINISHED" and t.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert t.data.tags["torch.threads"] == "1"  # hydra.launcher.cpus_per_task
    tags = [t.data.tags for t in trials]
    (array_job,) = {t["slurm.array_job_id"] for t in tags}  # one array job, one task per trial
    assert sorted(int(t["slurm.array_task_id"]) for t in tags) == list(range(n))
    assert len({t["slurm.job_id"] for t in tags}) == n and array_job.isdigit()
    for t in tags:  # the array task is the trial of the same number
        assert t["slurm.array_task_id"] == t["hydra.job.num"]
    return parent, trials


def _no_sacct_noise(proc) -> None:
    printed = proc.stdout + proc.stderr
    assert "sacct" not in printed.lower() and "accounting storage is disabled" not in printed.lower(), printed[-3000:]


@pytest.mark.slurm
def test_a_sweep_through_slurm(cluster, tmp_path, tiny):
    proc = _sweep(cluster, tmp_path, tiny, "model.hidden=8,16,32", f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _no_sacct_noise(proc)
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    parent, trials = _check_sweep(client, 3, ["8", "16", "32"])
    with open(client.download_artifacts(parent.info.run_id, "leaderboard.csv", str(tmp_path))) as f:
        board = list(csv.DictReader(f))
    assert sorted(r["run_id"] for r in board) == sorted(t.info.run_id for t in trials)
    assert {r["status"] for r in board} == {"FINISHED"}
    assert "Sweep leaderboard (3 of 3 trials: 3 FINISHED)" in proc.stdout and "\nbest: trial " in proc.stdout
    # Each trial ran as a SLURM job: submitit's folder holds one log per array task.
    logs = [p for p in tmp_path.rglob("*_log.out") if p.parent.parent.name == ".submitit"]
    assert len(logs) == 3, logs


@pytest.mark.slurm
@pytest.mark.e2e
def test_slurm_jobs_report_to_the_postgresql_team_server(cluster, tmp_path, tiny, monkeypatch):
    if not list(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")):
        pytest.fail("PostgreSQL is not installed: apt-get install postgresql (bash .ci/run does it)")
    base = Path(tempfile.mkdtemp(prefix="mnist-sweep-slurm-server-"))  # reachable by user postgres, unlike tmp_path
    base.chmod(0o755)
    folder, port = base / "srv", _free_ports()
    env = {**os.environ, "PYTHON": sys.executable}
    start = ["bash", str(SERVER), "start", "--dir", str(folder), "--port", str(port), "--pg-port", str(_free_ports())]
    try:
        started = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stderr[-3000:]
        uri = f"http://127.0.0.1:{port}"
        login = read_credentials(folder)  # the server wants a login: the launcher and its jobs (sbatch passes
        for name, value in login.items():  # the launcher's environment on) use MLflow's variables
            monkeypatch.setenv(name, value)
        proc = _sweep(cluster, tmp_path, tiny, "model.hidden=8,16", f"mlflow.tracking_uri={uri}", env=login)
        assert proc.returncode == 0, proc.stderr[-3000:]
        _no_sacct_noise(proc)
        assert not list(tmp_path.rglob("*.db")) and not (tmp_path / "mlruns").exists()  # no local store
        client = MlflowClient(uri)
        parent, _ = _check_sweep(client, 2, ["8", "16"])
        assert list((folder / "artifacts").rglob("leaderboard.csv"))  # written through the server
    finally:
        subprocess.run(["bash", str(SERVER), "stop", "--dir", str(folder)], env=env, capture_output=True, timeout=120)
        shutil.rmtree(base, ignore_errors=True)


def _one_line_error(proc, *fragments: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    return lines[0]


@pytest.mark.slurm
def test_an_unknown_partition_is_named_before_any_job(cluster, tmp_path, tiny):
    proc = train_py(
        "-m", "hydra/launcher=submitit_slurm", "hydra.launcher.partition=nosuch", "model.hidden=8,16", *TRIAL, *tiny,
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db", cwd=tmp_path, timeout=120, env={"SLURM_CONF": cluster},
    )  # fmt: skip
    _one_line_error(proc, "hydra.launcher.partition=nosuch", f"hydra.launcher.partition={PARTITION}")
    assert not list(tmp_path.rglob(".submitit")) and not (tmp_path / "m.db").exists()  # nothing submitted or logged


def test_no_slurm_on_path_is_one_line_before_any_job(tmp_path, tiny):
    """Runs anywhere: a PATH with Python's folder only has no sbatch, whether or not SLURM is installed."""
    proc = train_py(
        "-m", "hydra/launcher=submitit_slurm", "hydra.launcher.partition=any", "model.hidden=8,16", *TRIAL, *tiny,
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db", cwd=tmp_path, timeout=120,
        env={"PATH": str(Path(sys.executable).parent)},
    )  # fmt: skip
    _one_line_error(proc, "`sbatch` is not on PATH", "hydra/launcher=submitit_local")
    assert not list(tmp_path.rglob(".submitit")) and not (tmp_path / "m.db").exists()


def test_without_accounting_jobs_are_followed_with_squeue():
    """The watcher that replaces sacct: squeue's lines read as sacct's, and a job squeue forgot has ended."""
    pytest.importorskip("submitit")
    watcher = slurm._queue_watcher_class()(delay_s=60)
    for job in ("41_0", "41_1", "41_2", "42"):
        watcher.register_job(job)
    command = watcher._make_command()
    assert command[0] == "squeue" and "--states=all" in command
    info = watcher.read_info(b"41_0|RUNNING|vm\n41_1|COMPLETED|vm\n")
    assert info["41_0"]["State"] == "RUNNING" and info["41_1"]["State"] == "COMPLETED"
    assert info["41_2"]["State"] == info["42"]["State"] == slurm.ENDED
    pending = watcher.read_info("41_[0-2]|PENDING|\n")  # pending array tasks, as one range
    assert {pending[j]["State"] for j in ("41_0", "41_1", "41_2")} == {"PENDING"}
    watcher._info_dict.update(info)
    assert watcher.is_done("41_2", mode="cache") and not watcher.is_done("41_0", mode="cache")


def _trial_after_two_epochs(client: MlflowClient, db: Path, seconds: float = 300):
    """The trial's run once it has logged 2 epochs (the sweep is running in the background)."""
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.5)
        exp = client.get_experiment_by_name("mnist-sweep") if db.exists() else None
        for r in client.search_runs([exp.experiment_id]) if exp else []:
            if r.data.tags.get(sweep.ROLE) != "sweep" and len(client.get_metric_history(r.info.run_id, "val/acc")) >= 2:
                return r
    pytest.fail("the trial never reached epoch 2")


def _slow_settings(tmp_path) -> list[str]:
    """The slow trial's config: 8 epochs of a second or two each on a synthetic set in tmp_path/data."""
    trial = [o for o in TRIAL if not o.startswith("trainer.epochs")]
    return [*trial, f"data.root={tmp_path / 'data'}", "trainer.epochs=8", "model.hidden=8", "data.batch_size=4"]


def _slow_trial(cluster, tmp_path, monkeypatch):
    """One slow trial through SLURM, in the background: time to signal it."""
    from conftest import start_train_py

    monkeypatch.setenv("SLURM_CONF", cluster)
    make_dataset(tmp_path / "data", n_train=3000, n_test=40)
    store = f"sqlite:///{tmp_path}/m.db"
    # The store is made before the sweep starts: a client made while the sweep creates it would run MLflow's
    # migrations on a half-made file, which the sweep moves aside (CI: "attempt to write a readonly database").
    client = MlflowClient(store)
    child = start_train_py(
        "-m", "hydra/launcher=submitit_slurm", *SMALL_JOBS, *_slow_settings(tmp_path), f"mlflow.tracking_uri={store}",
        cwd=tmp_path,
    )  # fmt: skip
    return child, client, _trial_after_two_epochs(client, tmp_path / "m.db")


def _outcome(client: MlflowClient, run_id: str) -> dict:
    """What a run ended with: each epoch's val/acc and train/loss, and its final metrics."""
    run = client.get_run(run_id)
    history = {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        for key in ("val/acc", "train/loss")
    }
    return {
        **history,
        **{key: run.data.metrics[key] for key in ("best_epoch", "best_val/acc", "test/acc", "test/loss")},
    }


@pytest.mark.slurm
def test_a_preempted_trial_requeues_itself_and_continues_in_the_same_run(cluster, tmp_path, monkeypatch):
    """SLURM's preemption signal (USR2, what submitit asks SLURM to send before a timeout or a preemption):
    submitit requeues the job, and the trial goes on from its last epoch in the same MLflow run."""
    from conftest import start_train_py

    child, client, running = _slow_trial(cluster, tmp_path, monkeypatch)
    subprocess.run(["scancel", "--signal=USR2", running.data.tags["slurm.job_id"]], check=True, timeout=30)
    # While SLURM requeues the job: the same config, seed and thread count (cpus_per_task=1), never interrupted.
    (tmp_path / "ref").mkdir()
    whole = start_train_py(
        *_slow_settings(tmp_path), "device.threads=1", f"mlflow.tracking_uri=sqlite:///{tmp_path}/ref/m.db",
        cwd=tmp_path / "ref",
    )  # fmt: skip
    child.finish(420)
    assert child.returncode == 0, "".join(child.lines)[-3000:]
    runs = client.search_runs([client.get_experiment_by_name("mnist-sweep").experiment_id])
    (trial_run,) = [r for r in runs if r.data.tags.get(sweep.ROLE) != "sweep"]
    assert trial_run.info.run_id == running.info.run_id and trial_run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(trial_run.info.run_id, "val/acc")]
    assert sorted(steps) == list(range(1, 9))  # every epoch once: the requeued job went on, it did not start over
    logs = "".join(p.read_text(errors="replace") for p in tmp_path.rglob("*_log.*"))
    assert "resuming from" in logs and "this job is preempted" in logs
    # ... and it ends exactly as the uninterrupted run does.
    whole.finish(300)
    assert whole.returncode == 0, "".join(whole.lines)[-3000:]
    assert trial_run.data.tags["torch.threads"] == "1"
    reference = MlflowClient(f"sqlite:///{tmp_path}/ref/m.db")
    (ref_run,) = reference.search_runs([reference.get_experiment_by_name("mnist-sweep").experiment_id])
    assert _outcome(client, trial_run.info.run_id) == _outcome(reference, ref_run.info.run_id)


@pytest.mark.slurm
def test_scancel_leaves_the_trial_killed_never_running(cluster, tmp_path, monkeypatch):
    child, client, running = _slow_trial(cluster, tmp_path, monkeypatch)
    subprocess.run(["scancel", running.data.tags["slurm.job_id"]], check=True, timeout=30)
    child.finish(300)
    assert child.returncode != 0  # the sweep reports the cancelled trial
    runs = client.search_runs([client.get_experiment_by_name("mnist-sweep").experiment_id])
    assert client.get_run(running.info.run_id).info.status == "KILLED"
    assert "RUNNING" not in {r.info.status for r in runs}
