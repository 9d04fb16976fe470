"""The store fails, before or during a run (issue 31, item 4): one line naming the problem and the fix, a non-zero
exit, no traceback; what was logged is kept, and the next command of any kind closes the run (FAILED when the
store failed, KILLED when the process was killed), so none stays RUNNING.

Real failures only: a real MLflow server killed with SIGKILL, a real full tmpfs, a real read-only bind mount, a
real SQLite lock held by another connection, real corrupt and half-created database files. Mounting needs root
(CI runs as root); elsewhere those tests say so and skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import make_dataset, start_train_py, train_py

pytestmark = pytest.mark.e2e

QUICK = ("trainer.epochs=1", "mlflow.log_model=false", "data.val_size=20", "data.verify=false", "model.hidden=8")
# A run slow enough to act on between its epochs: 3000 images in batches of 4, many epochs.
SLOW = ("trainer.epochs=200", "data.batch_size=4", "mlflow.log_model=false", "data.val_size=20", "data.verify=false")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("store-failures")
    make_dataset(root / "data", n_train=3000, n_test=40)
    return f"data.root={root / 'data'}", f"data.cache_dir={root / 'cache'}"


def _one_error_line(output: str, *fragments: str) -> str:
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def _only_line(proc, *fragments: str) -> str:
    """A failure before any compute: stderr is that one line."""
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr[-3000:]
    return _one_error_line(proc.stdout + proc.stderr, *fragments)


@contextlib.contextmanager
def _mount(target: Path, *args: str):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs or a read-only folder (CI runs as root)")
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", *args, str(target)], check=True, timeout=30)
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False, timeout=30)


def _runs(uri: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("mnist-sweep")
    return client.search_runs([exp.experiment_id]) if exp else []


# ----------------------------------------------------------------------------------------------------------------
# Before any compute: the store cannot be opened
# ----------------------------------------------------------------------------------------------------------------


def test_a_corrupt_database_is_one_line_that_says_how_to_start_over(tmp_path, data):
    db = tmp_path / "mlruns" / "mlflow.db"
    db.parent.mkdir()
    db.write_bytes(b"SQLite format 3\0" + os.urandom(8000))  # a header, then garbage: a damaged file
    proc = train_py(*QUICK, *data, cwd=tmp_path, timeout=300)
    _only_line(proc, "not a readable SQLite database", "mv mlruns/mlflow.db mlruns/mlflow.db.broken")
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("epochs.csv"))  # nothing trained


def test_a_read_only_folder_is_one_line(tmp_path, data):
    work = tmp_path / "work"
    work.mkdir()
    with _mount(work, "--bind", "-o", "ro", str(work)):  # the same folder, mounted over itself read-only
        proc = train_py(*QUICK, *data, cwd=work, timeout=300)
        _only_line(proc, "Read-only file system", "hydra.run.dir=")
        out = tmp_path / "out"  # outputs elsewhere, the store still in the read-only folder
        proc = train_py(*QUICK, *data, f"hydra.run.dir={out}", cwd=work, timeout=300)
        _only_line(proc, "cannot open the MLflow store", "read-only", "mlflow.tracking_uri=")


def test_a_store_half_created_on_a_full_disk_is_explained_then_repaired(tmp_path, data):
    """A disk that fills while MLflow creates its tables leaves tables without the store's first experiment;
    once space is back, the next run sets that file aside and creates the store anew."""
    small = tmp_path / "small"
    with _mount(small, "-t", "tmpfs", "-o", "size=400k", "tmpfs"):
        proc = train_py(*QUICK, *data, f"hydra.run.dir={tmp_path / 'out1'}", cwd=small, timeout=300)
        _only_line(proc, "the disk is full", "df -h")
        shutil.copytree(small / "mlruns", tmp_path / "mlruns")  # space is back: the same files, a bigger disk
    tables = sqlite3.connect(tmp_path / "mlruns" / "mlflow.db").execute("SELECT name FROM sqlite_master").fetchall()
    assert tables  # half made: some tables, no experiment
    proc = train_py(*QUICK, *data, f"hydra.run.dir={tmp_path / 'out2'}", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "half-created" in proc.stdout + proc.stderr
    assert list((tmp_path / "mlruns").glob("mlflow.db.half-created-*"))  # set aside, not deleted
    (run,) = _runs(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    assert run.info.status == "FINISHED"


# ----------------------------------------------------------------------------------------------------------------
# During a run: the store goes away; the next command closes the run
# ----------------------------------------------------------------------------------------------------------------


def _after_first_epoch(*overrides: str, cwd: Path):
    child = start_train_py(*overrides, cwd=cwd)
    child.read_until(lambda line: "epoch 1/" in line, 300)
    return child


def _failed_then_closed(child, uri: str, cwd: Path, data, *fragments: str, status: str = "FAILED"):
    """The run ended in one line, and closed its MLflow run or left that to the next command (a quick single
    run, here), which does it; its first epoch is kept."""
    child.finish(300)
    assert child.returncode == 1, "".join(child.lines)[-3000:]
    _one_error_line("".join(child.lines), *fragments)
    proc = train_py(*QUICK, *data, f"mlflow.tracking_uri={uri}", cwd=cwd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if "the next command closes it" in "".join(child.lines):  # it could not close the run itself
        assert "closed 1 run(s) left RUNNING" in proc.stdout + proc.stderr
    runs = _runs(uri)
    (broken,) = [r for r in runs if r.info.status != "FINISHED"]
    assert broken.info.status == status and "RUNNING" not in {r.info.status for r in runs}
    history = MlflowClient(uri).get_metric_history(broken.info.run_id, "val/acc")
    assert [m.step for m in history][:1] == [1]  # what was logged before the failure is still there
    return broken


def test_a_disk_that_fills_mid_run_ends_it_in_one_line_and_the_run_ends_failed(tmp_path, data):
    small = tmp_path / "small"
    with _mount(small, "-t", "tmpfs", "-o", "size=8m", "tmpfs"):  # the run's folder and store on a small disk
        uri = f"sqlite:///{small}/mlruns/mlflow.db"
        child = _after_first_epoch(*SLOW, *data, "model.hidden=8", cwd=small)
        with contextlib.suppress(OSError), open(small / "filler", "wb") as f:  # fill the disk to the last byte
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        child.finish(300)
        (small / "filler").unlink()  # space is back
        broken = _failed_then_closed(child, uri, small, data, "during run", "the disk is full", "df -h")
        assert "the disk is full" in broken.data.tags["error"]


def test_a_locked_database_ends_the_run_in_one_line_and_the_next_run_closes_it_failed(tmp_path, data):
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    child = _after_first_epoch(*SLOW, *data, "model.hidden=8", cwd=tmp_path)
    lock = sqlite3.connect(tmp_path / "mlruns" / "mlflow.db", timeout=60, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # another writer that never lets go
    try:
        child.finish(300)
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    _failed_then_closed(child, uri, tmp_path, data, "failed during run", "database locked")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlflow_server(folder: Path, port: int) -> subprocess.Popen:
    mlflow = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen(
        [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder}/server.db", "--default-artifact-root", str(folder / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return server
        time.sleep(0.5)
    os.killpg(server.pid, signal.SIGKILL)
    pytest.fail("mlflow server did not start within 180 s")


def test_a_server_killed_mid_run_ends_it_in_one_line_and_the_next_run_closes_it_failed(tmp_path, data):
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _mlflow_server(tmp_path, port)
    try:
        child = _after_first_epoch(*SLOW, *data, "model.hidden=8", f"mlflow.tracking_uri={uri}", cwd=tmp_path)
        os.killpg(server.pid, signal.SIGKILL)  # the server and its workers, with no goodbye
        server.wait(timeout=60)
        child.finish(300)
        server = _mlflow_server(tmp_path, port)  # back, on the same database
        broken = _failed_then_closed(child, uri, tmp_path, data, "failed during run", "the server does not answer")
        assert "the server does not answer" in broken.data.tags["error"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)


def test_a_single_run_killed_outright_is_closed_killed_by_the_next_single_run(tmp_path, data):
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    child = _after_first_epoch(*SLOW, *data, "model.hidden=8", cwd=tmp_path)
    child.send_signal(signal.SIGKILL)
    child.finish(60)
    proc = train_py(*QUICK, *data, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {r.info.status for r in _runs(uri)}
    assert runs == {"KILLED", "FINISHED"}
