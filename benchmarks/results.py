"""Regenerate docs/RESULTS.md: accuracy per recipe, mean ± std over seeds, and the list of runs behind it.

    python -m benchmarks.results --no-store          # from the saved runs only (no MLflow store needed)
    python -m benchmarks.results                     # also reads sqlite:///mlruns/mlflow.db, saving what it adds
    python -m benchmarks.results --experiment NAME --tracking-uri URI --out FILE --runs FILE --log FILE

Runs are grouped by their whole config except ``seed`` and the keys of where and how they ran (``IGNORED``:
paths, threads, progress output), so 3 seeds of one recipe make one row. Only FINISHED runs that scored the
test set are counted. The table says what each number is: the test accuracy was never used to choose anything
(selection happens on val/acc), so it is reported, not tuned.

The MLflow store is a local, git-ignored file, and a fresh clone has none: runs that took hours would vanish
with the checkout that made them. So every run the table counts is also written to a JSON file
(``--runs``, default benchmarks/records/results_runs.json: run id, experiment, params, the metrics the table
uses, device), and the next regeneration reads that file back as well as the store (the store wins for a run id
in both); ``--no-store`` reads the file alone. The commands that made the runs are a hand-kept list,
``--log`` (default benchmarks/records/results_log.json: date, command, host, note for each), written out as
the "The runs" table. A section of the output file headed "## Earlier runs" (hand-written notes on runs no file
holds) is kept as it is.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from benchmarks import common
from mnist_sweep.config import DISTORTIONS

RUNS = common.RECORDS / "results_runs.json"
LOG = common.RECORDS / "results_log.json"
LOG_COLUMNS = ("date (UTC)", "command", "host", "note")
# Where and how a run ran, not what it learned: seeds of one recipe run alone or side by side with one thread each
# (device.threads) still make one row; the device column says where each ran.
IGNORED = ("seed", "data.root", "data.cache_dir", "trainer.progress", "data.num_workers", "device.threads")
# Keys that some runs logged and others did not (added to the config later, or removed since: test-time
# augmentation's, which no run used), with the value a run without the key had.
ADDED_LATER = {"data.deskew": "False", "model.members": "1", "trainer.tta_views": "0", "trainer.tta_strength": "0.25"}


def _recipe_key(params: dict[str, str]) -> tuple:
    return tuple(
        sorted(
            (k, v)
            for k, v in params.items()
            if k not in IGNORED and not k.startswith(("optuna.", "sweep.")) and ADDED_LATER.get(k) != v
        )
    )


def _device(tags: dict[str, str]) -> str:
    return tags.get("device.name", tags.get("device", "?"))


ZERO = ("0", "0.0")


def _data(params: dict[str, str]) -> str:
    """What the net saw: the images as they are, deskewed (data.deskew), and/or augmented (data.augment)."""
    parts = ["deskewed"] if params.get("data.deskew") == "True" else []
    if params.get("data.augment.strength", "0.0") not in ZERO:
        parts.append(f"augment {params['data.augment.strength']}")
        # A distortion switched off is part of the recipe (best_aug drops shift and shear on deskewed digits).
        parts += [f"no {name}" for name in DISTORTIONS if params.get(f"data.augment.{name}") in ZERO]
    if params.get("data.val_size") == "0":
        parts.append("refit on all 60,000, no val")
    return ", ".join(parts) or "as is"


def _model(params: dict[str, str]) -> str:
    """The net: members, depth x width, activation, then what is switched on (normalisation, dropout)."""
    parts = [f"{params.get('model.depth')} x {params.get('model.hidden')} {params.get('model.activation')}"]
    if params.get("model.members", "1") != "1":
        parts[0] = f"{params['model.members']} nets of {parts[0]}"
    if params.get("model.norm", "none") != "none":
        parts.append(f"{params['model.norm']} norm")
    for key, label in (("model.input_dropout", "input dropout"), ("model.dropout", "dropout")):
        if params.get(key) not in (None, "0.0"):
            parts.append(f"{label} {params[key]}")
    return ", ".join(parts)


def _measured(members: list[dict], *keys: str) -> list[float]:
    """Each run's first metric of these keys, for the runs that have one (a refit has no val/acc)."""
    found = (next((r["metrics"][k] for k in keys if k in r["metrics"]), None) for r in members)
    return [v for v in found if v is not None]


def _fmt(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


KEPT = "## Earlier runs"
METRICS = ("test/acc", "best_val/acc", "val/acc", "train_time_s")
COLUMNS = (
    "recipe",
    "model",
    "optimizer",
    "epochs",
    "batch",
    "data",
    "seeds",
    "test acc %",
    "val acc %",
    "training s",
    "device",
)


def store_runs(tracking_uri: str, *experiments: str) -> list[dict]:
    """The FINISHED runs with a test score in these experiments, as plain records (what results_runs.json holds)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    found = [e for e in map(client.get_experiment_by_name, experiments) if e is not None]
    if not found:
        return []
    names = {e.experiment_id: e.name for e in found}
    runs = client.search_runs(list(names), "attributes.status = 'FINISHED'", max_results=50000)
    return [
        {
            "run_id": run.info.run_id,
            "experiment": names[run.info.experiment_id],
            "params": dict(run.data.params),
            # NaN (a run without a validation split logged its val metrics as NaN) is no measurement: left out.
            "metrics": {k: v for k in METRICS if (v := run.data.metrics.get(k)) is not None and v == v},
            "device": _device(run.data.tags),
        }
        for run in runs
        if "test/acc" in run.data.metrics
    ]


def load_runs(path: Path) -> list[dict]:
    """Records saved by an earlier regeneration (none if the file is missing)."""
    return json.loads(path.read_text()) if path.is_file() else []


def merge(saved: list[dict], fresh: list[dict]) -> list[dict]:
    """Saved records plus the store's, one per run id (the store's copy wins), in a stable order."""
    by_id = {r["run_id"]: r for r in saved} | {r["run_id"]: r for r in fresh}
    return sorted(by_id.values(), key=lambda r: (r["experiment"], r["run_id"]))


def collect(tracking_uri: str, *experiments: str) -> list[dict]:
    """One row per recipe in the store's runs of these experiments, best mean test accuracy first."""
    return rows_from(store_runs(tracking_uri, *experiments))


def rows_from(records: list[dict]) -> list[dict]:
    """One row per recipe (its seeds grouped), best mean test accuracy first."""
    groups: dict[tuple, list] = defaultdict(list)
    for run in records:
        groups[_recipe_key(run["params"])].append(run)
    rows = []
    for key, members in groups.items():
        params = dict(key)
        rows.append(
            {
                "recipe": params.get("choice.experiment")
                if params.get("choice.experiment") not in (None, "None")
                else "(none)",
                "model": _model(params),
                "device": ", ".join(sorted({r["device"] for r in members})),
                "optimizer": f"{params.get('optimizer.name')} lr {params.get('optimizer.lr')}",
                "epochs": params.get("trainer.epochs"),
                "batch": params.get("data.batch_size", "-"),
                "data": _data(params),
                "seeds": sorted(int(r["params"].get("seed", 0)) for r in members),
                "test": [r["metrics"]["test/acc"] for r in members],
                "val": _measured(members, "best_val/acc", "val/acc"),
                "train_s": _measured(members, "train_time_s"),
                "runs": [r["run_id"] for r in members],
                "params": params,
            }
        )
    _name_hidden_differences(rows)
    rows.sort(key=lambda r: statistics.fmean(r["test"]), reverse=True)
    return rows


SHOWN = ("recipe", "model", "optimizer", "epochs", "batch", "data", "device")


def _name_hidden_differences(rows: list[dict]) -> None:
    """Rows that the table's columns would show alike (they differ in a key it has no column for, such as
    trainer.label_smoothing) name those keys after the recipe, so no two rows read the same."""
    alike: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        alike[tuple(str(row[c]) for c in SHOWN)].append(row)
    for group in alike.values():
        if len(group) < 2:
            continue
        keys = set().union(*(r["params"] for r in group))
        differing = sorted(k for k in keys if len({r["params"].get(k) for r in group}) > 1)
        for row in group:
            row["recipe"] += " (" + ", ".join(f"{k}={row['params'].get(k, '-')}" for k in differing) + ")"


def load_log(path: Path) -> list[dict]:
    """The hand-kept list of the commands that made the runs (none if the file is missing)."""
    entries = json.loads(path.read_text()) if path.is_file() else []
    for i, entry in enumerate(entries):
        missing = [c for c in ("date", "command", "host") if not entry.get(c)]
        if missing:
            raise ValueError(f"{path}: entry {i} has no {', '.join(missing)}: {entry}")
    return entries


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def log_table(entries: list[dict]) -> str:
    """The runs, one command a row, in the order they ran."""
    rows = [[_cell(e["date"]), f"`{_cell(e['command'])}`", _cell(e["host"]), _cell(e.get("note", ""))] for e in entries]
    return common.table(list(LOG_COLUMNS), rows)


def markdown(rows: list[dict], command: str, log: list[dict] | None = None) -> str:
    lines = [
        "# Results",
        "",
        "Accuracy of each recipe found in the MLflow store, mean ± std over the seeds that ran. Hyper-parameters",
        "were chosen on the validation split (5,000 of the 60,000 training images); the official 10,000-image test",
        "set is only reported. A refit (data.val_size=0) trains a chosen recipe once more on all 60,000 images, so",
        "it has no validation accuracy. Training time is the time inside the training loop on the machine that ran it.",
        "",
        f"Regenerate with: `{command}`",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + " --- |" * len(COLUMNS),
    ]
    for r in rows:
        lines.append(
            f"| {r['recipe']} | {r['model']} | {r['optimizer']} | {r['epochs']} | {r['batch']} | {r['data']} | "
            f"{','.join(map(str, r['seeds']))} | {_fmt(r['test'])} | {_fmt(r['val'])} | "
            f"{_fmt(r['train_s'], scale=1.0, digits=1)} | {r['device']} |"
        )
    if not rows:
        lines.append("| (no finished runs with a test score yet) |" + " |" * (len(COLUMNS) - 1))
    if log:
        lines += [
            "",
            "## The runs",
            "",
            "The commands that made the runs above, in the order they ran (each with `mlflow.experiment=results`",
            "and `data.root=../shared/datasets/mnist`; on a CPU host, one run at a time and with two threads unless",
            "the note says otherwise). The table above gives what each scored.",
            "",
            log_table(log),
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default="sqlite:///mlruns/mlflow.db")
    parser.add_argument("--no-store", action="store_true", help="read the saved runs (--runs) only, no MLflow store")
    parser.add_argument("--experiment", action="append", help="repeat for several (default: results)")
    parser.add_argument("--out", default=str(common.DOCS / "RESULTS.md"))
    parser.add_argument("--runs", default=str(RUNS), help="runs kept from earlier stores ('' for none)")
    parser.add_argument("--log", default=str(LOG), help="the commands that made the runs ('' for none)")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.results" + "".join(
        f" --{k.replace('_', '-')}" + ("" if v is True else f" {item}")
        for k, v in vars(args).items()
        if v != parser.get_default(k)
        for item in (v if isinstance(v, list) else [v])
    )
    experiments = args.experiment or ["results"]
    saved = load_runs(Path(args.runs)) if args.runs else []
    fresh = [] if args.no_store else store_runs(args.tracking_uri, *experiments)
    records = merge(saved, fresh)
    rows = rows_from([r for r in records if r["experiment"] in experiments])
    log = load_log(Path(args.log)) if args.log else []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # The old file's hand-written "## Earlier runs" section is kept.
    _, marker, earlier = (out.read_text() if out.is_file() else "").partition(KEPT)
    out.write_text(markdown(rows, command, log) + (f"\n{marker}{earlier}" if marker else ""))
    if args.runs and fresh:
        Path(args.runs).parent.mkdir(parents=True, exist_ok=True)
        Path(args.runs).write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")
    added = len(records) - len(saved)
    print(
        f"{len(rows)} recipes written to {args.out}"
        + (f"; {args.runs} holds {len(records)} runs (+{added})" if args.runs and fresh else "")
    )


if __name__ == "__main__":
    main()
