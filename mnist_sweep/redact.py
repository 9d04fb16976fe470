"""Secrets never stored or printed: a password in a tracking URI or a study's storage URL is masked as ``***``.

``mask_secrets`` is the one function that does it (``postgresql+psycopg://alice:***@host/db``,
``http://alice:***@host:5000``, ``...?password=***``); it is applied wherever the project writes or prints text
that may hold an override, a command or a URI: MLflow params, tags and run names (``tracking.Run``,
``tracking.start_run``), the files Hydra writes (``.hydra/*.yaml``, ``multirun.yaml``: rewritten by the sweep
callback right after Hydra writes them), saved configs, every log record (``mask_logs``), tracebacks and the
one-line errors. The process itself keeps the real URI: it needs it to connect.

Better still, the password is never in the URI: ``warn_credentials`` says once where to put it instead
(docs/CREDENTIALS.md).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any

log = logging.getLogger("mnist_sweep")

MASK = "***"

# scheme://user:password@host: the password runs to the last "@" of the authority (an unencoded "@" or "/" in
# it is still masked whole), never across whitespace. A user name without a password is left as it is. Hydra's
# escaped form of an override value (http\://alice\:pw@host\:5000) too, and that form in JSON.
_USERINFO = re.compile(
    r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*\\*://[^:/?#@\s'\"]*:)(?P<password>[^\s]*?)(?=@[^@\s'\"/?#]*(?:[/?#\s'\"]|$))"
)
# ...?password=... or &passwd=... in a query string (libpq, SQLAlchemy dialects).
_QUERY = re.compile(r"(?P<head>[?&](?:password|passwd)=)(?P<password>[^&#\s'\"]+)", re.IGNORECASE)


def mask_secrets(text: str) -> str:
    """``text`` with the password of every URI in it replaced by ``***`` (idempotent; other text unchanged)."""
    if "://" not in text and "pass" not in text.lower():
        return text
    text = _USERINFO.sub(lambda m: m["head"] + MASK, text)
    return _QUERY.sub(lambda m: m["head"] + MASK, text)


def has_password(uri: str | None) -> bool:
    return bool(uri) and mask_secrets(str(uri)) != str(uri)


def mask_values(value: Any) -> Any:
    """Every string in a plain structure (dicts, lists: a config as a container) masked."""
    if isinstance(value, str):
        return mask_secrets(value)
    if isinstance(value, dict):
        return {k: mask_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(mask_values(v) for v in value)
    return value


def mask_files(*paths: Path) -> None:
    """Rewrite each text file that holds a password (Hydra's ``.hydra/*.yaml``, ``multirun.yaml``) masked:
    whole or not at all (a new file renamed over the old one), so a parallel trial never reads half a file."""
    for path in paths:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        masked = mask_secrets(text)
        if masked == text:
            continue
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(masked)
        os.replace(tmp, path)


def mask_hydra_files(job_dir: str | Path | None, sweep_dir: str | Path | None = None) -> None:
    """The files Hydra wrote for a job (``JOB_DIR/*.yaml``: its ``.hydra/``) and for its sweep
    (``SWEEP_DIR/multirun.yaml``)."""
    paths = []
    if job_dir:
        paths += sorted(Path(job_dir).glob("*.yaml"))
    if sweep_dir:
        paths.append(Path(sweep_dir) / "multirun.yaml")
    mask_files(*(p for p in paths if p.is_file()))


def mask_logs() -> None:
    """Mask every log record (whatever handlers Hydra or a library installs later, in this process) and the
    traceback of an uncaught exception. Idempotent."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "masks_secrets", False):
        return

    def factory(*args, **kwargs):
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: the handler reports it as usual
            return record
        masked = mask_secrets(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            record.exc_text = mask_secrets(logging.Formatter().formatException(record.exc_info))
        return record

    factory.masks_secrets = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
    if sys.excepthook is sys.__excepthook__:
        sys.excepthook = _masked_excepthook


def _masked_excepthook(kind, value, tb) -> None:
    sys.stderr.write(mask_secrets("".join(traceback.format_exception(kind, value, tb))))
    sys.stderr.flush()


_WARNED = False


def advice(uri: str) -> str:
    """Where the password of ``uri`` belongs instead."""
    scheme = uri.split("://", 1)[0].lower()
    if scheme in ("http", "https"):
        return "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the environment (or ~/.mlflow/credentials)"
    if scheme.startswith("postgres"):
        return "PGPASSWORD in the environment or ~/.pgpass"
    return "the database client's own environment variables or option files"


def warn_credentials(uris: dict[str, str | None]) -> bool:
    """One warning line, once per process, naming the settings (``{"mlflow.tracking_uri": URI}``) whose URI
    carries a password and where each password belongs instead; True when it warned."""
    global _WARNED
    found = {key: str(uri) for key, uri in uris.items() if has_password(uri)}
    if not found or _WARNED:
        return False
    _WARNED = True
    where = "; ".join(f"{key}: {advice(uri)}" for key, uri in found.items())
    log.warning(
        "%s carr%s a password: it is masked (%s) in everything this project writes, but your shell history and "
        "process list hold it; drop it from the URL and give it through the environment instead (%s; "
        "docs/CREDENTIALS.md)",
        " and ".join(found),
        "ies" if len(found) == 1 else "y",
        MASK,
        where,
    )
    return True
