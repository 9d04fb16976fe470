"""The lab notebook: the one module that talks to MLflow.

One MLflow run per Hydra job. What it records, and why:

* params  - the settings the run used, flattened to dotted keys (``model.hidden``), plus group options that say
            more than the values (``choice.model``), so the UI's compare view can put any key on an axis;
* inputs  - the dataset's splits as MLflow dataset inputs (name, digest, where the files are; ``log_dataset``);
* metrics - per epoch with ``step=epoch``, sent in one ``log_batch`` per epoch (one ``log_metric`` to SQLite
            costs ~3 ms - more than a training step - so nothing is logged per step);
* tags    - source and user (as ``mlflow.start_run`` sets them), git commit and dirtiness, library versions,
            device, a hash of the resolved config;
* artifacts - the resolved config and Hydra's ``.hydra/`` folder, the per-epoch log, the confusion matrix,
            the checkpoint with its config beside it, and the model (``Run.log_model``: by default weights and
            JSON, loaded without unpickling anything; see ``saved_model``).

A run that raises ends FAILED (reason in the ``error`` tag, traceback as ``traceback.txt``); one interrupted
(Ctrl-C, SIGTERM) ends KILLED; one whose store fails ends in one line (``store_problem``, ``StoreFailed``). A
process killed outright (kill -9, out of memory), or cut off from its store, cannot close its run: every run carries
its owner's host, pid and process start time, and the next command closes runs whose owner is gone
(``close_orphans``: KILLED, or FAILED where the process left a note why), so none stays RUNNING for ever.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import re
import socket
import sqlite3
import subprocess
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlparse

from filelock import FileLock

import mnist_sweep
from mnist_sweep import UserError, saved_model
from mnist_sweep.redact import mask_logs, mask_secrets, mask_values

log = logging.getLogger(__name__)

MODEL_LOGGED = "model.logged"  # tag: this run holds a model logged with log_model
REPO = Path(__file__).resolve().parent.parent  # the checkout, when run from one (git_state)
# MLflow 3's UI opens an experiment on its GenAI overview unless told it trains models: by this experiment tag
# (its "kind"), and - what MLflow 3.17's UI goes by - the workflowType=machine_learning parameter of our links.
EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"


class TrackingError(UserError):
    """The tracking store cannot be reached or prepared."""


class Discard(Exception):  # noqa: N818 (a signal, not an error)
    """Raised inside ``start_run`` to take back a run just made (another launch trains the same config): a new
    run is deleted, a reopened one goes back to KILLED."""


class StoreFailed(TrackingError):
    """The store failed during a run: what was logged is kept, the run is closed FAILED when the store is back."""

    exit_code = 1


# How a failing store shows in the messages of what it raises (SQLite, SQLAlchemy, the filesystem, an MLflow
# server through requests), what that means, and the fix. The first that matches names the problem.
_STORE_PROBLEMS = (
    (r"no space left|disk is full|disk quota", "the disk is full", "free space (df -h {place}) and relaunch"),
    (
        r"read-only file system|readonly database",
        "its folder is read-only",
        "point mlflow.tracking_uri at a writable place, e.g. mlflow.tracking_uri=sqlite:////tmp/mlruns/mlflow.db",
    ),
    (
        r"database is locked",
        "another process holds the database locked",
        "let that process finish (or stop it) and relaunch",
    ),
    (
        r"not a database|malformed|file is encrypted",
        "it is not a readable SQLite database",
        "move it aside (mv {place} {place}.broken) to start a new store, or restore a backup "
        "(`sqlite3 {place} .recover` may save its runs)",
    ),
    (r"permission denied|unable to open database file", "permission denied", "check who owns {place}"),
    (
        r"max retries exceeded|connection refused|failed to establish|connectionerror|timed out|remotedisconnected"
        r"|connection reset|server closed the connection|could not connect|connection .* failed",
        "the server does not answer",
        "start it again (scripts/tracking_server.sh start for the team server) and relaunch",
    ),
)


def store_problem(e: BaseException, tracking_uri: str) -> str | None:
    """What went wrong with the store and how to fix it, in a few words, when ``e`` (or what caused it) is a
    failure of the store; None for anything else."""
    place = str(sqlite_path(tracking_uri) or tracking_uri)
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        module = type(e).__module__.split(".")[0]
        if isinstance(e, OSError) or module in ("sqlite3", "sqlalchemy", "requests", "urllib3", "psycopg", "mlflow"):
            text = f"{type(e).__name__}: {e}".lower()
            for pattern, what, fix in _STORE_PROBLEMS:
                if re.search(pattern, text):
                    return f"{what}; {fix.format(place=place)}"
        e = e.__cause__ or e.__context__
    return None


def quiet() -> None:
    """MLflow and its database layer log every table migration and experiment creation at INFO: keep the
    run's output to the run's own lines."""
    import mlflow  # noqa: F401  (mlflow sets its own log level when imported: import first, then quieten)

    mask_logs()  # a password in a URI is masked in every log line and traceback
    for name in ("mlflow", "alembic", "matplotlib", "PIL"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Its "Retrying ..." lines while a server is away: a failure that lasts is reported once, as one line.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    # Its traceback of a database error it then raises: the run reports that failure itself, in one line.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    # Its "Downloading artifacts" progress bars (e.g. a checkpoint fetched when the sweep ends) are not ours.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Nor its "View run at" lines, which print the tracking URI with its password: ours print the links.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
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
    # /health needs no login: ask for one experiment, with the login MLflow itself would send (its environment
    # variables or ~/.mlflow/credentials), so a missing or wrong one is this line, not a traceback mid-run.
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    search = "/api/2.0/mlflow/experiments/search"
    try:
        code = http_request(
            get_default_host_creds(tracking_uri),
            search,
            "GET",
            params={"max_results": 1},
            max_retries=0,
            timeout=timeout,
        ).status_code
    except Exception:  # noqa: BLE001  (not ours to judge here: the first real request reports it)
        return
    if code in (401, 403):
        where = urlparse(tracking_uri)
        shown = (
            where._replace(netloc="***@" + where.netloc.rsplit("@", 1)[1]).geturl()
            if "@" in where.netloc
            else tracking_uri
        )
        raise TrackingError(
            f"the MLflow server at {shown} refused the credentials (HTTP {code}); set MLFLOW_TRACKING_USERNAME "
            "and MLFLOW_TRACKING_PASSWORD (for scripts/tracking_server.sh: set -a; . DIR/credentials; set +a) "
            "or write them to ~/.mlflow/credentials, never into the URL"
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
    db = sqlite_path(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    try:
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        # Two processes that meet a fresh store both run MLflow's table migrations, and the loser can leave it
        # half-made; the lock makes the first access (the switch to WAL, the migrations) one process at a time.
        with store_lock(tracking_uri):
            if db is not None:
                _set_aside_half_created(db)
                prepare_sqlite(db)
            return _experiment_id(mlflow.MlflowClient(), tracking_uri, experiment)
    except TrackingError:
        raise
    except Exception as e:
        problem = store_problem(e, tracking_uri)
        if problem is None:
            raise
        raise TrackingError(f"cannot open the MLflow store {tracking_uri}: {problem}") from e


def _set_aside_half_created(db: Path) -> None:
    """A store whose creation was cut short (a full disk, a kill) has tables but not yet the default experiment
    MLflow creates last, so it never held a run: move it aside (nothing is deleted), and it is created anew."""
    if not db.is_file() or db.stat().st_size == 0:
        return
    try:
        with contextlib.closing(sqlite3.connect(db, timeout=30)) as con:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not tables or "experiments" in tables and con.execute("SELECT 1 FROM experiments").fetchone():
                return
    except sqlite3.DatabaseError:
        return  # unreadable: prepare names that problem
    aside = db.with_name(f"{db.name}.half-created-{time.strftime('%Y%m%d-%H%M%S')}")
    for suffix in ("", "-wal", "-shm"):
        part = db.with_name(db.name + suffix)
        if part.exists():
            part.rename(aside.with_name(aside.name + suffix))
    log.warning(
        "the MLflow store %s was left half-created (its creation was cut short) and held no runs; "
        "moved it to %s and created it again",
        db,
        aside,
    )


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
                if EXPERIMENT_KIND not in found.tags:
                    client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
                return found.experiment_id
            return client.create_experiment(experiment, tags={EXPERIMENT_KIND: MODEL_TRAINING})
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


def slurm_tags() -> dict[str, str]:
    """Which SLURM job this process is (none outside SLURM): job id, array ids, and how often it was restarted."""
    names = {"SLURM_JOB_ID": "slurm.job_id", "SLURM_ARRAY_JOB_ID": "slurm.array_job_id"}
    names["SLURM_ARRAY_TASK_ID"] = "slurm.array_task_id"
    tags = {tag: os.environ[name] for name, tag in names.items() if os.environ.get(name)}
    if tags:
        tags["slurm.restart_count"] = os.environ.get("SLURM_RESTART_COUNT") or "0"  # unset before any requeue
    return tags


IDLE_S = 600  # a RUNNING run of another host that logged nothing for this long has lost its process


def run_alive(run, now_ms: float | None = None) -> bool:
    """Whether a RUNNING run's process still runs: this host's by its pid; another host's (unseen from here) as
    long as it keeps logging (each epoch logs metrics)."""
    tags = run.data.tags
    if tags.get("owner.host") == socket.gethostname():
        return _owner_alive(tags)
    stamps = [run.info.start_time or 0, *(m.timestamp for m in run.data._metric_objs)]
    return (now_ms or time.time() * 1000) - max(stamps) < IDLE_S * 1000


def close_orphans(experiment_id: str) -> list[str]:
    """Close as KILLED the RUNNING runs whose owning process is gone, say so, and return their ids.

    Gone: a process of this host that no longer exists, or an earlier start of this SLURM job (a requeued job
    starts again under its id, on whichever node, once the old start has ended; SLURM counts the starts). Runs
    owned by other hosts' processes cannot be checked from here and are left alone.
    """
    import mlflow

    client = mlflow.MlflowClient()
    host = socket.gethostname()
    job = slurm_tags()
    closed = []
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=50000):
        tags = run.data.tags
        earlier_start = (
            bool(job)
            and tags.get("slurm.job_id") == job["slurm.job_id"]
            and int(tags.get("slurm.restart_count", "0")) < int(job["slurm.restart_count"])
        )
        if not earlier_start and (tags.get("owner.host") != host or _owner_alive(tags)):
            continue
        status, error = "KILLED", f"its process (pid {tags.get('owner.pid')}) ended without closing it"
        note = Path(tags.get("hydra.output_dir") or "/nonexistent", UNCLOSED)
        with contextlib.suppress(OSError, ValueError, KeyError):
            left = json.loads(note.read_text())
            if left["run_id"] == run.info.run_id:  # it ended on a store failure, and left how to close it
                status, error = left["status"], left["error"]
        client.set_tag(run.info.run_id, "error", error)
        client.set_terminated(run.info.run_id, status=status)
        with contextlib.suppress(OSError):
            note.unlink(missing_ok=True)
        closed.append(run.info.run_id)
    if closed:
        log.warning("closed %d run(s) left RUNNING by a process that ended: %s", len(closed), ", ".join(closed))
    return closed


def find_run(run_id: str):
    """The run ``run_id`` of the current store, or None where it has no such run."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        return None


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

        self.client.log_batch(self.id, params=[Param(k, mask_secrets(str(v))[:6000]) for k, v in params.items()])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.id, tags=[RunTag(k, mask_secrets(str(v))) for k, v in tags.items()])

    def logged_steps(self, key: str) -> set[int]:
        """The steps at which metric ``key`` was logged in this run."""
        return {m.step for m in self.client.get_metric_history(self.id, key)}

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.id, str(path), artifact_path)

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.id, str(folder), artifact_path)

    def log_model(self, model, example, serialization: str = "weights") -> str:
        """Log the model so that ``mlflow.pyfunc.load_model(uri).predict(images)`` returns class scores, link
        the run's scores (``MODEL_METRICS``) to it, and return its URI (``models:/<model id>``).

        ``weights`` (the default): the weights as plain arrays and the net's arguments as JSON, loaded by this
        package's ``saved_model`` module (``mlflow.pyfunc`` with a ``loader_module``, no code copied): loading it
        unpickles nothing and runs no code from the store. ``pt2``: torch.export's traced graph through
        ``mlflow.pytorch`` (~2 s more per run). ``pickle``: ``mlflow.pytorch``'s pickle of the whole module, with
        this package's code copied beside it - loading it runs whatever code its files hold, so it trusts
        whoever can write the store; an explicit opt-in only. docs/PREDICT.md has each one's cost.

        A ``weights`` or ``pickle`` model is logged without a signature: a tensor signature names one dtype and
        one rank, and MLflow refuses every other input (float64 against float32, [N,28,28] against [N,1,28,28])
        before the model sees it. ``model.Classifier`` checks its input itself, accepts images as users have them
        (uint8 0..255 or float 0..1, [N,28,28], [N,1,28,28] or [N,784]) and refuses the rest in one line. A
        ``pt2`` model is a traced graph: it takes exactly its signature, float32 [N,1,28,28] in 0..1.
        """
        import tempfile

        import mlflow
        import numpy as np
        import torch
        from mlflow.models import infer_signature

        model = model.cpu().eval()
        example = np.asarray(example, dtype=np.float32)
        requirements = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]
        if serialization != "pt2":
            # The input example users see (and serving_input_example.json): raw uint8 images, [N,28,28].
            signature, example = False, (example[:2] * 255).round().astype(np.uint8).reshape(-1, 28, 28)
        else:
            with torch.no_grad():
                signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
        if serialization == "weights":
            with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=self.id), _installed():
                info = mlflow.pyfunc.log_model(
                    name="model",
                    loader_module=saved_model.LOADER,
                    data_path=str(saved_model.save(model, Path(tmp) / "classifier")),
                    input_example=example,
                    # Given explicitly: inferring them loads the model again in a subprocess (seconds per run).
                    # mnist_sweep itself is not among them: it is not on PyPI (a package of that name there
                    # would be someone else's code); where the model loads, this package must be installed.
                    pip_requirements=[*requirements, f"numpy=={np.__version__}"],
                )
            self.set_tags({MODEL_LOGGED: "true"})
            self.link_metrics(info.model_id)
            return info.model_uri
        pytorch_log = logging.getLogger("mlflow.pytorch")
        level = pytorch_log.level
        pytorch_log.setLevel(logging.ERROR)  # its pickle advice is answered by the docstring above
        try:
            with mlflow.start_run(run_id=self.id):  # log_model writes to the active run
                info = mlflow.pytorch.log_model(
                    model,
                    name="model",
                    signature=signature,
                    input_example=example,
                    serialization_format=serialization,
                    pip_requirements=requirements,
                    code_paths=[str(Path(__file__).parent)] if serialization == "pickle" else None,
                )
        finally:
            pytorch_log.setLevel(level)
        self.set_tags({MODEL_LOGGED: "true"})
        self.link_metrics(info.model_id)
        return info.model_uri

    def model_id(self) -> str | None:
        """The id of the model this run logged last (MLflow 3's LoggedModel), or None."""
        outputs = self.client.get_run(self.id).outputs
        models = outputs.model_outputs if outputs else []
        return max(models, key=lambda m: m.step).model_id if models else None

    def link_metrics(self, model_id: str, keys: tuple[str, ...] = ()) -> dict[str, float]:
        """Link the run's scores to its logged model, so the experiment's Models tab and the registered
        versions show them; returns what was linked. Each is sent again with its own timestamp and step, so the
        run's history gains no new point."""
        from mlflow.entities import Metric

        metrics = []
        for key in keys or MODEL_METRICS:
            history = self.client.get_metric_history(self.id, key)
            if history:
                m = max(history, key=lambda m: (m.step, m.timestamp))
                metrics.append(Metric(key, m.value, m.timestamp, m.step, model_id=model_id))
        if metrics:
            self.client.log_batch(self.id, metrics=metrics)
        return {m.key: m.value for m in metrics}


# ------------------------------------------------------------------------------------------------------------
# The Model Registry: each sweep's best model as a new version; the alias @champion on the best of them
# ------------------------------------------------------------------------------------------------------------

CHAMPION = "champion"  # the alias of the registered version with the best validation accuracy so far
SCORE = "best_val/acc"  # what champions are compared on (a version tag, copied from the run's metric)
MODEL_METRICS = (SCORE, "test/acc", "test/loss")  # linked to each logged model (the Models tab shows them)


class NoModelError(UserError):
    """No model behind a ``models:/`` URI (nothing registered yet, or a wrong name)."""


@dataclass
class Registration:
    """What ``register`` did: the new (or existing) version, and where the champion alias now points."""

    name: str
    version: str
    score: float | None
    champion: str | None  # the champion's version now
    previous: str | None  # the champion's version before (None: there was none)
    previous_score: float | None

    def summary(self) -> str:
        score = f"{SCORE} {self.score:.4f}" if self.score is not None else f"no {SCORE}"
        line = f"model registered: {self.name} version {self.version} ({score}); @{CHAMPION} "
        if self.champion != self.version:
            return line + f"stays version {self.champion} ({SCORE} {_fmt(self.previous_score)})"
        if self.previous in (None, self.version):
            return line + f"-> version {self.version}"
        return line + f"-> version {self.version} (was version {self.previous}, {_fmt(self.previous_score)})"


def _fmt(score: float | None) -> str:
    return f"{score:.4f}" if score is not None else "unknown"


def champion_uri(name: str) -> str:
    return f"models:/{name}@{CHAMPION}"


def store_lock(tracking_uri: str):
    """An exclusive lock between the processes sharing a SQLite store (on every OS), or nothing for a server."""
    db = sqlite_path(tracking_uri)
    return FileLock(db.with_name(db.name + ".lock")) if db is not None else contextlib.nullcontext()


def _version_score(client, version) -> float | None:
    """A version's validation accuracy: its tag, else its run's metric, else None (registered by hand)."""
    if SCORE in version.tags:
        return float(version.tags[SCORE])
    if version.run_id:
        with contextlib.suppress(Exception):
            value = client.get_run(version.run_id).data.metrics.get(SCORE)
            return float(value) if value is not None else None
    return None


def _champion(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def register(run_id: str, name: str, tags: dict[str, Any] | None = None) -> Registration:
    """Register the model the run logged as a new version of ``name`` (once: a run already registered keeps its
    version) and move ``@champion`` to it when its ``best_val/acc`` beats the champion's.

    The version carries the score as a tag; a champion without one (registered by hand) is judged by its run's
    metric, and one whose score is unknown keeps the alias.
    """
    import io

    import mlflow

    client = mlflow.MlflowClient()
    run = Run(run_id)
    model_id = run.model_id()
    if model_id is None:
        raise NoModelError(f"run {run_id} logged no model to register")
    metrics = run.link_metrics(model_id)
    score = metrics.get(SCORE)
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if found:
        version = max(found, key=lambda v: int(v.version))
    else:
        version_tags = {**{k: f"{v:.6g}" for k, v in metrics.items()}, **(tags or {})}
        with contextlib.redirect_stderr(io.StringIO()):  # its "Successfully registered" lines: ours says it all
            version = mlflow.register_model(f"models:/{model_id}", name, tags=version_tags)
    number = str(version.version)  # MLflow returns it as an int from some calls, a str from others
    with store_lock(mlflow.get_tracking_uri()):  # one compare-and-move of the alias at a time
        champion = _champion(client, name)
        previous = str(champion.version) if champion is not None else None
        previous_score = _version_score(client, champion) if champion is not None else None
        better = champion is None or (score is not None and previous_score is not None and score > previous_score)
        if better and previous != number:
            client.set_registered_model_alias(name, CHAMPION, number)
    return Registration(name, number, score, number if better else previous, previous, previous_score)


class UntrustedModelError(UserError):
    """A model whose loading would unpickle or run code from the store: refused unless trusted explicitly."""


def model_kind(folder: str | Path) -> str:
    """What a downloaded MLflow model folder holds, judged from its MLmodel alone (YAML, nothing run): ``weights``
    (``saved_model``: no pickle, no code) or ``pt2`` (``mlflow.pytorch``'s torch.export archive, which
    ``load_model`` has MLflow check for pickles); an UntrustedModelError for anything else (a pickle, code paths
    shipped with the model, another loader)."""
    import yaml

    folder = Path(folder)
    try:
        meta = yaml.safe_load((folder / "MLmodel").read_text())
    except FileNotFoundError:
        raise UntrustedModelError(f"{folder} holds no MLmodel: not an MLflow model") from None
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise UntrustedModelError(f"{folder / 'MLmodel'} is not YAML ({type(e).__name__}): damaged") from None
    flavors = meta.get("flavors") if isinstance(meta, dict) else None
    pyfunc = flavors.get("python_function") if isinstance(flavors, dict) else None
    if not isinstance(pyfunc, dict):
        raise UntrustedModelError(f"{folder / 'MLmodel'} has no python_function flavor")
    loader, data = pyfunc.get("loader_module"), str(pyfunc.get("data") or "")
    trust = (
        "loading it runs whatever code its files hold; only if you trust whoever can write the store: --trust-pickle"
    )
    weights = folder / data
    pt2 = (weights / "model.pt2").is_file() and not (weights / "model.pth").exists()
    if loader == "mlflow.pytorch" and not pt2:
        raise UntrustedModelError(f"the model is a pickle (mlflow.pytorch): {trust}")
    if pyfunc.get("code") or (isinstance(flavors.get("pytorch"), dict) and flavors["pytorch"].get("code")):
        raise UntrustedModelError(f"the model ships Python code (code paths): {trust}")
    if loader == saved_model.LOADER and ".." not in Path(data).parts and not Path(data).is_absolute():
        return "weights"
    if loader == "mlflow.pytorch":
        return "pt2"
    raise UntrustedModelError(f"the model loads through {loader!r}, not mnist_sweep's weights-only loader: {trust}")


def download_model(uri: str, dst: str | Path) -> tuple[Path, str]:
    """Copy the model behind ``uri`` into the folder ``dst`` once its MLmodel is checked (``model_kind``; nothing
    is copied when it would run code): the copy and its kind. A checked copy is what to serve:
    ``mlflow models serve -m DST --env-manager local``."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mnist-sweep-model-") as tmp:
        local, kind = _download_checked(uri, tmp)
        shutil.copytree(local, dst, dirs_exist_ok=True)
    return Path(dst), kind


def _download_checked(uri: str, dst: str) -> tuple[Path, str]:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        with _environment(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"):
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst))
    except MlflowException as e:
        raise NoModelError(f"cannot load {uri}: {str(e).splitlines()[0][:300]}") from e
    try:
        return local, model_kind(local)
    except UntrustedModelError as e:
        raise UntrustedModelError(f"refusing {uri}: {e}") from None


def load_model(uri: str, trust_pickle: bool = False):
    """The ``mlflow.pyfunc`` model behind ``uri``, loaded only when its files cannot run code: downloaded and its
    MLmodel checked (``model_kind``: this package's weights-only format, or a pt2 archive that MLflow then
    checks for pickles), then loaded from that checked copy. ``trust_pickle=True`` loads anything MLflow loads
    (a pickled model runs whatever code its files hold: it trusts whoever can write the store).

    A missing registered model or alias is a one-line NoModelError, a model that would run code an
    UntrustedModelError, damaged weights ``saved_model.ModelFileError``."""
    import shutil
    import tempfile

    import mlflow
    from mlflow.exceptions import MlflowException

    if trust_pickle:
        try:
            return mlflow.pyfunc.load_model(uri)
        except MlflowException as e:
            raise NoModelError(f"cannot load {uri}: {str(e).splitlines()[0][:300]}") from e
    tmp = tempfile.mkdtemp(prefix="mnist-sweep-model-")
    try:
        local, kind = _download_checked(uri, tmp)
        if kind == "weights":
            # Plain arrays read by this package: MLflow's check of the installed packages against the model's
            # requirements (a scan of every installed file, ~1 s a process) has nothing to protect here.
            return mlflow.pyfunc.load_model(str(local), suppress_warnings=True)
        with _environment(MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false"):  # MLflow checks the pt2 archive
            return mlflow.pyfunc.load_model(str(local))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _installed():
    """While a model whose requirements pin this very process's packages is logged, MLflow's check of them
    against the installed packages is skipped (where it saves the model and where it loads it back to try the
    input example): the check first maps every installed distribution's files to its modules
    (``importlib_metadata.packages_distributions()``: half a second per run, tens of thousands of ``stat``
    calls) to find a mismatch that cannot be there. A module that no longer has the function keeps its own."""
    import mlflow.pyfunc
    import mlflow.utils.environment

    name = "warn_dependency_requirement_mismatches"
    patched = [m for m in (mlflow.utils.environment, mlflow.pyfunc) if hasattr(m, name)]
    saved = [getattr(m, name) for m in patched]
    for m in patched:
        setattr(m, name, lambda requirements: None)
    try:
        yield
    finally:
        for m, check in zip(patched, saved, strict=True):
            setattr(m, name, check)


@contextmanager
def _environment(**values: str):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def start_run(
    experiment_id: str,
    run_name: str,
    tags: dict[str, str],
    parent_run_id: str | None = None,
    reopen: str | None = None,
):
    """Open a run (or ``reopen`` an interrupted one: back to RUNNING, the same run id and history) and
    guarantee it ends with the right status.

    FINISHED on success; KILLED when interrupted (Ctrl-C, SIGTERM turned into one by cli.py, a preempted SLURM job);
    FAILED on any other exception, with the reason as the ``error`` tag and the traceback as ``traceback.txt``.
    """
    import mlflow

    client = mlflow.MlflowClient()
    tags = mask_values({**context_tags(), **tags, **owner_tags()})
    if parent_run_id:
        tags = {**tags, "mlflow.parentRunId": parent_run_id}
    if reopen is None:
        run = client.create_run(experiment_id, run_name=mask_secrets(run_name), tags=tags)
    else:
        client.update_run(reopen, status="RUNNING")
        Run(reopen).set_tags(tags)  # its new owner (this process) and, in a sweep, its new parent
        run = client.get_run(reopen)
        if "error" in run.data.tags:  # what ended it before is not its story any more
            client.delete_tag(reopen, "error")
    status, tried = "FAILED", False
    try:
        yield Run(run.info.run_id)
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, SIGTERM (scancel), or submitit's exit on preemption
        status = "KILLED"
        raise
    except Discard:
        tried = True
        client.set_terminated(run.info.run_id, status="KILLED")
        if reopen is None:
            client.delete_run(run.info.run_id)
        raise
    except BaseException as e:
        problem = store_problem(e, mlflow.get_tracking_uri())
        if problem is not None:  # the store (or the disk) failed: one line, and no more waiting on it than once
            what = f"the MLflow store {mlflow.get_tracking_uri()} failed"
            if isinstance(e, OSError) and e.filename:
                what = f"cannot write {e.filename}"
            tried = True
            closed = _close(client, run.info.run_id, status, tags, f"{what}: {problem}")
            after = "" if closed else "; the next command closes it FAILED once the store is back"
            raise StoreFailed(f"{what} during run {run.info.run_id}: {problem}; what was logged is kept{after}") from e
        try:
            client.set_tag(run.info.run_id, "error", mask_secrets(f"{type(e).__name__}: {e}")[:5000])
            client.log_text(run.info.run_id, mask_secrets(traceback.format_exc()), "traceback.txt")
        except Exception:  # the status below matters more
            pass
        raise
    finally:
        if not tried and not _close(client, run.info.run_id, status, tags):
            log.error("could not mark MLflow run %s %s", run.info.run_id, status)


UNCLOSED = "mlflow_run_unclosed.json"  # in a run's output folder: how to close it, when its store could not


def _close(client, run_id: str, status: str, tags: dict[str, str], error: str | None = None) -> bool:
    """End the run with ``status`` (and its ``error``), trying a server once; where the store cannot be
    reached, leave that note in the run's folder for ``close_orphans``. Whether it is closed."""
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES

    retries = os.environ.get(MLFLOW_HTTP_REQUEST_MAX_RETRIES.name)
    os.environ[MLFLOW_HTTP_REQUEST_MAX_RETRIES.name] = "0"
    error = mask_secrets(error) if error else error  # it may name the store's URI
    try:
        if error:
            client.set_tag(run_id, "error", error[:5000])
        client.set_terminated(run_id, status=status)
        return True
    except Exception:
        folder = tags.get("hydra.output_dir")
        if folder and error:
            with contextlib.suppress(OSError):
                Path(folder, UNCLOSED).write_text(json.dumps({"run_id": run_id, "status": status, "error": error}))
        return False
    finally:
        if retries is None:
            os.environ.pop(MLFLOW_HTTP_REQUEST_MAX_RETRIES.name)
        else:
            os.environ[MLFLOW_HTTP_REQUEST_MAX_RETRIES.name] = retries


# ------------------------------------------------------------------------------------------------------------
# What the UI shows beside the numbers: where a run came from, its dataset, and links that open the right view
# ------------------------------------------------------------------------------------------------------------


def context_tags() -> dict[str, str]:
    """The tags ``mlflow.start_run`` sets from its context (``mlflow.source.name``, ``mlflow.source.type``,
    ``mlflow.user``, git), for runs made with ``MlflowClient.create_run``, which sets none."""
    from mlflow.tracking.context.registry import resolve_tags

    return resolve_tags()


def log_dataset(run_id: str, name: str, source: str, splits: dict[str, tuple[str, dict[str, Any]]]) -> None:
    """Log the splits a run used as MLflow dataset inputs: ``splits`` maps each context (train, validation,
    test) to its digest and profile (e.g. ``{"num_rows": 55000}``). Only this description is stored, never the
    images: ``source`` says where they are."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.entities import Dataset, DatasetInput, InputTag

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "can be interpreted in multiple ways": a local path is a local path
        found = resolve_dataset_source(source)
    inputs = [
        DatasetInput(
            Dataset(name, digest, found._get_source_type(), found.to_json(), profile=json.dumps(profile)),
            tags=[InputTag("mlflow.data.context", context)],
        )
        for context, (digest, profile) in splits.items()
    ]
    for attempt in range(3):
        try:
            return mlflow_client().log_inputs(run_id, datasets=inputs)
        except Exception as e:
            # Trials of parallel launches log the same dataset at the same moment; MLflow looks it up, then inserts
            # it, so the later insert fails on the dataset's key. It exists now: a second try links this run to it.
            if attempt == 2 or not re.search(DATASET_RACE, str(e)):
                raise
            time.sleep(0.2 * (attempt + 1))


# The error of the insert that lost that race: PostgreSQL's (through a server too) and SQLite's
DATASET_RACE = r'unique constraint "dataset_pk"|UNIQUE constraint failed: datasets\.'


def mlflow_client():
    import mlflow

    return mlflow.MlflowClient()


def run_tags(run_id: str) -> dict[str, str]:
    return mlflow_client().get_run(run_id).data.tags


def sibling_named(experiment_id: str, parent_id: str, name: str) -> bool:
    """Whether another run of the sweep ``parent_id`` is named ``name`` already."""
    if "'" in name:
        return False  # not expressible in a filter; such names come from odd values, numbered anyway
    runs = mlflow_client().search_runs(
        [experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent_id}' and attributes.run_name = '{name}'",
        max_results=1,
    )
    return bool(runs)


def ui_base(ui_url: str | None, tracking_uri: str) -> str:
    """Where the MLflow UI is: ``mlflow.ui_url``, else the tracking server, else ``mlflow ui``'s own address (a
    login in the URL left out: the browser asks for it)."""
    if ui_url:
        return _without_login(ui_url).rstrip("/")
    if urlparse(tracking_uri).scheme in ("http", "https"):
        return _without_login(tracking_uri).rstrip("/")
    return "http://127.0.0.1:5000"


def _without_login(url: str) -> str:
    parts = urlparse(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl() if "@" in parts.netloc else url


def serve_hint(ui_url: str | None, tracking_uri: str) -> str:
    """How to start the UI our links open, for a local store (a tracking server serves its own)."""
    if ui_url or urlparse(tracking_uri).scheme in ("http", "https"):
        return ""
    return f"  (start it: mlflow ui --backend-store-uri {mask_secrets(tracking_uri)})"


def _ml_view(base: str, route: str, **params: str) -> str:
    return f"{base}/#/{route}?" + urlencode({"workflowType": "machine_learning", **params}, quote_via=quote)


def run_link(base: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the UI."""
    return _ml_view(base, f"experiments/{experiment_id}/runs/{run_id}")


SHARED_VIEW = "mlflow.sharedViewState."  # experiment tag prefix of the UI's saved views (MLflow 3.17)


def comparison_link(base: str, experiment_id: str, key: str, name: str, filter_string: str, columns: list[str]) -> str:
    """A link that opens the experiment's runs table on the runs ``filter_string`` selects, best ``best_val/acc``
    first, with these ``columns`` (``params.`model.hidden```, ``metrics.`best_val/acc```) shown first.

    The UI reads a search filter from its URL but the visible columns only from local storage or from a saved
    view: so the view is saved as the experiment tag ``mlflow.sharedViewState.<key>`` (in the envelope the UI's
    own "Save view" writes; it appears under "Views" as ``name``) and the link opens it (``viewStateShareKey``).
    """
    state = {
        "searchFilter": filter_string,
        "orderByKey": "metrics.`best_val/acc`",
        "orderByAsc": False,
        "selectedColumns": columns,
        "columnOrder": ["attributes.`Run Name`", *columns],
        "columnWidths": {"attributes.`Run Name`": 200},
    }
    now = int(time.time() * 1000)
    envelope = {"name": name, "createdAt": now, "updatedAt": now, "state": json.dumps(state)}
    mlflow_client().set_experiment_tag(experiment_id, SHARED_VIEW + key, json.dumps(envelope))
    return _ml_view(base, f"experiments/{experiment_id}/runs", viewStateShareKey=key)
