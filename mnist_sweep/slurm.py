"""SLURM as the launching process sees it (``hydra/launcher=submitit_slurm``): checked before any job is submitted,
and followed without ``sacct`` where the cluster keeps no accounting.

``sweep.start`` calls ``prepare`` with the launcher's config, before the parent run exists:

* no ``sbatch``/``sinfo`` on PATH, a controller that does not answer, a partition the cluster does not have: one
  line naming the problem and the fix (a ``UserError``), and nothing is submitted;
* a cluster without an accounting database (no slurmdbd, as small clusters run) cannot answer ``sacct``, which
  submitit calls on every status poll - each call printed "Slurm accounting storage is disabled" and a "Bypassing
  sacct error" warning, and a job that died without a result was waited for forever. There submitit's jobs are
  followed with ``squeue`` instead: it lists the jobs the controller still knows, and one it no longer lists has
  ended (submitit then reads its result, or reports the job's missing output).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from typing import Any

from mnist_sweep import UserError

log = logging.getLogger("mnist_sweep.slurm")

TIMEOUT_S = 60  # a controller that does not answer in this time is reported, not waited for
ENDED = "ENDED"  # the state of a job squeue no longer lists


def is_slurm(launcher: Any) -> bool:
    """Whether ``hydra.launcher`` submits to SLURM (hydra-submitit-launcher's SlurmLauncher)."""
    return launcher is not None and str(launcher.get("_target_", "")).endswith("SlurmLauncher")


def prepare(launcher: Any) -> None:
    """Before any job: check SLURM and the partition; follow the jobs with squeue where sacct cannot answer."""
    if not is_slurm(launcher):
        return
    check(launcher.get("partition"))
    if not has_accounting():
        follow_with_squeue()


def _run(*args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(args), capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise UserError(
            f"SLURM's controller did not answer `{' '.join(args)}` within {TIMEOUT_S} s; check that it is up "
            "(`scontrol ping`) and that SLURM_CONF names its slurm.conf"
        ) from None


def check(partition: str | None) -> None:
    """Raise a UserError when SLURM is not usable from here or ``partition`` is not one of its partitions."""
    for tool in ("sbatch", "sinfo"):
        if shutil.which(tool) is None:
            raise UserError(
                f"hydra/launcher=submitit_slurm needs SLURM, but `{tool}` is not on PATH; run the sweep on a SLURM "
                "login node (or add SLURM's bin folder to PATH), or use hydra/launcher=submitit_local on this machine"
            )
    listed = _run("sinfo", "--noheader", "--all", "--format=%P")
    if listed.returncode != 0:
        first = (listed.stderr.strip().splitlines() or ["no output"])[0]
        raise UserError(
            f"SLURM does not answer (sinfo: {first}); check that its controller is up (`scontrol ping`) and that "
            "SLURM_CONF names its slurm.conf"
        )
    names = [p.strip() for p in listed.stdout.split()]
    default = [p.rstrip("*") for p in names if p.endswith("*")]
    choices = [p.rstrip("*") for p in names]
    wanted = [p.strip() for p in str(partition).split(",") if p.strip()] if partition else []
    hint = f"choose one of: {', '.join(choices)} (e.g. hydra.launcher.partition={choices[0]})" if choices else ""
    if not choices:
        raise UserError("SLURM lists no partition (sinfo shows none); ask the cluster's admins which to use")
    if not wanted and not default:
        raise UserError(f"hydra.launcher.partition is not set and the cluster has no default partition; {hint}")
    for name in wanted:
        if name not in choices:
            raise UserError(f"hydra.launcher.partition={name}: SLURM has no such partition; {hint}")


def has_accounting() -> bool:
    """Whether ``sacct`` answers here (it fails where the cluster runs without an accounting database)."""
    if shutil.which("sacct") is None:
        return False
    return _run("sacct", "--noheader", "--jobs=1", "--format=JobID").returncode == 0


def follow_with_squeue() -> None:
    """Make submitit follow SLURM jobs with ``squeue`` instead of ``sacct`` (in this process, from now on)."""
    from submitit.slurm import slurm as submitit_slurm

    current = submitit_slurm.SlurmJob.watcher
    if getattr(current, "follows_with_squeue", False):
        return
    submitit_slurm.SlurmJob.watcher = _queue_watcher_class()(delay_s=current._delay_s)
    log.debug("the cluster has no accounting (sacct fails): following the jobs with squeue")


def _queue_watcher_class():
    from submitit.slurm.slurm import SlurmInfoWatcher

    class QueueWatcher(SlurmInfoWatcher):
        """submitit's SLURM status poller, reading ``squeue`` (jobs the controller still knows) for ``sacct``."""

        follows_with_squeue = True

        def _make_command(self) -> list[str] | None:
            if not self._registered - self._finished:
                return None
            # All of this user's jobs at once: asking for ids the controller already forgot would be an error.
            return ["squeue", "--noheader", "--me", "--array", "--states=all", "--format=%i|%T|%N"]

        def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
            text = string.decode() if isinstance(string, bytes) else string
            stats = super().read_info("JobID|State|NodeList\n" + text)  # sacct's layout, which submitit reads
            for job_id in self._registered - self._finished:
                if job_id not in stats:  # no longer listed: it has ended, and its result (or its absence) tells how
                    stats[job_id] = {"JobID": job_id, "State": ENDED, "NodeList": ""}
            return stats

    return QueueWatcher
