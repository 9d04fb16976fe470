"""Secrets never stored or printed (issue 31): a password in a tracking URI or a study's storage URL is masked
(``***``) in everything the project writes or prints.

The unit tests check the masking function on odd URIs. The end-to-end test runs a real search and a real single
run with passwords that must work, given only in the URIs: an MLflow server with its basic-auth app (the password
in ``http://alice:PASSWORD@...`` is what lets the runs in) and a PostgreSQL with password authentication (the
study's storage, and a tracking store of its own). Then it greps every file under the run folders, every MLflow
param, tag and artifact, and what the commands printed. The servers are started here (Debian's ``postgresql``
package; MLflow's auth app needs ``mlflow[auth]``).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest
from omegaconf import OmegaConf

from conftest import make_dataset, train_py
from mnist_sweep import redact
from mnist_sweep.redact import mask_secrets


@pytest.mark.parametrize(
    ("uri", "masked"),
    [
        ("postgresql+psycopg://alice:PASSWORD@host/db", "postgresql+psycopg://alice:***@host/db"),
        ("http://user:PASSWORD@host:5000", "http://user:***@host:5000"),
        ("https://user:PASSWORD@host/mlflow/", "https://user:***@host/mlflow/"),
        ("http://:TOKEN@host", "http://:***@host"),
        ("postgresql://alice:p%40ss%3Aw@host:5432/db", "postgresql://alice:***@host:5432/db"),  # url-encoded @ and :
        ("postgresql://alice:p@ss@host/db", "postgresql://alice:***@host/db"),  # an @ left unencoded
        ("postgresql://alice:pa/ss:x@host/db", "postgresql://alice:***@host/db"),  # SQLAlchemy takes / and :
        (
            "postgresql://host/db?user=alice&password=s3cret&sslmode=require",
            "postgresql://host/db?user=alice&password=***&sslmode=require",
        ),
        ("mysql://host/db?PASSWD=s3cret", "mysql://host/db?PASSWD=***"),
        # shell-quoted (a quote in the password), in JSON, in YAML, two in one line
        ("'mlflow.tracking_uri=http://alice:p'\"'\"'w@h:5000'", "'mlflow.tracking_uri=http://alice:***@h:5000'"),
        ('["mlflow.tracking_uri=http://u:x@h:1", "b@c"]', '["mlflow.tracking_uri=http://u:***@h:1", "b@c"]'),
        ("tracking_uri: http://u:x@h:1\nstorage: null\n", "tracking_uri: http://u:***@h:1\nstorage: null\n"),
        ("see http://a:b@h/x and http://c:d@i:2.", "see http://a:***@h/x and http://c:***@i:2."),
        ("'mlflow.tracking_uri=http\\://alice\\:pw@h\\:5000'", "'mlflow.tracking_uri=http\\://alice\\:***@h\\:5000'"),
        ('["mlflow.tracking_uri=http\\\\://a\\\\:pw@h\\\\:1"]', '["mlflow.tracking_uri=http\\\\://a\\\\:***@h\\\\:1"]'),
    ],
)
def test_a_password_in_a_uri_is_masked(uri, masked):
    assert mask_secrets(uri) == masked
    assert mask_secrets(masked) == masked  # idempotent
    assert redact.has_password(uri)


@pytest.mark.parametrize(
    "text",
    [
        "http://alice@host:5000",  # a user, no password
        "http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning",
        "sqlite:////tmp/mlruns/mlflow.db",
        "sqlite:///mlruns/optuna.db",
        "http://[::1]:5000/api",
        "file:///C:/mlruns",
        "model.hidden=128 optimizer=adam user@example.org",
        "",
    ],
)
def test_text_without_a_password_is_left_alone(text):
    assert mask_secrets(text) == text
    assert not redact.has_password(text)


@pytest.mark.parametrize("show", [["--cfg", "job"], ["--cfg", "hydra"], ["--info", "config"]])
def test_the_printed_config_masks_the_password(tmp_path, show):
    """Hydra prints the composed config (and the overrides) for --cfg/--info: the password is masked there too."""
    proc = train_py(*show, "mlflow.tracking_uri=postgresql+psycopg://bob:SeCrEt@db:5432/mlflow", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "SeCrEt" not in proc.stdout + proc.stderr
    assert "bob:***@db:5432" in proc.stdout
    assert not list(tmp_path.iterdir())  # printing the config runs nothing


def test_masked_log_records_files_and_one_warning(tmp_path, caplog, monkeypatch):
    redact.mask_logs()
    redact.mask_logs()  # idempotent: one factory
    with caplog.at_level(logging.INFO):
        logging.getLogger("x").info("launching #0 : %s", "mlflow.tracking_uri=http://a:SeCrEt@h:1")
        try:
            raise ValueError("cannot reach http://a:SeCrEt@h:1")
        except ValueError:
            logging.getLogger("x").exception("failed")
    assert "SeCrEt" not in caplog.text and "http://a:***@h:1" in caplog.text
    hydra = tmp_path / ".hydra"
    hydra.mkdir()
    (hydra / "overrides.yaml").write_text("- mlflow.tracking_uri=http://a:SeCrEt@h:1\n")
    (hydra / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "multirun.yaml").write_text("storage: postgresql://a:SeCrEt@h/db\n")
    redact.mask_hydra_files(hydra, tmp_path)
    assert (hydra / "overrides.yaml").read_text() == "- mlflow.tracking_uri=http://a:***@h:1\n"
    assert (tmp_path / "multirun.yaml").read_text() == "storage: postgresql://a:***@h/db\n"
    assert sorted(p.name for p in tmp_path.rglob("*")) == [".hydra", "config.yaml", "multirun.yaml", "overrides.yaml"]
    monkeypatch.setattr(redact, "_WARNED", False)
    caplog.clear()
    uris = {"mlflow.tracking_uri": "http://a:SeCrEt@h:1", "hydra.sweeper.storage": "postgresql://a:SeCrEt@h/db"}
    assert redact.warn_credentials(uris) and not redact.warn_credentials(uris)  # once
    assert len(caplog.records) == 1 and "SeCrEt" not in caplog.text
    assert "MLFLOW_TRACKING_PASSWORD" in caplog.text and "PGPASSWORD" in caplog.text
    monkeypatch.setattr(redact, "_WARNED", False)
    assert not redact.warn_credentials({"mlflow.tracking_uri": "http://a@h:1", "hydra.sweeper.storage": None})


# ------------------------------------------------------------------------------------------------------------
# End to end: real servers that need the passwords, a real search and a real run
# ------------------------------------------------------------------------------------------------------------

USER = "alice"
HTTP_SECRET = "Http5ecret@Pw:2031x"  # raw; in the URI url-encoded (@ and : in a password must be)
PG_SECRET = "Pg5ecret/Pw:2031x"
TOKENS = ("Http5ecret", "Pg5ecret")  # what must appear nowhere


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _postgres(base: Path):
    """A PostgreSQL that asks every connection for a password (scram), with the role alice and two databases."""
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if not bins:
        pytest.fail("PostgreSQL is not installed: apt-get install postgresql (bash .ci/run does it)")
    bin_dir, port = bins[-1].parent, _free_port()
    as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    run_dir = base / "pg"  # its data, socket and log: the server's user owns it
    run_dir.mkdir()
    if as_pg:
        shutil.chown(run_dir, "postgres", "postgres")
    data, pwfile = run_dir / "data", base / "superuser-password"
    superuser = "Su" + os.urandom(8).hex()
    pwfile.write_text(superuser + "\n")
    pwfile.chmod(0o644)
    initdb = [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "scram-sha-256", f"--pwfile={pwfile}"]
    subprocess.run([*as_pg, *initdb], check=True, capture_output=True, timeout=120)
    options = f"-p {port} -k {run_dir} -c listen_addresses=127.0.0.1"
    start = [str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(run_dir / "log"), "-w", "start"]
    subprocess.run([*as_pg, *start], check=True, capture_output=True, timeout=120)
    env = {**os.environ, "PGPASSWORD": superuser}
    psql = [str(bin_dir / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-v", "ON_ERROR_STOP=1"]
    sql = f"CREATE ROLE {USER} LOGIN PASSWORD '{PG_SECRET}'; CREATE DATABASE optuna OWNER {USER};"
    sql += f" CREATE DATABASE mlflow OWNER {USER};"
    for statement in sql.split(";")[:-1]:
        subprocess.run([*psql, "-c", statement], env=env, check=True, capture_output=True, timeout=60)
    stop = [*as_pg, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]
    return port, stop


def _mlflow_server(base: Path) -> tuple[int, subprocess.Popen]:
    """`mlflow server` with its basic-auth app: alice is its admin, nothing is answered without her password."""
    port = _free_port()
    (base / "auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{base}/auth/basic_auth.db\nadmin_username = {USER}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    (base / "auth").mkdir()
    env = {
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": str(base / "auth.ini"),
        "MLFLOW_AUTH_ADMIN_PASSWORD": HTTP_SECRET,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": os.urandom(16).hex(),
    }
    store = f"sqlite:///{base}/mlflow.db"
    command = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--backend-store-uri", store]
    command += ["--artifacts-destination", str(base / "artifacts"), "--host", "127.0.0.1", "-p", str(port)]
    log = open(base / "server.log", "wb")  # noqa: SIM115  (open while the server runs)
    # Its own process group: `mlflow server` leaves helper processes behind unless the whole group is stopped.
    server = subprocess.Popen(command, cwd=base, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while True:
        assert server.poll() is None, (base / "server.log").read_text()[-3000:]
        try:
            urllib.request.urlopen(
                f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1", timeout=2
            )
            pytest.fail("the server answered without a password")
        except urllib.error.HTTPError as e:
            if e.code == 401:
                return port, server
        except OSError:
            pass
        assert time.monotonic() < deadline, (
            "mlflow server did not answer in 120 s:\n" + (base / "server.log").read_text()
        )
        time.sleep(0.5)


def _stop(server: subprocess.Popen) -> None:
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=20)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def servers():
    # PostgreSQL runs as user postgres (when we are root), which must reach its folder: not under pytest's 0700 tmp.
    base = Path(tempfile.mkdtemp(prefix="mnist-sweep-secrets-"))
    base.chmod(0o755)
    stop_pg, server = None, None
    try:
        pg_port, stop_pg = _postgres(base)
        http_port, server = _mlflow_server(base)
        yield {
            "http": f"http://{USER}:{quote(HTTP_SECRET, safe='')}@127.0.0.1:{http_port}",
            "optuna": f"postgresql+psycopg://{USER}:{quote(PG_SECRET, safe='')}@127.0.0.1:{pg_port}/optuna",
            "mlflow_pg": f"postgresql+psycopg://{USER}:{quote(PG_SECRET, safe='')}@127.0.0.1:{pg_port}/mlflow",
            "base": base,
        }
    finally:
        if server is not None:
            _stop(server)
        if stop_pg is not None:
            subprocess.run(stop_pg, capture_output=True, timeout=120)
        shutil.rmtree(base, ignore_errors=True)


def _leaks(folder: Path) -> list[str]:
    """Files under ``folder`` that hold a secret, raw or url-encoded."""
    needles = [t.encode() for t in TOKENS]
    return [str(p) for p in folder.rglob("*") if p.is_file() and any(n in p.read_bytes() for n in needles)]


def _mlflow_leaks(uri: str, into: Path) -> tuple[list[str], list[str], int]:
    """Params, tags and run names holding a secret, and artifact files (downloaded into ``into``) holding one;
    and how many runs were looked at."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    found, runs = [], []
    for exp in client.search_experiments():
        found += [f"experiment tag {k}" for k, v in exp.tags.items() if any(t in v for t in TOKENS)]
        runs += client.search_runs([exp.experiment_id], max_results=1000)
    for run in runs:
        texts = {
            **{f"param {k}": v for k, v in run.data.params.items()},
            **{f"tag {k}": v for k, v in run.data.tags.items()},
        }
        texts["run name"] = run.info.run_name
        found += [f"{run.info.run_id} {k}: {v}" for k, v in texts.items() if any(t in v for t in TOKENS)]
        client.download_artifacts(run.info.run_id, "", str(into / run.info.run_id))
    return found, _leaks(into), len(runs)


@pytest.mark.e2e
def test_no_password_is_stored_or_printed_by_a_search_and_a_run(servers, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # this test's downloads
    make_dataset(tmp_path / "data")
    common = [
        "trainer.epochs=1",
        "data.val_size=20",
        f"data.root={tmp_path / 'data'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.download=false",
        "data.verify=false",  # synthetic files: not the published checksums
        "mlflow.log_model=false",
    ]
    # Nothing from the environment may stand in for the passwords in the URIs: they must work as given.
    env = {k: None for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PGPASSWORD", "PGPASSFILE")}
    search = train_py(
        "-m",
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweeper.storage={servers['optuna']}",
        f"hydra.sweeper.preset_dir={tmp_path / 'presets'}",
        "model.hidden=choice(8,16)",
        f"mlflow.tracking_uri={servers['http']}",
        *common,
        cwd=tmp_path,
        env=env,
    )
    printed = search.stdout + search.stderr
    assert search.returncode == 0, printed[-3000:]
    single = train_py("model.hidden=8", f"mlflow.tracking_uri={servers['mlflow_pg']}", *common, cwd=tmp_path, env=env)
    assert single.returncode == 0, (single.stdout + single.stderr)[-3000:]
    printed += single.stdout + single.stderr

    assert not [line for line in printed.splitlines() if any(t in line for t in TOKENS)]
    # One warning per command, pointing at the environment variables instead
    search_warnings = [line for line in search.stderr.splitlines() + search.stdout.splitlines() if "a password" in line]
    assert len(search_warnings) == 1, search_warnings
    assert "MLFLOW_TRACKING_PASSWORD" in search_warnings[0] and "PGPASSWORD" in search_warnings[0]
    assert "PGPASSWORD" in single.stdout + single.stderr
    assert f"{servers['http'].split('@')[1]}/#/experiments" in printed  # the UI link, without the login
    assert "mlflow ui --backend-store-uri postgresql+psycopg://alice:***@" in printed  # the hint, masked

    assert not _leaks(tmp_path), _leaks(tmp_path)  # outputs/ (.hydra, multirun.yaml, logs, configs), mlruns/, presets
    assert (tmp_path / "outputs").is_dir() and list((tmp_path / "outputs").rglob("overrides.yaml"))
    hydra_files = "".join(p.read_text() for p in (tmp_path / "outputs").rglob("*.yaml"))
    assert "alice:***@127.0.0.1" in hydra_files  # masked, not dropped
    assert not _leaks(servers["base"] / "artifacts")
    for name, uri in (("http", servers["http"]), ("mlflow_pg", servers["mlflow_pg"])):
        found, files, n_runs = _mlflow_leaks(uri, tmp_path.parent / f"downloaded-{name}")
        assert n_runs >= (3 if name == "http" else 1)
        assert not found and not files, (found, files)
    # The masked overrides are what the runs record (a search passes its storage to each trial)
    from mlflow import MlflowClient

    client = MlflowClient(servers["http"])
    runs = client.search_runs([client.get_experiment_by_name("mnist-sweep").experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert (
        f"mlflow.tracking_uri={servers['http'].replace(quote(HTTP_SECRET, safe=''), '***')}"
        in (parent.data.params["sweep.overrides"])
    )
    trial = next(r for r in runs if "optuna.storage" in r.data.params)  # a trial of the search (not its test run)
    assert trial.data.params["optuna.storage"] == servers["optuna"].replace(quote(PG_SECRET, safe=""), "***")
    assert OmegaConf.create(trial.data.tags["trial.overrides"])  # still valid JSON/YAML
