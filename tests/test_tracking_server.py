"""Team tracking: a small sweep against a real `mlflow server` on PostgreSQL with served artifacts (issue 3),
behind logins (issue 31): MLflow's basic-auth app and PostgreSQL with passwords for every connection.

The server is started and stopped by scripts/tracking_server.sh, as a user would; it needs Debian's
`postgresql` package (bash .ci/run installs it).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import requests
from mlflow import MlflowClient

from conftest import REPO, train_py
from mnist_sweep import sweep

pytestmark = pytest.mark.e2e

SCRIPT = REPO / "scripts" / "tracking_server.sh"
USER = "alice"  # given at the first start; the password is generated


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_credentials(folder: Path) -> dict[str, str]:
    """DIR/credentials, the env file scripts/tracking_server.sh writes: NAME=VALUE lines, # comments."""
    lines = (folder / "credentials").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


@pytest.fixture(scope="module")
def server():
    """The server of scripts/tracking_server.sh on free ports; while it runs, this process (and what it starts)
    has its login in MLflow's variables, and PGPASSFILE points at its PostgreSQL passwords, as a user's shell
    would after `set -a; . DIR/credentials; set +a`."""
    if not list(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")):
        pytest.fail("PostgreSQL is not installed: apt-get install postgresql (bash .ci/run does it)")
    # PostgreSQL runs as user postgres (when we are root), which must reach its folder: not under pytest's 0700 tmp.
    base = Path(tempfile.mkdtemp(prefix="mnist-sweep-server-"))
    base.chmod(0o755)
    folder, port, pg_port = base / "srv", free_port(), free_port()
    env = {**os.environ, "PYTHON": sys.executable, "MLFLOW_TRACKING_USERNAME": USER}
    env.pop("MLFLOW_TRACKING_PASSWORD", None)  # generated
    args = ["bash", str(SCRIPT), "start", "--dir", str(folder), "--port", str(port), "--pg-port", str(pg_port)]
    started = subprocess.run(args, env=env, capture_output=True, text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        assert f"{folder}/credentials" in started.stdout and "MLFLOW_TRACKING_PASSWORD" not in started.stdout
        with pytest.MonkeyPatch.context() as mp:
            for name, value in read_credentials(folder).items():
                mp.setenv(name, value)
            mp.setenv("PGPASSFILE", str(folder / "pgpass"))
            yield f"http://127.0.0.1:{port}", folder
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", "--dir", str(folder)], env=env, capture_output=True, timeout=120)
        shutil.rmtree(base, ignore_errors=True)


def test_sweep_against_a_postgresql_backed_server(server, tmp_path, mnist_root, cache_dir):
    uri, folder = server
    proc = train_py(
        "-m",
        "model.hidden=16,32",
        "trainer.epochs=1",
        "mlflow.log_model=false",
        f"mlflow.tracking_uri={uri}",
        f"data.root={mnist_root}",
        f"data.cache_dir={cache_dir}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "mlruns").exists()  # nothing went to a local store
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("mnist-sweep")
    assert exp.artifact_location.startswith("mlflow-artifacts:")  # artifacts go through the server
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get(sweep.ROLE) == "sweep"]
    trials = [r for r in runs if r.data.tags.get(sweep.ROLE) != "sweep"]
    assert parent.info.status == "FINISHED" and parent.data.params["sweep.n_trials"] == "2"
    assert sorted(t.data.params["model.hidden"] for t in trials) == ["16", "32"]
    for t in trials:
        assert t.info.status == "FINISHED" and t.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert [m.step for m in client.get_metric_history(t.info.run_id, "val/acc")] == [1]
        assert "epochs.csv" in {a.path for a in client.list_artifacts(t.info.run_id)}
    board = Path(client.download_artifacts(parent.info.run_id, "leaderboard.csv", str(tmp_path))).read_text()
    assert board.count("FINISHED") == 2
    # The files really are on the server's side, in PostgreSQL's neighbour folder, not beside the client.
    assert list((folder / "artifacts").rglob("leaderboard.csv"))
    status = subprocess.run(
        ["bash", str(SCRIPT), "status", "--dir", str(folder)], capture_output=True, text=True, timeout=60
    )
    assert "mlflow server: running" in status.stdout and "postgresql: running" in status.stdout


def test_the_rest_api_refuses_requests_without_a_valid_login(server):
    uri, folder = server
    login = read_credentials(folder)
    search = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert requests.get(search, timeout=30).status_code == 401
    assert requests.get(search, auth=(USER, "not-the-password"), timeout=30).status_code == 401
    # The attack of issue 31: an anonymous PUT over a registered model's files.
    put = requests.put(f"{uri}/api/2.0/mlflow-artifacts/artifacts/0/evil/model.pth", data=b"x", timeout=30)
    assert put.status_code == 401
    assert not list((folder / "artifacts").rglob("model.pth"))
    ok = requests.get(search, auth=(login["MLFLOW_TRACKING_USERNAME"], login["MLFLOW_TRACKING_PASSWORD"]), timeout=30)
    assert ok.status_code == 200 and login["MLFLOW_TRACKING_USERNAME"] == USER
    assert requests.get(f"{uri}/health", timeout=30).status_code == 200  # health checks need no login


def test_secrets_are_private_files_never_command_lines(server):
    _, folder = server
    for name in ("credentials", "pgpass", "auth.ini", "flask_secret"):
        assert (folder / name).stat().st_mode & 0o777 == 0o600, name
    login = read_credentials(folder)
    assert set(login) == {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
    assert len(login["MLFLOW_TRACKING_PASSWORD"]) >= 24  # generated
    passwords = [login["MLFLOW_TRACKING_PASSWORD"]]
    passwords += [line.rsplit(":", 1)[1] for line in (folder / "pgpass").read_text().splitlines()]
    assert len(set(passwords)) == 3  # MLflow's admin, PostgreSQL's superuser and its mlflow role: each its own
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):  # what `ps` shows every local account
        try:
            text = cmdline.read_bytes().decode(errors="replace")
        except OSError:
            continue
        assert not any(p in text for p in passwords), text


def test_postgresql_refuses_connections_without_the_password(server):
    _, folder = server
    pg_bin = sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1]
    port = (folder / "pg" / "postmaster.pid").read_text().splitlines()[3]
    hba = [line.split() for line in (folder / "pg" / "pg_hba.conf").read_text().splitlines()]
    assert {fields[-1] for fields in hba if fields and not fields[0].startswith("#")} == {"scram-sha-256"}
    env = {**os.environ, "PGPASSFILE": "/dev/null", "PGCONNECT_TIMEOUT": "10"}
    env.pop("PGPASSWORD", None)
    tcp = [str(pg_bin / "psql"), "-w", "-h", "127.0.0.1", "-p", port, "-U", "postgres", "-tAc", "SELECT 1"]
    refused = subprocess.run(tcp, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "password" in refused.stderr, refused.stderr
    if os.geteuid() == 0:  # the postgres account on the cluster's own socket: no peer or trust either
        socket_dir = ["-h", str(folder / "pg")]
        local = ["runuser", "-u", "postgres", "--", *tcp[:2], *socket_dir, *tcp[4:]]
        refused = subprocess.run(local, env=env, capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0 and "password" in refused.stderr, refused.stderr
    for role in ("postgres", "mlflow"):  # with the passwords, each role gets in
        args = [*tcp[:6], "-U", role, "-d", "mlflow" if role == "mlflow" else "postgres", *tcp[8:]]
        allowed = subprocess.run(
            args, env={**env, "PGPASSFILE": str(folder / "pgpass")}, capture_output=True, text=True
        )
        assert allowed.returncode == 0 and allowed.stdout.strip() == "1", allowed.stderr
    superuser = "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"  # the server cannot run COPY TO PROGRAM
    args = [*tcp[:6], "-U", "mlflow", "-d", "mlflow", "-tAc", superuser]
    assert (
        subprocess.run(
            args, env={**env, "PGPASSFILE": str(folder / "pgpass")}, capture_output=True, text=True
        ).stdout.strip()
        == "f"
    )


@pytest.mark.parametrize("password", [None, "wrong-password-1234"])
def test_a_missing_or_wrong_login_is_one_line(server, tmp_path, mnist_root, cache_dir, password):
    uri, _ = server
    overrides = ["trainer.epochs=1", f"mlflow.tracking_uri={uri}", f"data.root={mnist_root}"]
    multirun = ["-m", "model.hidden=16,32"] if password else []  # a single run without one, a sweep with a wrong one
    env = {"MLFLOW_TRACKING_PASSWORD": password, "HOME": str(tmp_path)}  # no ~/.mlflow/credentials to fall back on
    if password is None:
        env["MLFLOW_TRACKING_USERNAME"] = None
    proc = train_py(*multirun, *overrides, f"data.cache_dir={cache_dir}", cwd=tmp_path, env=env)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert lines and "refused the credentials" in lines[-1] and "MLFLOW_TRACKING_USERNAME" in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout and "epoch" not in proc.stdout  # before any training
