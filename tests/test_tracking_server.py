"""Team tracking: a small sweep against a real `mlflow server` on PostgreSQL with served artifacts (issue 3).

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
from mlflow import MlflowClient

from conftest import REPO, train_py
from mnist_sweep import sweep

pytestmark = pytest.mark.e2e

SCRIPT = REPO / "scripts" / "tracking_server.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    if not list(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")):
        pytest.fail("PostgreSQL is not installed: apt-get install postgresql (bash .ci/run does it)")
    # PostgreSQL runs as user postgres (when we are root), which must reach its folder: not under pytest's 0700 tmp.
    base = Path(tempfile.mkdtemp(prefix="mnist-sweep-server-"))
    base.chmod(0o755)
    folder, port, pg_port = base / "srv", free_port(), free_port()
    env = {**os.environ, "PYTHON": sys.executable}
    args = ["bash", str(SCRIPT), "start", "--dir", str(folder), "--port", str(port), "--pg-port", str(pg_port)]
    started = subprocess.run(args, env=env, capture_output=True, text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stderr[-3000:]
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
