"""A sweep is one thing in MLflow: a parent run, its trials nested under it, and a leaderboard at the end.

``python train.py -m KEY=a,b ...`` goes through Hydra's sweeper and launcher; this module hooks into it with
a Hydra callback (``hydra.callbacks.sweep`` in ``conf/config.yaml``); what happens inside each trial is
``trial.py``'s part:

* **before any trial** (``on_multirun_start``, in the launching process): the Optuna sweeper's study database,
  if any, is opened first (one that cannot be is a one-line error, with nothing written to MLflow); the tracking
  store and the experiment are prepared once - so parallel trials never race to create SQLite tables - runs
  that a killed launch left RUNNING are closed as KILLED, and the parent run is created with the sweep's
  definition (overrides, sweeper, launcher, number of trials) and the absolute ``hydra.sweep.dir`` as a tag;
* **each trial** (``run.py`` and ``trial.py``, wherever it runs: this process, a joblib worker, a submitit
  job on another machine) finds its parent by that tag, skips itself when the same config already FINISHED in the
  experiment (``sweep.rerun=true`` forces it), divides the CPU cores between parallel trials, and nests its
  run under the parent; ``on_job_end`` then records the trial's outcome on the parent (tag ``trial.<N>``);
* **at the end** (``finish``, called by ``on_multirun_end`` and, because Hydra's basic sweeper raises the
  first failed trial's exception instead of calling it, by ``cli.py`` too): the leaderboard (swept keys,
  objective and status of every trial, mean ± std over seeds when ``seed`` is swept) is written as CSV,
  Markdown and a plot, logged on the parent, printed with the command that reruns the best trial, and the
  parent is closed FINISHED, FAILED (a trial failed) or KILLED (interrupted).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import shlex
import statistics
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from hydra_plugins.mnist_sweep_optuna import _impl as optuna_sweeper
from mnist_sweep import config as schema
from mnist_sweep import model, plots, search, slurm, tracking, trial
from mnist_sweep.redact import mask_hydra_files, mask_secrets, warn_credentials
from mnist_sweep.trial import OBJECTIVE_METRIC, PARENT_ENV, ROLE, SWEEP_DIR, TRIAL_PREFIX, sweep_dir

log = logging.getLogger("mnist_sweep.sweep")


def _parse(overrides: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(overrides)


def definition(config: DictConfig) -> dict[str, Any]:
    """The sweep as launched: its overrides, swept keys, sweeper, launcher and number of trials."""
    hc = config.hydra
    overrides = [str(o) for o in hc.overrides.task]
    params = OmegaConf.select(hc, "sweeper.params") or {}
    parsed = _parse([*overrides, *(f"{k}={v}" for k, v in params.items())])
    swept, sizes = [], []
    for o in parsed:
        if o.is_sweep_override():
            key = o.get_key_element()
            if key not in swept:
                swept.append(key)
            if o.is_discrete_sweep():
                sizes.append(len(list(o.sweep_string_iterator())))
    n_trials = OmegaConf.select(hc, "sweeper.n_trials")
    if n_trials is not None and OmegaConf.select(hc, "sweeper.test_best"):
        n_trials += 1  # the Optuna sweeper runs the chosen config once more, with the test set
    if n_trials is None:
        n_trials = math.prod(sizes) if len(sizes) == len(swept) else None
    return {
        "overrides": overrides,
        "swept_keys": swept,
        "sweeper": str(OmegaConf.select(hc, "sweeper._target_") or "?").rsplit(".", 1)[-1],
        "launcher": str(OmegaConf.select(hc, "launcher._target_") or "?").rsplit(".", 1)[-1],
        "n_trials": n_trials,
        "objectives": search.objectives(config),  # [(metric, direction)] of a multi-objective search
    }


# ------------------------------------------------------------------------------------------------------------
# What the MLflow UI lists: short names, and a link to the trials side by side
# ------------------------------------------------------------------------------------------------------------

TRIAL_NAME_MAX = 40  # characters of a trial's run name: what the UI's Run Name column shows uncut
SWEEP_NAME_MAX = 60
# Config groups whose option is already a logged value: its column, and no `choice.<group>` param beside it.
GROUP_PARAMS = {"optimizer": "optimizer.name", "data": "data.name", "device": "device.type"}


def labels(keys: list[str]) -> dict[str, str]:
    """The shortest dotted suffix that tells each key apart: ``model.hidden`` -> ``hidden``."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            label = ".".join(parts[-n:])
            if not any(other != key and (other == label or other.endswith("." + label)) for other in keys):
                break
        out[key] = label
    return out


def shown(value: str) -> str:
    """A value as a name shows it: numbers rounded to 3 significant digits (``0.0031622`` -> ``0.00316``)."""
    text = str(value).strip().strip("'\"")
    try:
        number = float(text)
    except ValueError:
        return text
    if text.lstrip("+-").isdigit() or not math.isfinite(number):
        return text
    return f"{number:.0f}" if abs(number) >= 100 else f"{number:.3g}"


def trial_name(keys: list[str], overrides: list[str], num: int | None, numbered: bool = False) -> str:
    """A run name from the values of ``keys`` in ``overrides`` (``hidden=64 optimizer=sgd``), at most
    TRIAL_NAME_MAX characters; a trial's number ``num`` goes in front (``#3 ...``) when ``numbered`` (values
    that may repeat: a search) or when the name had to be cut."""
    values = _values(overrides)
    short = labels(keys)
    name = " ".join(f"{short[k]}={shown(values[k])}" for k in keys if k in values) or "defaults"
    if num is not None and (numbered or len(name) > TRIAL_NAME_MAX):
        name = f"#{num} {name}"
    return name if len(name) <= TRIAL_NAME_MAX else name[: TRIAL_NAME_MAX - 1] + "…"


def _name(spec: dict[str, Any], params: dict[str, Any]) -> str:
    """The sweep's run name, after what it sweeps: ``sweep hidden=16,32 optimizer=sgd,adam``, ``search hidden
    depth lr`` (values left out when too long), with the ``experiment=`` preset it starts from."""
    parsed = _parse([*spec["overrides"], *(f"{k}={v}" for k, v in params.items())])
    swept = {}
    preset = ""
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            discrete = o.is_discrete_sweep()
            swept[key] = ",".join(shown(v) for v in o.sweep_string_iterator()) if discrete else None
        elif key == "experiment":
            preset = f" {o.value()}"
    kind = "search" if "optuna" in spec["sweeper"].lower() else "sweep"
    short = labels(list(swept))
    full = " ".join(short[k] + (f"={v}" if v else "") for k, v in swept.items())
    name = f"{kind}{preset} {full}".rstrip() if swept or preset else f"{kind} (defaults)"
    if len(name) > SWEEP_NAME_MAX:
        name = f"{kind}{preset} " + " ".join(short.values())
    return name if len(name) <= SWEEP_NAME_MAX else name[: SWEEP_NAME_MAX - 1] + "…"


def columns(swept_keys: list[str], groups: set[str]) -> list[str]:
    """The UI's columns for a sweep's trials: each swept key's param (a config group's by its option's name),
    then the objective."""
    params = [GROUP_PARAMS.get(k, f"choice.{k}") if k in groups else k for k in swept_keys]
    return [*(f"params.`{p}`" for p in params), f"metrics.`{OBJECTIVE_METRIC}`"]


def _comparison(config: DictConfig, experiment_id: str, parent_id: str, spec: dict[str, Any], name: str) -> str:
    """The link that opens the MLflow UI on this sweep's trials side by side (saved as a view of the experiment)."""
    m = config.mlflow
    base = tracking.ui_base(m.ui_url, m.tracking_uri)
    groups = set(OmegaConf.select(config, "hydra.runtime.choices") or {})
    wanted = columns(spec["swept_keys"], groups)
    trials = f"tags.`mlflow.parentRunId` = '{parent_id}'"
    try:
        return tracking.comparison_link(base, experiment_id, parent_id, name, trials, wanted)
    except Exception as e:  # a view the store refuses must not stop the sweep: the runs page still lists them
        log.warning("could not save the MLflow view of this sweep: %s", str(e).splitlines()[0][:200])
        return tracking.run_link(base, experiment_id, parent_id)


# ------------------------------------------------------------------------------------------------------------
# Dividing the machine between parallel trials
# ------------------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------------------
# The launching process: start and finish the sweep
# ------------------------------------------------------------------------------------------------------------


@dataclass
class Sweep:
    """The sweep this process launched (there is at most one)."""

    parent_id: str
    experiment_id: str
    dir: str
    spec: dict[str, Any]
    command: str
    model_format: str | None = None  # log the best trial's model in this format when the sweep ends (None: don't)
    registered_model: str | None = None  # and register it as a version of this model (None: don't)
    summary: Summary | None = None
    link: str = ""  # the MLflow UI on its trials, side by side (and how to start the UI)


@dataclass
class Summary:
    rows: list[dict[str, Any]]
    status: str
    failed: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None


_ACTIVE: Sweep | None = None


def active() -> Sweep | None:
    return _ACTIVE


def start(config: DictConfig) -> Sweep:
    """Prepare the store once, close what killed launches left RUNNING, create the parent run."""
    global _ACTIVE
    tracking.quiet()
    job_cfg = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
    schema.check(job_cfg)  # a bad non-swept value fails here, in one line, before the parent exists
    slurm.prepare(OmegaConf.select(config, "hydra.launcher"))  # SLURM missing, unknown partition: before any job
    storage = OmegaConf.select(config, "hydra.sweeper.storage")
    warn_credentials({"mlflow.tracking_uri": config.mlflow.tracking_uri, "hydra.sweeper.storage": storage})
    check_study_storage(config)  # an unreachable study database: one line, and nothing written to the MLflow store
    experiment_id = tracking.prepare(config.mlflow.tracking_uri, config.mlflow.experiment)
    tracking.close_orphans(experiment_id)
    spec = definition(config)
    folder = sweep_dir(config.hydra)
    tags = {
        ROLE: "sweep",
        SWEEP_DIR: folder,
        "sweep.swept_keys": json.dumps(spec["swept_keys"]),
        **tracking.git_state(),
        **tracking.version_tags(),
    }
    command = "python " + " ".join(shlex.quote(mask_secrets(a)) for a in [_script(), *sys.argv[1:]])
    import mlflow

    client = mlflow.MlflowClient()
    name = _name(spec, OmegaConf.select(config, "hydra.sweeper.params") or {})
    run = client.create_run(
        experiment_id, run_name=name, tags={**tracking.context_tags(), **tags, **tracking.owner_tags()}
    )
    os.environ[PARENT_ENV] = run.info.run_id  # the trials' processes inherit it: they nest under this launch's run
    parent = tracking.Run(run.info.run_id)
    parent.log_params(
        {
            "sweep.overrides": " ".join(mask_secrets(o) for o in spec["overrides"]),
            "sweep.swept_keys": ", ".join(spec["swept_keys"]),
            "sweep.sweeper": spec["sweeper"],
            "sweep.launcher": spec["launcher"],
            "sweep.n_trials": spec["n_trials"] if spec["n_trials"] is not None else "unknown",
            "sweep.command": command[:6000],
        }
    )
    m = config.mlflow
    best_model = m.model_format if m.log_model else None  # sweep_models=all: logged already, registered here
    _ACTIVE = Sweep(run.info.run_id, experiment_id, folder, spec, command, best_model, m.registered_model)
    hint = tracking.serve_hint(config.mlflow.ui_url, config.mlflow.tracking_uri)
    _ACTIVE.link = _comparison(config, experiment_id, run.info.run_id, spec, name) + hint
    log.info(
        "sweep: %s trials (%s, %s), mlflow parent run %s",
        spec["n_trials"] if spec["n_trials"] is not None else "?",
        spec["sweeper"],
        spec["launcher"],
        run.info.run_id,
    )
    return _ACTIVE


OPTUNA_SWEEPER = "hydra_plugins.mnist_sweep_optuna."


def check_study_storage(config: DictConfig) -> None:
    """Open the Optuna sweeper's study database (``hydra.sweeper.storage``) before the sweep writes anything to
    MLflow: one that cannot be opened fails here, as a one-line error, and leaves no parent run behind. The
    sweeper then uses the storage opened here."""
    storage = OmegaConf.select(config, "hydra.sweeper.storage")
    target = str(OmegaConf.select(config, "hydra.sweeper._target_") or "")
    if isinstance(storage, str) and target.startswith(OPTUNA_SWEEPER):
        optuna_sweeper.check_study_storage(storage)


def _script() -> str:
    return sys.argv[0] if sys.argv and sys.argv[0] else "train.py"


def finish(error: BaseException | None = None) -> Summary | None:
    """Write the leaderboard and close the parent; safe to call twice (the second call returns the first's)."""
    global _ACTIVE
    sweep = _ACTIVE
    if sweep is None:
        return None
    if sweep.summary is not None:
        return sweep.summary
    import mlflow

    client = mlflow.MlflowClient()
    interrupted = isinstance(error, KeyboardInterrupt)
    rows = collect(client, sweep)
    if sweep.spec.get("objectives"):  # a multi-objective search: each trial's objectives and the Pareto front
        search.mark_pareto(rows, sweep.spec["objectives"], lambda run_id: client.get_run(run_id).data.metrics)
    if not rows and error is not None and not interrupted:
        # Nothing ran (e.g. a sweep value that does not compose): leave no trace, as for a single run's mistake.
        client.delete_run(sweep.parent_id)
        sweep.summary = Summary([], "DELETED")
        return sweep.summary
    if interrupted:
        for child in _children(client, sweep):
            if child.info.status == "RUNNING":
                client.set_terminated(child.info.run_id, "KILLED")
        for r in rows:
            if r["status"] == "RUNNING":
                r["status"] = "KILLED"
    failed = [r for r in rows if r["status"] == "FAILED"]
    finished = [r for r in rows if r["status"] == "FINISHED" and r["objective"] is not None]
    best = max(finished, key=lambda r: r["objective"]) if finished else None
    status = "KILLED" if interrupted else "FAILED" if failed or error is not None else "FINISHED"
    summary = Summary(rows, status, failed, best)
    sweep.summary = summary
    try:
        keys = sweep.spec["swept_keys"]
        files = write_leaderboard(Path(sweep.dir), rows, keys)
        parent = tracking.Run(sweep.parent_id)
        for f in files:
            parent.log_artifact(f)
        metrics = {
            "trials/finished": len(finished),
            "trials/failed": len(failed),
            "trials/reused": sum(1 for r in rows if r.get("reused")),
        }
        if best is not None:
            metrics["best_val/acc"] = best["objective"]
        parent.log_metrics(metrics)
        if failed:
            parent.set_tags({"error": f"{len(failed)} of {len(rows)} trials failed"})
        elif error is not None and not interrupted:
            parent.set_tags({"error": f"{type(error).__name__}: {error}"[:5000]})
        print(render(rows, keys, best, sweep), flush=True)
        if best is not None and sweep.model_format and not interrupted:
            keep = model_run(client, rows, best)
            log_best_model(client, keep, sweep.model_format, sweep.registered_model, sweep.parent_id)
    finally:
        client.set_terminated(sweep.parent_id, status)
    return summary


def log_best_model(
    client, run_id: str, model_format: str, registered_model: str | None = None, sweep_id: str | None = None
) -> tracking.Registration | None:
    """Log the best trial's model into its run, rebuilt from its checkpoint artifact (trials of a sweep skip
    ``log_model``: a second or two of each short trial, for models nobody loads), once per run; then register it
    as a new version of ``registered_model``, which becomes ``@champion`` when it beats the champion."""
    import tempfile

    import torch

    if client.get_run(run_id).data.tags.get(tracking.MODEL_LOGGED) != "true":  # else: resumed, or sweep_models=all
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(run_id, "checkpoint/model.pt", tmp)
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        classifier, example = model.classifier_from(ckpt), ckpt.get("example")
        if example is None:  # a checkpoint from before examples were kept in it: a blank page does as an example
            example = torch.zeros(1, 1, 28, 28)
        uri = tracking.Run(run_id).log_model(classifier, example.numpy(), model_format)
        log.info("best trial's model logged: %s", uri)
    if not registered_model:
        return None
    registration = tracking.register(run_id, registered_model, {"sweep.parent_run_id": sweep_id or ""})
    champion = tracking.champion_uri(registered_model)
    print(f"{registration.summary()}\nuse the champion: python -m mnist_sweep.predict IMAGE...  ({champion})")
    return registration


TESTED = "test/acc"  # the metric of a run that took the test set


def _bookkeeping(override: str) -> bool:
    """An override a search adds to a trial (study, trial number, whether it takes the test set): not a setting."""
    return override.lstrip("+").startswith(("optuna.", "trainer.test="))


def _recipe(overrides: list[str]) -> list[str]:
    """A trial's overrides without a search's bookkeeping, sorted."""
    return sorted(o for o in overrides if not _bookkeeping(o))


def model_run(client, rows: list[dict[str, Any]], best: dict[str, Any]) -> str:
    """The run whose model the sweep keeps: the best trial's, unless another finished run of the same recipe took
    the test set while it did not - an Optuna search's re-run of its choice with ``trainer.test=true`` - so that
    the registered model and its test score sit in the same run."""
    recipe = _recipe(best.get("overrides", []))
    twins = [
        r
        for r in rows
        if r is not best and r["status"] == "FINISHED" and r.get("run_id") and _recipe(r.get("overrides", [])) == recipe
    ]
    if not twins or TESTED in client.get_run(best["run_id"]).data.metrics:
        return best["run_id"]
    tested = [r for r in twins if TESTED in client.get_run(r["run_id"]).data.metrics]
    return tested[-1]["run_id"] if tested else best["run_id"]


def release_workers() -> bool:
    """Stop joblib's reusable worker processes; True when there were any (then exit normally, not fast:
    joblib cleans its shared-memory folders at interpreter exit, and loky warns about leaks otherwise)."""
    if "joblib.externals.loky" not in sys.modules:
        return False
    from joblib.externals.loky import get_reusable_executor

    get_reusable_executor().shutdown(wait=True)
    return True


def _children(client, sweep: Sweep):
    from mlflow.entities import ViewType

    return client.search_runs(
        [sweep.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{sweep.parent_id}'",
        run_view_type=ViewType.ACTIVE_ONLY,
        max_results=50000,
    )


def collect(client, sweep: Sweep) -> list[dict[str, Any]]:
    """Every trial of the sweep: its outcome recorded on the parent, or else what its own run says."""
    parent = client.get_run(sweep.parent_id)
    rows: dict[int, dict[str, Any]] = {}
    for key, value in parent.data.tags.items():
        if key.startswith(TRIAL_PREFIX):
            row = json.loads(value)
            rows[int(row["trial"])] = row
    for child in _children(client, sweep):
        num = int(child.data.tags.get("hydra.job.num", -1))
        if num in rows:
            continue
        rows[num] = {  # a trial that never reported back (killed): its run is the record
            "trial": num,
            "overrides": json.loads(child.data.tags.get("trial.overrides", "[]")),
            "status": child.info.status,
            "objective": trial.finite(child.data.metrics.get(OBJECTIVE_METRIC)),
            "run_id": child.info.run_id,
            "note": child.data.tags.get("error", ""),
        }
    keys = sweep.spec["swept_keys"]
    out = []
    for num in sorted(rows):
        row = rows[num]
        values = _values(row.get("overrides", []))
        out.append({**row, "values": {k: values.get(k, "") for k in keys}})
    return out


def _values(overrides: list[str]) -> dict[str, str]:
    out = {}
    for o in overrides:
        if "=" in o:
            k, v = o.split("=", 1)
            out[k.lstrip("+~")] = v
    return out


# ------------------------------------------------------------------------------------------------------------
# The leaderboard
# ------------------------------------------------------------------------------------------------------------


def _sorted(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (r["objective"] is None or r["status"] != "FINISHED", -(r["objective"] or 0)))


def table(rows: list[dict[str, Any]], keys: list[str]) -> tuple[list[str], list[list[str]]]:
    # A multi-objective search's other objectives, and whether each trial is on the Pareto front (search.py).
    scores = [n for n in next((r["scores"] for r in rows if "scores" in r), {}) if n != OBJECTIVE_METRIC]
    header = ["trial", *keys, OBJECTIVE_METRIC, *scores, *(["pareto"] if scores else []), "status", "run_id", "note"]
    body = []
    for r in _sorted(rows):
        note = "reused: finished before" if r.get("reused") else r.get("note", "")
        objective = f"{r['objective']:.4f}" if r["objective"] is not None else ""
        marks = [_score(r.get("scores", {}).get(n)) for n in scores] + (
            ["yes" if r.get("pareto") else ""] * bool(scores)
        )
        body.append(
            [
                str(r["trial"]),
                *(str(r["values"][k]) for k in keys),
                objective,
                *marks,
                r["status"],
                r["run_id"] or "",
                note,
            ]
        )
    return header, body


def _score(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def seed_table(rows: list[dict[str, Any]], keys: list[str]) -> tuple[list[str], list[list[str]]] | None:
    """Mean ± std of the objective over seeds, per configuration of the other swept keys."""
    if "seed" not in keys:
        return None
    others = [k for k in keys if k != "seed"]
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        group = tuple(r["values"][k] for k in others)
        groups.setdefault(group, [])
        if r["status"] == "FINISHED" and r["objective"] is not None:
            groups[group].append(r["objective"])
    header = [*others, f"{OBJECTIVE_METRIC} mean", f"{OBJECTIVE_METRIC} std", "seeds"]
    body = []
    ranked = sorted(groups.items(), key=lambda kv: -(statistics.fmean(kv[1]) if kv[1] else -1))
    for group, values in ranked:
        mean = statistics.fmean(values) if values else None
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        body.append(
            [*group, f"{mean:.4f}" if mean is not None else "", f"{std:.4f}" if values else "", str(len(values))]
        )
    return header, body


def _markdown(header: list[str], body: list[list[str]]) -> str:
    def cell(s: str) -> str:
        return str(s).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def write_leaderboard(folder: Path, rows: list[dict[str, Any]], keys: list[str]) -> list[Path]:
    """leaderboard.csv (one row per trial), leaderboard.md (and the seed summary), leaderboard.png."""
    folder.mkdir(parents=True, exist_ok=True)
    header, body = table(rows, keys)
    with open(folder / "leaderboard.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(body)
    text = "# Sweep leaderboard\n\n" + _markdown(header, body) + "\n"
    seeds = seed_table(rows, keys)
    if seeds:
        text += "\n## Mean ± std over seeds\n\n" + _markdown(*seeds) + "\n"
        with open(folder / "leaderboard_seeds.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(seeds[0])
            writer.writerows(seeds[1])
    (folder / "leaderboard.md").write_text(text)
    files = [folder / "leaderboard.csv", folder / "leaderboard.md"]
    if seeds:
        files.append(folder / "leaderboard_seeds.csv")
    points = [(r["values"], r["objective"]) for r in rows if r["status"] == "FINISHED" and r["objective"] is not None]
    if keys and points:
        files.append(plots.objective_vs_keys_png(points, keys, OBJECTIVE_METRIC, folder / "leaderboard.png"))
    scored = [r for r in rows if "pareto" in r]
    if scored:  # a multi-objective search: its first two objectives, the front marked
        names = tuple(scored[0]["scores"])[:2]
        pairs = [(r["scores"][names[0]], r["scores"][names[1]]) for r in scored]
        files.append(plots.pareto_png(pairs, [r["pareto"] for r in scored], names, folder / "pareto.png"))
    return files


def render(rows: list[dict[str, Any]], keys: list[str], best: dict[str, Any] | None, sweep: Sweep) -> str:
    """The leaderboard as printed to the terminal, with the command that reruns the best trial."""
    out = io.StringIO()
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    n = sweep.spec["n_trials"]
    out.write(f"\nSweep leaderboard ({len(rows)}{f' of {n}' if n else ''} trials: ")
    out.write(", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + f"), mlflow parent run {sweep.parent_id}\n")
    out.write(_markdown(*table(rows, keys)) + "\n")
    seeds = seed_table(rows, keys)
    if seeds:
        out.write("\nMean ± std over seeds:\n" + _markdown(*seeds) + "\n")
    if best is not None:
        # The search's bookkeeping (study, trial number, trainer.test=false) is not part of the recipe.
        recipe = [o for o in best["overrides"] if not _bookkeeping(o)]
        command = "python " + " ".join(shlex.quote(mask_secrets(a)) for a in [_script(), *recipe])
        score = f"{OBJECTIVE_METRIC} {best['objective']:.4f}"
        out.write(f"\nbest: trial {best['trial']}, {score}; rerun it with:\n  {command}\n")
    out.write(f"leaderboard: {Path(sweep.dir) / 'leaderboard.md'}\n")
    if sweep.link:
        out.write(f"compare the trials in MLflow: {sweep.link}\n")
    return out.getvalue()


# ------------------------------------------------------------------------------------------------------------
# Inside a trial (any process, any machine)
# ------------------------------------------------------------------------------------------------------------


class StartFailed(BaseException):
    """Carries an error out of ``on_multirun_start``: Hydra turns a callback's Exception into a warning and
    goes on with the sweep, but a sweep whose store cannot be prepared must stop before any trial."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


class SweepCallback(Callback):
    """Registered in conf/config.yaml (``hydra.callbacks.sweep``). Stateless: it is pickled to workers."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            start(config)
        except Exception as e:
            raise StartFailed(e) from e

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        mask_hydra_files(None, sweep_dir(config.hydra))
        finish()

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Hydra has just written the job's ``.hydra/*.yaml`` (and the sweep's ``multirun.yaml``) with the
        command line as given: mask any password in them before anything reads or logs them."""
        from hydra.types import RunMode

        hc = config.hydra
        multirun = hc.mode == RunMode.MULTIRUN
        job_dir = Path(hc.runtime.output_dir) / hc.output_subdir if hc.output_subdir else None
        mask_hydra_files(job_dir, sweep_dir(hc) if multirun else None)
        if not multirun:  # a sweep warns once, when it starts
            warn_credentials({"mlflow.tracking_uri": OmegaConf.select(config, "mlflow.tracking_uri")})

    def on_job_end(self, config: DictConfig, job_return, **kwargs: Any) -> None:
        from hydra.types import RunMode

        if config.hydra.mode == RunMode.MULTIRUN:
            trial.record(config, _first_value(job_return))


def _first_value(job_return):
    """A multi-objective trial returns one value per objective: the leaderboard ranks by the first (val/acc)."""
    value = getattr(job_return, "_return_value", None)
    if isinstance(value, (list, tuple)) and value:
        return replace(job_return, _return_value=value[0])
    return job_return
