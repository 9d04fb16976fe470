"""The command line: every mistake a user can make ends as one line naming the problem and the fix.

``train.py`` wraps its ``@hydra.main`` function in ``cli``: bad overrides, bad values, missing data and an
unreachable store print ``error: ...`` and exit 2 (a diverged run exits 1), with no traceback; a sweep is
closed with its leaderboard whatever happens; Ctrl-C and SIGTERM close the MLflow runs as KILLED (exit 130).
Anything else is a bug and keeps its traceback. ``HYDRA_FULL_ERROR=1`` shows every traceback.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import NoReturn

from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException, OverrideParseException
from omegaconf.errors import OmegaConfBaseException

from mnist_sweep import UserError, sweep
from mnist_sweep.redact import mask_secrets

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def sigterm_to_interrupt() -> None:
    """Let SIGTERM (a scheduler or `kill`) unwind like Ctrl-C, so the MLflow run is closed as KILLED."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def _group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


# Hydra names a launcher/sweeper whose package is not installed only in a RuntimeError.
_MISSING_PLUGIN = re.compile(r"Unknown plugin class : '(hydra_plugins\.hydra_(\w+?)_\w+)\.")


def explain(e: BaseException) -> str:
    """Turn Hydra/OmegaConf/our own errors into one line that names the problem and the fix."""
    if isinstance(e, UserError):
        return str(e)
    text = str(e).strip()
    m = _MISSING_PLUGIN.search(text)
    if m:
        package = {"joblib": "hydra-joblib-launcher", "submitit": "hydra-submitit-launcher"}.get(m.group(2), m.group(1))
        return f'the Hydra plugin {m.group(1)} is not installed; pip install {package} (or pip install -e ".[dev]")'
    if isinstance(e, MissingConfigException):
        m = re.search(r"Could not find '([\w/]+)/([^']+)'", text)
        if m:
            group, option = m.groups()
            choices = ", ".join(_group_options(group))
            return f"{group}={option} does not exist; choose one of: {choices} (e.g. {group}={choices.split(', ')[0]})"
    if isinstance(e, OverrideParseException):
        return f"cannot parse the command line: {text.splitlines()[0]}; write overrides as key=value"
    cause = e.__cause__ if isinstance(e, ConfigCompositionException) and e.__cause__ else e
    if isinstance(cause, OmegaConfBaseException):
        key = getattr(cause, "full_key", None)
        msg = str(cause).splitlines()[0].strip()
        m = re.search(r"override '?([^'\s]+)'?", text)
        where = m.group(1).rstrip(".") if m else key
        if "not in" in msg or "Key '" in msg and "not" in msg:
            return f"{where}: no such config key ({msg}); see `python train.py --cfg job` for the keys"
        return f"{where}: {msg}; fix the value on the command line (`python train.py --cfg job` shows the types)"
    if isinstance(e, ConfigCompositionException):
        return text.splitlines()[0] + "; see `python train.py --help`"
    if _disk_problem(e):
        fix = (
            "free space (df -h .) and relaunch"
            if e.errno in (errno.ENOSPC, errno.EDQUOT)
            else "run from a folder you can write, or send the outputs elsewhere: hydra.run.dir=DIR "
            "(hydra.sweep.dir=DIR with -m) and mlflow.tracking_uri=sqlite:////DIR/mlflow.db"
        )
        return f"cannot write {e.filename or 'a file'}: {e.strerror}; {fix}"
    first = text.splitlines()[0] if text else ""
    if isinstance(e, ValueError):  # Hydra's own command-line checks
        return f"{first}; see `python train.py --help`"
    return f"{type(e).__name__}: {first}"


def cli(hydra_main) -> None:
    """Run the ``@hydra.main`` function; print a user's mistake as ``error: ...``, no traceback.

    Mistakes (bad overrides, bad values, missing data...) exit with status 2, a diverged run with 1; anything
    else is a bug and keeps its traceback. Set HYDRA_FULL_ERROR=1 to see every traceback.
    """
    user_wants_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let exceptions reach us instead of Hydra's multi-line report
    sigterm_to_interrupt()
    # Our presets conf/hydra/launcher/{joblib,submitit_*}.yaml set a few fields of the plugins' schemas of the
    # same name, which Hydra 1.3 merges as intended while warning that this might change in a later version.
    warnings.filterwarnings("ignore", message=r"(?s).*'hydra/launcher/\w+' is validated against ConfigStore schema")
    if {"--cfg", "-c", "--info", "-i"} & set(sys.argv[1:]):  # Hydra prints the config: a URI's password too
        sys.stdout = _Masked(sys.stdout)
    try:
        hydra_main()
        summary = sweep.finish()  # normally done by the callback's on_multirun_end already
        if summary is not None and summary.failed:  # a sweeper that keeps going after a failed trial
            print(f"error: {_failed_line(summary)}", file=sys.stderr)
            _exit_now(1)
        _exit_now(0)
    except KeyboardInterrupt as e:
        sweep.finish(e)
        print("interrupted: the MLflow run was closed as KILLED", file=sys.stderr)
        sys.exit(130)
    except BaseException as e:
        if isinstance(e, sweep.StartFailed):  # the sweep could not start (bad value, unreachable store)
            e = e.error
        # Hydra's basic sweeper raises the first failed trial's exception after the batch has run, without
        # calling on_multirun_end: close the sweep here, after every trial, and exit non-zero.
        summary = sweep.finish(e) if not isinstance(e, SystemExit) else None
        if summary is not None and summary.failed and not user_wants_traceback:
            print(f"error: {_failed_line(summary)}", file=sys.stderr)
            _exit_now(1)
        usage = isinstance(e, (UserError, HydraException, OmegaConfBaseException)) or _hydra_usage_error(e)
        usage = usage or _MISSING_PLUGIN.search(str(e)) is not None or _disk_problem(e)
        if not usage or user_wants_traceback:
            raise e
        print(f"error: {mask_secrets(explain(e))}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))


class _Masked:
    """A text stream that writes through ``mask_secrets`` (what Hydra prints for ``--cfg``/``--info``)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        return self._stream.write(mask_secrets(text))

    def __getattr__(self, name):
        return getattr(self._stream, name)


def fail(e: UserError) -> NoReturn:
    """Print a user's mistake as one line and exit with its code."""
    print(f"error: {mask_secrets(str(e))}", file=sys.stderr)
    sys.exit(e.exit_code)


def _disk_problem(e: BaseException) -> bool:
    """A full disk or a folder that cannot be written: the machine's state, not a bug, so one line."""
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)


def _hydra_usage_error(e: BaseException) -> bool:
    """Hydra rejects some command lines with a plain ValueError (e.g. `-m` together with `--cfg`)."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return isinstance(e, ValueError) and tb is not None and "/hydra/" in tb.tb_frame.f_code.co_filename


def _failed_line(summary) -> str:
    first = summary.failed[0]
    return (
        f"{len(summary.failed)} of {len(summary.rows)} trials failed (first: trial {first['trial']}, "
        f"{first.get('note') or 'no reason recorded'}); the leaderboard above lists them, their MLflow runs "
        "hold the tracebacks; fix and relaunch the same command to run only what is missing"
    )


def _exit_now(status: int) -> None:
    """Exit without the interpreter's teardown, once every run is closed and every stream flushed.

    Freeing torch's (CUDA build) library state at interpreter exit takes ~1.4 s here, a tenth of a short run.
    Nothing is lost: MLflow runs are ended and their writes committed before this point.
    """
    if sweep.release_workers():
        sys.exit(status)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
