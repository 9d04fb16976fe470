"""A sweep seen from inside one trial, wherever it runs (this process, a joblib worker, a SLURM job).

The launching side (``sweep.py``) creates the parent run before any trial starts and tags it with the
absolute sweep folder. A trial, through ``run.py``:

* finds that parent by the folder (``join``) and nests its own run under it;
* skips itself when the same config already FINISHED in the experiment (``previous_result``: resume), and
  waits when another launch is training it now (``live_claim``, ``wait_for``): each config is trained once;
* takes its share of the machine when trials run side by side (``trial_threads``, ``trial_device``);
* records its outcome on the parent when it ends (``record``, Hydra's ``on_job_end``), so the launcher's
  leaderboard needs no access to the trial's process.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mnist_sweep import tracking

log = logging.getLogger("mnist_sweep.trial")

ROLE = "mnist_sweep.role"  # "sweep" on a parent run
SWEEP_DIR = "hydra.sweep.dir"  # absolute path: the parent and every trial carry it
TRIAL_PREFIX = "trial."  # parent tag per trial: JSON outcome
OBJECTIVE_METRIC = "best_val/acc"  # the objective a trial returns (its best validation accuracy), one name everywhere
PARENT_ENV = "MNIST_SWEEP_PARENT_RUN"  # set by the launcher: the id of its sweep's parent run
RESUME_STATE = "resume.state"  # tag: the file a run saves its training state to at each epoch's end


def finite(value: Any) -> float | None:
    """A trial's objective, or None for one that has none (NaN: data.val_size=0 left no validation split)."""
    return float(value) if value is not None and math.isfinite(value) else None


def sweep_dir(hydra_cfg) -> str:
    """The absolute sweep folder, the same in every process of the sweep (relative to the launch folder)."""
    path = Path(str(hydra_cfg.sweep.dir)).expanduser()
    if not path.is_absolute():
        base = OmegaConf.select(hydra_cfg, "runtime.cwd") or os.getcwd()
        path = Path(base) / path
    return str(path.resolve())


# ------------------------------------------------------------------------------------------------------------
# Dividing the machine between parallel trials
# ------------------------------------------------------------------------------------------------------------


def parallel_jobs(launcher: DictConfig | None, n_trials: int | None, cores: int) -> int:
    """How many trials of this sweep run at once on one machine, from the launcher's settings."""
    if launcher is None:
        return 1
    target = str(launcher.get("_target_", ""))
    if target.endswith("JoblibLauncher"):
        n = int(launcher.get("n_jobs") or 1)
        n = cores + 1 + n if n < 0 else n  # joblib: -1 = all cores, -2 = all but one...
    elif target.endswith("LocalLauncher"):  # submitit_local starts every trial at once
        n = n_trials or cores
    else:
        return 1
    if n_trials:
        n = min(n, n_trials)
    return max(1, n)


def trial_threads(launcher: DictConfig | None, n_trials: int | None, cores: int) -> int:
    """torch threads for one trial so that parallel trials never oversubscribe the CPU (0 = torch's default)."""
    if launcher is not None and str(launcher.get("_target_", "")).endswith("SlurmLauncher"):
        return int(launcher.get("cpus_per_task") or 0)  # the cluster gave each trial its own cores
    n = parallel_jobs(launcher, n_trials, cores)
    return 0 if n <= 1 else max(1, cores // n)


def trial_device(device: str, job_num: int, n_parallel: int, n_gpus: int) -> str:
    """Round-robin GPUs between parallel trials: ``cuda`` becomes ``cuda:<job % GPUs>``."""
    if device == "cuda" and n_parallel > 1 and n_gpus > 1:
        return f"cuda:{job_num % n_gpus}"
    return device


# ------------------------------------------------------------------------------------------------------------
# Joining the sweep, resuming, reporting back
# ------------------------------------------------------------------------------------------------------------


@dataclass
class Trial:
    parent_id: str | None
    num: int
    n_trials: int | None
    run_id: str | None = None
    reused_from: str | None = None
    objective: float | None = None
    note: str = ""  # e.g. "pruned at epoch 2" (an Optuna search stopped it early)


_TRIAL: Trial | None = None


def find_parent(experiment_id: str, folder: str):
    """The RUNNING sweep run of this launch (``PARENT_ENV``, which its processes inherit), else the newest
    RUNNING one whose ``hydra.sweep.dir`` is ``folder``, or None."""
    import mlflow
    from mlflow.entities import ViewType

    client = mlflow.MlflowClient()
    own = tracking.find_run(os.environ.get(PARENT_ENV, ""))
    if own is not None and own.info.status == "RUNNING" and own.data.tags.get(SWEEP_DIR) == folder:
        return own
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{ROLE}` = 'sweep' and attributes.status = 'RUNNING'",
        run_view_type=ViewType.ACTIVE_ONLY,
        order_by=["attributes.start_time DESC"],
        max_results=1000,
    )
    return next((r for r in runs if r.data.tags.get(SWEEP_DIR) == folder), None)


def join(experiment_id: str, folder: str, job_num: int) -> Trial:
    """Called by run.py in a multirun trial: find the parent run, remember who we are for on_job_end."""
    global _TRIAL
    parent = find_parent(experiment_id, folder)
    if parent is None:
        log.warning("no RUNNING sweep run for %s: this trial is logged as a top-level run", folder)
    n = parent.data.params.get("sweep.n_trials") if parent else None
    _TRIAL = Trial(parent.info.run_id if parent else None, job_num, int(n) if n and n.isdigit() else None)
    return _TRIAL


def previous_result(experiment_id: str, config_hash: str):
    """The newest FINISHED run of this config in the experiment (with its objective), or None."""
    import mlflow

    runs = mlflow.MlflowClient().search_runs(
        [experiment_id],
        filter_string=f"tags.config_hash = '{config_hash}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=20,
    )
    # A trial an Optuna search pruned stopped early: its objective is not the config's, so it is not reused.
    return next((r for r in runs if OBJECTIVE_METRIC in r.data.metrics and r.data.tags.get("pruned") != "true"), None)


def interrupted(experiment_id: str, config_hash: str):
    """The newest run of this config that was interrupted (KILLED: Ctrl-C, SIGTERM, a preempted or timed-out
    job, or closed after its process died) and left a training state to go on from, or None."""
    import mlflow

    runs = mlflow.MlflowClient().search_runs(
        [experiment_id],
        filter_string=f"tags.config_hash = '{config_hash}' and attributes.status = 'KILLED'",
        order_by=["attributes.start_time DESC"],
        max_results=20,
    )
    return next((r for r in runs if Path(r.data.tags.get(RESUME_STATE, "")).is_file()), None)


CLAIM_POLL_S = 2.0  # how often a trial waiting for another launch's run of its config looks again


def live_claim(experiment_id: str, config_hash: str, me: str | None = None):
    """The run that has claimed this config: the earliest RUNNING run of it whose process is alive, if that is
    not ``me``. Two launches that create runs of one config at the same moment agree on which came first."""
    import mlflow

    runs = mlflow.MlflowClient().search_runs(
        [experiment_id], filter_string=f"tags.config_hash = '{config_hash}' and attributes.status = 'RUNNING'"
    )
    for run in sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id)):
        if run.info.run_id == me:
            return None
        if tracking.run_alive(run):
            return run
    return None


def wait_for(claim) -> None:
    """Wait until another launch's run of this config ends (or its process is gone)."""
    import mlflow

    tags = claim.data.tags
    log.info(
        "the same config is being trained by another launch (mlflow run %s, pid %s on %s): waiting for it",
        *(claim.info.run_id, tags.get("owner.pid", "?"), tags.get("owner.host", "?")),
    )
    client = mlflow.MlflowClient()
    while claim.info.status == "RUNNING" and tracking.run_alive(claim):
        time.sleep(CLAIM_POLL_S)
        claim = client.get_run(claim.info.run_id)


def record(config: DictConfig, job_return) -> None:
    """on_job_end: write this trial's outcome on the parent run (one tag, from whatever process ran it)."""
    global _TRIAL
    from hydra.core.utils import JobStatus

    trial, _TRIAL = _TRIAL, None
    try:
        import mlflow

        num = int(config.hydra.job.num)
        if trial is None or trial.num != num:  # failed before run.py found its parent: look it up here
            experiment_id = tracking.prepare(config.mlflow.tracking_uri, config.mlflow.experiment)
            parent = find_parent(experiment_id, sweep_dir(config.hydra))
            trial = Trial(parent.info.run_id if parent else None, num, None)
        if trial.parent_id is None:
            return
        ok = job_return.status == JobStatus.COMPLETED
        error = None if ok else job_return._return_value
        row = {
            "trial": num,
            "overrides": list(job_return.overrides or []),
            "status": "FINISHED" if ok else "FAILED",
            "objective": finite(job_return._return_value) if ok else None,
            "run_id": trial.reused_from or trial.run_id,
            "reused": trial.reused_from is not None,
            "note": trial.note if ok else f"{type(error).__name__}: {error}"[:300],
        }
        tracking.Run(trial.parent_id).set_tags({f"{TRIAL_PREFIX}{num:04d}": json.dumps(row)})
        mlflow.MlflowClient()  # keep the client warm for the next trial in this worker
    except Exception as e:  # the trial's own run already tells its story; never turn success into failure here
        log.error("could not record trial on the sweep run: %s", e)
