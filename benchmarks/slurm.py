"""What a trial pays on the way from laptop to cluster - a team server, then SLURM: writes docs/BENCHMARKS-slurm.md.

    python -m benchmarks.slurm [--repeats 2] [--data-root ../shared/datasets/mnist] [--slurm-conf FILE]

The same 3-trial sweep (``model.hidden=32,64,128``, 1 epoch, no model logged, a fresh SQLite store each time) is
run with Hydra's basic launcher and with ``hydra/launcher=submitit_slurm``, in turns (basic first, then SLURM
first, ...), side by side on this machine:

* basic: the trials one after another in the launching process, 1 torch thread (``device.threads=1``);
* basic, team server: the same, logging to the PostgreSQL-backed ``mlflow server`` of scripts/tracking_server.sh
  (started for the measurement on free ports; each sweep in an experiment of its own) instead of SQLite;
* SLURM, one at a time: an array job with ``array_parallelism=1`` and ``cpus_per_task=1``, so that each trial
  does the same work on the same core as with the basic launcher and the difference is SLURM's and submitit's
  alone (scheduling, a fresh Python process per trial with its imports, submitit's polling);
* SLURM, side by side: ``cpus_per_task=1`` without a limit, what a user gets on this node: the trials run at
  once, one per core.

One thread everywhere: on a shared machine two-thread torch jobs slow down erratically whenever another process
takes a core, which would swamp the difference measured here.

Per trial: the whole command's wall time divided by the trials, the part of it outside the trials' MLflow runs,
and for the one-at-a-time SLURM sweep each phase of a trial (``PHASES``: slurmctld's log, submitit's job logs and
the MLflow runs give the times). Without ``--slurm-conf`` a one-node cluster is started for the
measurement in a temporary folder (scripts/slurm_cluster.sh: needs slurm-wlm, munge and root) and stopped after.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common

REPO = common.REPO
OUT = common.DOCS / "BENCHMARKS-slurm.md"
CLUSTER = REPO / "scripts" / "slurm_cluster.sh"
SERVER = REPO / "scripts" / "tracking_server.sh"
TEAM = "basic, team server"
GRID = "model.hidden=32,64,128"
TRIAL = ("trainer.epochs=1", "mlflow.log_model=false")
N_TRIALS = 3
ONE = "SLURM, one at a time"


def _ports() -> int:
    """A free port whose successor is free too (slurmctld, slurmd)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue


def conf_value(conf: str, key: str) -> str:
    """The value of the first ``KEY=value`` word in a slurm.conf (e.g. the first partition's name)."""
    for line in Path(conf).read_text().splitlines():
        if line.startswith(f"{key}="):
            return line.split()[0].split("=", 1)[1]
    raise SystemExit(f"no {key}= line in {conf}")


def launchers(partition: str) -> dict[str, tuple[str, ...]]:
    slurm = ("hydra/launcher=submitit_slurm", f"hydra.launcher.partition={partition}", "hydra.launcher.mem_gb=1")
    slurm += ("hydra.launcher.cpus_per_task=1",)
    return {
        "basic": ("device.threads=1",),
        TEAM: ("device.threads=1",),
        ONE: (*slurm, "hydra.launcher.array_parallelism=1"),
        "SLURM, side by side": slurm,
    }


def sweep(
    overrides: tuple[str, ...],
    data: tuple[str, ...],
    env: dict[str, str],
    ctld_log: Path | None = None,
    server: str | None = None,
) -> dict[str, float]:
    """Run one sweep on a fresh store (or, given a tracking ``server``, a fresh experiment there): its wall time,
    the time in its trials' runs and, given slurmctld's log for a one-at-a-time SLURM sweep, where each trial's
    time went (``phases``), in seconds."""
    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory(prefix="bench-slurm-") as tmp:
        uri = server or f"sqlite:///{tmp}/mlflow.db"
        experiment = f"bench-{Path(tmp).name}"
        args = [sys.executable, str(REPO / "train.py"), "-m", GRID, *TRIAL, *data, f"mlflow.tracking_uri={uri}"]
        args.append(f"mlflow.experiment={experiment}")
        t0 = time.perf_counter()
        proc = subprocess.run([*args, *overrides], cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"the sweep failed ({' '.join(overrides) or 'basic'}):\n{proc.stderr[-3000:]}")
        if "sacct" in (proc.stdout + proc.stderr).lower():
            raise SystemExit(f"sacct noise in the sweep's output:\n{proc.stderr[-2000:]}")
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(experiment)
        trials = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
        if len(trials) != N_TRIALS or {t.info.status for t in trials} != {"FINISHED"}:
            raise SystemExit(f"expected {N_TRIALS} FINISHED trials, got {[t.info.status for t in trials]}")
        inside = sum((t.info.end_time - t.info.start_time) / 1000 for t in trials)
        span = (max(t.info.end_time for t in trials) - min(t.info.start_time for t in trials)) / 1000
        out = {"wall": wall, "inside": inside, "span": span}
        if ctld_log is not None:
            out |= phases(trials, Path(tmp), ctld_log)
        return out


PHASES = {
    "schedule": "SLURM starts the job: the previous task's end (or the submission) to the allocation",
    "spawn": "the allocation to submitit's first line in the job (slurmd, slurmstepd, Python starts)",
    "start-up": "to the trial's MLflow run start: unpickling the task (imports torch, MLflow, Hydra), config, data",
    "run": "the trial's MLflow run (training, evaluation, logging)",
    "exit": "the run's end to the job's end in slurmctld: submitit writes the result, the interpreter exits",
}


def _stamp(text: str, fmt: str) -> float:
    """Seconds since the epoch of a local-time log stamp with a 3-digit fraction after its last [.,]."""
    whole, frac = text[:-4], text[-3:]
    return time.mktime(time.strptime(whole, fmt)) + int(frac) / 1000


def phases(trials, folder: Path, ctld_log: Path) -> dict[str, float]:
    """Where each trial's time went, from slurmctld's log, submitit's job logs and the MLflow run (one at a time:
    each task starts after the previous one ended). Sums over the trials, in seconds."""
    jobs = sorted(trials, key=lambda t: int(t.data.tags["slurm.array_task_id"]))
    array = jobs[0].data.tags["slurm.array_job_id"]

    def ctld(pattern: str) -> float:
        deadline = time.monotonic() + 60  # the sweep returns on the last result, before that job has ended
        while (m := re.search(r"\[(\S+)\] " + pattern, ctld_log.read_text())) is None:
            if time.monotonic() > deadline:
                raise SystemExit(f"not in {ctld_log} after 60 s: {pattern}")
            time.sleep(0.5)
        return _stamp(m.group(1), "%Y-%m-%dT%H:%M:%S")

    sums = dict.fromkeys(PHASES, 0.0)
    previous_end = ctld(rf"_slurm_rpc_submit_batch_job: JobId={array}\b")
    for t in jobs:
        task = f"{array}_{t.data.tags['slurm.array_task_id']}"
        allocated = ctld(rf"sched: Allocate JobId={task}\(")
        ended = ctld(rf"_job_complete: JobId={task}\(\d+\) done")
        (job_log,) = folder.rglob(f".submitit/{task}/{task}_0_log.out")
        m = re.search(r"submitit INFO \((\S+ \S+)\) - Starting with JobEnvironment", job_log.read_text())
        began = _stamp(m.group(1), "%Y-%m-%d %H:%M:%S")
        run_start, run_end = t.info.start_time / 1000, t.info.end_time / 1000
        sums["schedule"] += allocated - previous_end
        sums["spawn"] += began - allocated
        sums["start-up"] += run_start - began
        sums["run"] += run_end - run_start
        sums["exit"] += ended - run_end
        previous_end = ended
    return sums


def _mean(runs: list[dict[str, float]], key: str) -> float:
    return statistics.fmean(r[key] for r in runs) / N_TRIALS  # per trial


def render(results: dict[str, list[dict[str, float]]], command: str, slurm_version: str, data_root: str) -> str:
    basic, team, one, wide = (results[k] for k in ("basic", TEAM, ONE, "SLURM, side by side"))
    rows = []
    for name, runs in results.items():
        sequential = runs is not wide  # side by side, the trials' runs overlap: their sum is not a share of the wall
        rows.append(
            [
                name,
                ", ".join(f"{r['wall']:.1f}" for r in runs),
                f"{_mean(runs, 'wall'):.2f}",
                f"{_mean(runs, 'inside'):.2f}" if sequential else "(overlapping)",
                f"{_mean(runs, 'wall') - _mean(runs, 'inside'):.2f}" if sequential else "",
                f"{_mean(runs, 'wall') - _mean(basic, 'wall'):+.2f}" if runs is not basic else "",
            ]
        )
    head = ["launcher", "whole sweep, each turn (s)", "per trial (s)", "in the trial's MLflow run (s)"]
    table = common.table([*head, "outside the runs (s)", "per trial vs basic (s)"], rows)
    cost = _mean(one, "wall") - _mean(basic, "wall")
    outside = (_mean(one, "wall") - _mean(one, "inside")) - (_mean(basic, "wall") - _mean(basic, "inside"))
    inside = _mean(one, "inside") - _mean(basic, "inside")
    wide_cost = _mean(wide, "wall") - _mean(basic, "wall")
    return "\n".join(
        [
            "# From laptop to cluster: what a trial pays for a team server and for SLURM",
            "",
            *common.header(command),
            f"SLURM: {slurm_version}, one node on 127.0.0.1 (scripts/slurm_cluster.sh), no accounting database. "
            f"Data: `{data_root}`. Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
            "",
            f"Sweep: `python train.py -m {GRID} {' '.join(TRIAL)}` ({N_TRIALS} trials, a fresh SQLite store each "
            "time), with each launcher in turns, 1 torch thread per trial. The machine is shared: compare the "
            "rows of this one run, not with other runs.",
            "",
            table,
            "",
            f"Where a trial's time goes, {ONE} (seconds per trial, mean of the turns; from slurmctld's log, "
            "submitit's job logs and the MLflow runs):",
            "",
            common.table(["phase", "s per trial", "what"], [[k, f"{_mean(one, k):.2f}", v] for k, v in PHASES.items()]),
            "",
            f"Logging to the team server (MLflow over HTTP, PostgreSQL behind it) instead of SQLite costs "
            f"{_mean(team, 'wall') - _mean(basic, 'wall'):+.2f} s per trial "
            f"({_mean(team, 'inside') - _mean(basic, 'inside'):+.2f} s inside the trials' runs). "
            f"Going through SLURM, one trial at a time on the same core, costs {cost:+.1f} s per trial: "
            f"{outside:+.1f} s outside the trials' MLflow runs and {inside:+.1f} s inside them. SLURM itself "
            f"(schedule and spawn) takes {_mean(one, 'schedule') + _mean(one, 'spawn'):.1f} s of it; the rest is "
            f"the fresh Python process each job is: {_mean(one, 'start-up'):.1f} s of start-up (unpickling the "
            "task imports torch, MLflow and Hydra; then the config and the data, which the basic launcher's "
            f"trials get from the launching process) and {_mean(one, 'exit'):.1f} s of exit (submitit writes the "
            "result and the interpreter tears down; one at a time, the next task waits for it). "
            f"Side by side (one core per trial, what this node gives a plain `cpus_per_task=1` sweep): "
            f"{wide_cost:+.1f} s per trial against the basic launcher. On a real cluster add the queue's wait. "
            "The cost weighs on these 1-epoch trials, little on trials of minutes.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=2, help="turns of every launcher (default 2)")
    p.add_argument("--data-root", default=common.default_data_root())
    p.add_argument("--slurm-conf", help="use this running cluster's slurm.conf instead of starting one")
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args(argv)
    command = common.command_line("benchmarks.slurm", argv)
    with tempfile.TemporaryDirectory(prefix="bench-slurm-cluster-") as base:
        conf = a.slurm_conf
        folder = Path(base) / "cluster"
        if conf is None:
            Path(base).chmod(0o755)
            start = ["bash", str(CLUSTER), "start", "--dir", str(folder), "--port", str(_ports())]
            subprocess.run(start, check=True, timeout=180)
            conf = str(folder / "slurm.conf")
        try:
            env = {**os.environ, "SLURM_CONF": conf, "PYTHONUNBUFFERED": "1"}
            # This interpreter's environment for the server script and the jobs, as if it were activated.
            env |= {"PYTHON": env.get("PYTHON", sys.executable), "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"}
            version = subprocess.run(["sinfo", "--version"], env=env, capture_output=True, text=True).stdout.strip()
            data = (f"data.root={a.data_root}", f"data.cache_dir={Path(base) / 'cache'}")
            ways = launchers(conf_value(conf, "PartitionName"))
            ctld_log = Path(conf_value(conf, "SlurmctldLogFile"))
            server_dir = Path(base) / "server"
            start = ["bash", str(SERVER), "start", "--dir", str(server_dir), "--port", str(_ports())]
            subprocess.run([*start, "--pg-port", str(_ports())], check=True, timeout=300, env=env)
            server = f"http://127.0.0.1:{start[-1]}"
            # Its login, for the sweeps (and their SLURM jobs) and for this process's MlflowClient.
            lines = (server_dir / "credentials").read_text().splitlines()
            login = dict(line.split("=", 1) for line in lines if line.startswith("MLFLOW_TRACKING_"))
            env.update(login)
            os.environ.update(login)
            sweep((), data, env)  # untimed: fills the data cache every later sweep reads
            results: dict[str, list[dict[str, float]]] = {name: [] for name in ways}
            for turn in range(a.repeats):
                order = list(ways) if turn % 2 == 0 else list(reversed(ways))
                for name in order:
                    log = ctld_log if name == ONE else None
                    results[name].append(sweep(ways[name], data, env, log, server if name == TEAM else None))
                    print(f"turn {turn + 1}, {name}: {results[name][-1]['wall']:.1f} s", flush=True)
        finally:
            subprocess.run(["bash", str(SERVER), "stop", "--dir", str(Path(base) / "server")], timeout=120, env=env)
            if a.slurm_conf is None:
                subprocess.run(["bash", str(CLUSTER), "stop", "--dir", str(folder)], timeout=120)
    common.write_report(a.out, render(results, command, version, a.data_root))


if __name__ == "__main__":
    main()
