"""The lab notebook: the one module that talks to MLflow.

One MLflow run per Hydra job. What it records, and why:

* params  - the resolved config flattened to dotted keys (``model.hidden``) plus the chosen group options
            (``choice.optimizer``), so the UI's compare view can put any key on an axis;
* metrics - per epoch with ``step=epoch``, sent in one ``log_batch`` per epoch (one ``log_metric`` to SQLite
            costs ~3 ms - more than a training step - so nothing is logged per step);
* tags    - git commit and dirtiness, library versions, device, a hash of the resolved config;
* artifacts - the resolved config and Hydra's ``.hydra/`` folder, the per-epoch log, the confusion matrix,
            the checkpoint with its config beside it, and the model (``mlflow.pytorch.log_model``).

A run that raises ends FAILED (reason in the ``error`` tag, traceback as ``traceback.txt``); one interrupted
(Ctrl-C, SIGTERM) ends KILLED. A process killed outright (kill -9, out of memory) cannot close its run: every
run carries its owner's host, pid and process start time, and the next launch closes runs whose owner is gone
as KILLED (``close_orphans``), so none stays RUNNING for ever.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import socket
import sqlite3
import subprocess
import time
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from filelock import FileLock

import mnist_sweep
from mnist_sweep import UserError

log = logging.getLogger(__name__)

MODEL_LOGGED = "model.logged"  # tag: this run holds a model logged with log_model
REPO = Path(__file__).resolve().parent.parent  # the checkout, when run from one (git_state)


class TrackingError(UserError):
    """The tracking store cannot be reached or prepared."""


def quiet() -> None:
    """MLflow and its database layer log every table migration and experiment creation at INFO: keep the
    run's output to the run's own lines."""
    import mlflow  # noqa: F401  (mlflow sets its own log level when imported: import first, then quieten)

    for name in ("mlflow", "alembic", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module=r"mlflow(\..*)?")
    warnings.filterwarnings("ignore", message=r".*pkg_resources.*")


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///relative`` or ``sqlite:////absolute`` URI, else None."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri[len("sqlite:///") :])


def check_server(tracking_uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any training, when an http(s) tracking server does not answer.

    (MLflow's client would otherwise retry for minutes before giving up.)
    """
    import requests

    url = tracking_uri.rstrip("/") + "/health"
    try:
        response = requests.get(url, timeout=timeout)
    except requests.RequestException as e:
        reason = type(e).__name__
        raise TrackingError(
            f"MLflow tracking server {tracking_uri} is unreachable ({reason}); start it "
            "(scripts/tracking_server.sh start) or use the local store: mlflow.tracking_uri=sqlite:///mlruns/mlflow.db"
        ) from e
    if response.status_code != 200:
        raise TrackingError(
            f"MLflow tracking server {tracking_uri} answered HTTP {response.status_code} on /health; "
            "check the address in mlflow.tracking_uri"
        )


def prepare_sqlite(path: Path) -> None:
    """Create the database's folder and switch it to write-ahead logging.

    WAL lets readers (the UI) and one writer work at once, and survives the connection: it is a property of
    the file. Tables are created by MLflow on first use (see ``prepare``).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path, timeout=30) as con:
        con.execute("PRAGMA journal_mode=WAL")


def prepare(tracking_uri: str, experiment: str) -> str:
    """Point MLflow at the store, make sure it and the experiment exist, and return the experiment id.

    Called once per run, and once by the sweep before any trial starts (so parallel trials never race to
    create tables or the experiment).
    """
    import mlflow

    scheme = urlparse(tracking_uri).scheme
    if scheme in ("http", "https"):
        # Bound what the client does when the server goes away mid-run: a few retries, not minutes.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        check_server(tracking_uri)
    lock, db = contextlib.nullcontext(), None
    if scheme == "sqlite":
        db = sqlite_path(tracking_uri)
        db.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(db.with_name(db.name + ".lock"))  # between processes, on every OS
    mlflow.set_tracking_uri(tracking_uri)
    # Two processes that meet a fresh store both run MLflow's table migrations, and the loser can leave it
    # half-made; the lock makes the first access (the switch to WAL and the migrations) one process at a time.
    with lock:
        if db is not None:
            prepare_sqlite(db)
        return _experiment_id(mlflow.MlflowClient(), tracking_uri, experiment)


def _experiment_id(client, tracking_uri: str, experiment: str) -> str:
    for attempt in range(5):
        try:
            found = client.get_experiment_by_name(experiment)
            if found is not None:
                if found.lifecycle_stage == "deleted":
                    raise TrackingError(
                        f"MLflow experiment {experiment!r} is deleted; restore it (mlflow experiments restore) "
                        "or pick another name with mlflow.experiment=NAME"
                    )
                return found.experiment_id
            return client.create_experiment(experiment)
        except TrackingError:
            raise
        except Exception as e:  # another process created it (or the tables) at the same moment: look again
            if attempt == 4:
                raise TrackingError(f"cannot open MLflow store {tracking_uri}: {str(e).splitlines()[0][:200]}") from e
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def _process_started(pid: int) -> str:
    """When a process started (clock ticks since boot, Linux), so a reused pid is not mistaken for it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def owner_tags() -> dict[str, str]:
    """Who owns a run while it is RUNNING: this process."""
    pid = os.getpid()
    return {"owner.host": socket.gethostname(), "owner.pid": str(pid), "owner.started": _process_started(pid)}


def _owner_alive(tags: dict[str, str]) -> bool:
    try:
        pid = int(tags["owner.pid"])
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (KeyError, ValueError, PermissionError):
        return True  # not ours to judge
    started = tags.get("owner.started", "")
    return not started or _process_started(pid) in ("", started)


def close_orphans(experiment_id: str) -> list[str]:
    """Close as KILLED the RUNNING runs of this host whose owning process is gone; return their ids.

    Runs owned by other hosts (cluster nodes) are left alone: their processes cannot be checked from here.
    """
    import mlflow

    client = mlflow.MlflowClient()
    host = socket.gethostname()
    closed = []
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=50000):
        tags = run.data.tags
        if tags.get("owner.host") != host or _owner_alive(tags):
            continue
        client.set_tag(run.info.run_id, "error", f"its process (pid {tags.get('owner.pid')}) ended without closing it")
        client.set_terminated(run.info.run_id, status="KILLED")
        closed.append(run.info.run_id)
    return closed


def git_state(repo: Path = REPO) -> dict[str, str]:
    """Commit and dirtiness of the code that ran (empty when not in a git checkout)."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"mlflow.source.git.commit": commit, "git.commit": commit, "git.dirty": str(bool(dirty)).lower()}


def version_tags() -> dict[str, str]:
    import hydra
    import mlflow
    import omegaconf
    import torch

    return {
        "version.python": platform.python_version(),
        "version.torch": torch.__version__,
        "version.hydra": hydra.__version__,
        "version.omegaconf": omegaconf.__version__,
        "version.mlflow": mlflow.__version__,
        "version.mnist_sweep": mnist_sweep.__version__,
    }


class Run:
    """One MLflow run, written through ``MlflowClient`` with explicit run ids (no hidden global state)."""

    def __init__(self, run_id: str):
        import mlflow

        self.id = run_id
        self.client = mlflow.MlflowClient()

    # MlflowClient.log_batch splits what it is given into batches the store accepts.
    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.id, str(path), artifact_path)

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.id, str(folder), artifact_path)

    def log_model(self, model, example, serialization: str = "pickle") -> str:
        """Log the model so that ``mlflow.pyfunc.load_model(uri).predict(images)`` returns class scores.

        ``pickle`` (with this package's code copied beside it, so it loads anywhere) costs ~0.5 s the first
        time in a process; ``pt2`` (torch.export: no code needed, no pickle) ~2.2 s, mostly importing and
        tracing torch.export - a large share of a short run.
        """
        import mlflow
        import torch
        from mlflow.models import infer_signature

        model = model.cpu().eval()
        with torch.no_grad():
            output = model(torch.from_numpy(example)).numpy()
        pytorch_log = logging.getLogger("mlflow.pytorch")
        level = pytorch_log.level
        pytorch_log.setLevel(logging.ERROR)  # its pickle advice is answered by the docstring above
        try:
            with mlflow.start_run(run_id=self.id):  # log_model writes to the active run
                info = mlflow.pytorch.log_model(
                    model,
                    name="model",
                    signature=infer_signature(example, output),
                    input_example=example,
                    serialization_format=serialization,
                    # Given explicitly: inferring them loads the model again in a subprocess (seconds per run).
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
                    code_paths=[str(Path(__file__).parent)] if serialization == "pickle" else None,
                )
        finally:
            pytorch_log.setLevel(level)
        self.set_tags({MODEL_LOGGED: "true"})
        return info.model_uri


@contextmanager
def start_run(
    experiment_id: str,
    run_name: str,
    tags: dict[str, str],
    parent_run_id: str | None = None,
):
    """Open a run and guarantee it ends with the right status.

    FINISHED on success; KILLED on KeyboardInterrupt (Ctrl-C, or SIGTERM turned into one by cli.py);
    FAILED on any other exception, with the reason as the ``error`` tag and the traceback as ``traceback.txt``.
    """
    import mlflow

    client = mlflow.MlflowClient()
    tags = {**tags, **owner_tags()}
    if parent_run_id:
        tags = {**tags, "mlflow.parentRunId": parent_run_id}
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    status = "FAILED"
    try:
        yield Run(run.info.run_id)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException as e:
        try:
            client.set_tag(run.info.run_id, "error", f"{type(e).__name__}: {e}"[:5000])
            client.log_text(run.info.run_id, traceback.format_exc(), "traceback.txt")
        except Exception:  # the store itself may be what failed; the status below matters more
            pass
        raise
    finally:
        try:
            client.set_terminated(run.info.run_id, status=status)
        except Exception as e:
            log.error("could not mark MLflow run %s %s: %s", run.info.run_id, status, e)
