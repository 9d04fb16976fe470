"""docs/RESULTS.md generation (benchmarks/results.py): from a real MLflow store holding hand-made runs, and from
the saved runs alone."""

from __future__ import annotations

import json
import shutil

import pytest
from mlflow import MlflowClient

from benchmarks import results


def _run(client, exp, seed, hidden, test_acc, status="FINISHED", experiment_choice="best", input_dropout=0.0, **more):
    run = client.create_run(exp, tags={"device.name": "AMD EPYC, 2 threads"})
    for k, v in {
        "seed": seed,
        "model.hidden": hidden,
        "model.depth": 2,
        "model.activation": "relu",
        "model.dropout": 0.0,
        "model.input_dropout": input_dropout,
        "optimizer.name": "adam",
        "optimizer.lr": 0.003,
        "trainer.epochs": 5,
        "data.batch_size": 256,
        "choice.experiment": experiment_choice,
        **more,
    }.items():
        client.log_param(run.info.run_id, k, v)
    client.log_metric(run.info.run_id, "test/acc", test_acc)
    if more.get("data.val_size") != 0:  # a refit on all 60,000 has no validation split
        client.log_metric(run.info.run_id, "best_val/acc", test_acc - 0.001)
    client.log_metric(run.info.run_id, "train_time_s", 10.0)
    client.set_terminated(run.info.run_id, status)


def test_groups_seeds_of_one_recipe_and_ranks_recipes(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("e", artifact_location=str(tmp_path / "a"))
    for seed, acc in ((0, 0.990), (1, 0.992)):
        _run(client, exp, seed, 1024, acc)
    later = {"data.deskew": False, "trainer.tta_views": 0, "trainer.tta_strength": 0.25}
    # logged after the keys existed, and run with one thread beside another run: still the same recipe
    _run(client, exp, 2, 1024, 0.994, **later, **{"device.threads": 1})
    _run(client, exp, 0, 128, 0.980, experiment_choice="None")
    _run(client, exp, 1, 128, 0.5, status="FAILED", experiment_choice="None")  # not counted
    batch_norm = {"model.norm": "batch"}
    other = client.create_experiment("f", artifact_location=str(tmp_path / "b"))
    _run(client, other, 0, 2048, 0.985, experiment_choice="best_aug", input_dropout=0.2)
    augmented = {"data.deskew": True, "data.augment.strength": 0.5, "data.augment.shift": 0.1}
    _run(client, other, 0, 2048, 0.97, experiment_choice="best_aug", input_dropout=0.2, **augmented, **batch_norm)
    unshifted = {**augmented, "data.augment.shift": 0.0, "data.augment.shear": 0}
    _run(client, other, 0, 2048, 0.96, experiment_choice="best_aug", input_dropout=0.2, **unshifted)
    _run(client, other, 0, 2048, 0.95, experiment_choice="best_aug_refit", **{"data.val_size": 0})
    rows = results.collect(uri, "e", "f")
    assert [r["seeds"] for r in rows] == [[0, 1, 2], [0], [0], [0], [0], [0]]
    recipes = ["best", "best_aug", "(none)", "best_aug", "best_aug", "best_aug_refit"]
    assert [r["recipe"] for r in rows] == recipes
    text = results.markdown(rows, "python -m benchmarks.results")
    assert "| best | 2 x 1024 relu | adam lr 0.003 | 5 | 256 | as is | 0,1,2 | 99.20 ± 0.20 |" in text
    assert "| best_aug | 2 x 2048 relu, input dropout 0.2 | adam lr 0.003 | 5 | 256 | as is |" in text
    assert (
        "| 2 x 2048 relu, batch norm, input dropout 0.2 | adam lr 0.003 | 5 | 256 | deskewed, augment 0.5 | 0 | 97.00 |"
        in text
    )
    assert "| 5 | 256 | deskewed, augment 0.5, no shear, no shift | 0 | 96.00 |" in text
    assert "| 98.00 |" in text and "50.00" not in text
    assert "| refit on all 60,000, no val | 0 | 95.00 | - | 10.0 |" in text  # no val/acc: a dash, not nan
    assert text.count("| AMD EPYC, 2 threads |") == 6  # where each recipe ran
    assert "## The runs" not in text  # no log given


def test_main_writes_the_file(tmp_path):
    out = tmp_path / "RESULTS.md"
    runs = tmp_path / "runs.json"
    results.main(
        [
            "--tracking-uri",
            f"sqlite:///{tmp_path}/empty.db",
            "--experiment",
            "nothing",
            "--out",
            str(out),
            "--runs",
            str(runs),
            "--log",
            "",
        ]
    )
    assert "no finished runs" in out.read_text() and results.load_runs(runs) == []


def test_runs_outlive_their_store_through_the_runs_file(tmp_path):
    """A fresh clone has no MLflow store: the runs file brings back what earlier regenerations counted."""
    out, runs = tmp_path / "RESULTS.md", tmp_path / "runs.json"
    first = f"sqlite:///{tmp_path}/first.db"
    client = MlflowClient(first)
    exp = client.create_experiment("e", artifact_location=str(tmp_path / "a"))
    _run(client, exp, 0, 1024, 0.990)
    other = client.create_experiment("other", artifact_location=str(tmp_path / "b"))
    _run(client, other, 0, 64, 0.95, experiment_choice="None")
    log = tmp_path / "log.json"
    log.write_text(json.dumps([{"date": "2026-12-01", "command": "python train.py -m seed=0", "host": "a laptop"}]))
    results.main(
        ["--tracking-uri", first, "--experiment", "e", "--experiment", "other", "--out", str(out), "--runs", str(runs)]
        + ["--log", str(log)]
    )
    out.write_text(out.read_text() + "\n## Earlier runs\n\nnotes on runs no file holds\n")

    # a new store (the old one is gone) with seed 1 of the same recipe; only experiment "e" is asked for
    second = f"sqlite:///{tmp_path}/second.db"
    client = MlflowClient(second)
    _run(client, client.create_experiment("e", artifact_location=str(tmp_path / "c")), 1, 1024, 0.994)
    results.main(
        ["--tracking-uri", second, "--experiment", "e", "--out", str(out), "--runs", str(runs), "--log", str(log)]
    )
    text = out.read_text()
    assert "| 0,1 | 99.20 ± 0.28 |" in text  # seed 0 from the file, seed 1 from the store: one row
    assert "2 x 64" not in text  # the other experiment's run is not in this table...
    assert len(results.load_runs(runs)) == 3  # ...but stays in the file
    assert text.count("## Earlier runs") == 1 and text.endswith("notes on runs no file holds\n")
    assert text.count("| 2026-12-01 | `python train.py -m seed=0` | a laptop |  |\n") == 1  # the log, as a table

    # without the file, only the store counts
    results.main(["--tracking-uri", second, "--experiment", "e", "--out", str(out), "--runs", ""])
    assert "| 1 | 99.40 |" in out.read_text()

    # without the store, only the file: no MLflow store is opened (nor created), and the file is left as it is
    saved = runs.read_text()
    gone = tmp_path / "gone.db"
    results.main(
        ["--no-store", "--tracking-uri", f"sqlite:///{gone}", "--experiment", "e", "--out", str(out)]
        + ["--runs", str(runs)]
    )
    assert "| 0,1 | 99.20 ± 0.28 |" in out.read_text() and not gone.exists() and runs.read_text() == saved
    assert "Regenerate with: `python -m benchmarks.results --tracking-uri sqlite:///" in out.read_text()


def test_rows_the_columns_show_alike_name_what_sets_them_apart(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("e", artifact_location=str(tmp_path / "a"))
    for seed in (0, 1):
        _run(client, exp, seed, 1024, 0.99, **{"trainer.label_smoothing": 0.1})
    _run(client, exp, 0, 1024, 0.98, **{"trainer.label_smoothing": 0.0})  # no column for it
    _run(client, exp, 0, 512, 0.97, **{"trainer.label_smoothing": 0.0})  # told apart by its width already
    rows = results.collect(uri, "e")
    assert [r["recipe"] for r in rows] == [
        "best (trainer.label_smoothing=0.1)",
        "best (trainer.label_smoothing=0.0)",
        "best",
    ]


def test_a_log_entry_needs_a_date_a_command_and_a_host(tmp_path):
    log = tmp_path / "log.json"
    log.write_text(json.dumps([{"date": "2026-12-01", "command": "python train.py", "host": "x"}, {"date": "d"}]))
    with pytest.raises(ValueError, match=r"log.json: entry 1 has no command, host"):
        results.load_log(log)
    assert results.load_log(tmp_path / "missing.json") == []


def test_a_pipe_in_a_log_cell_does_not_split_the_row():
    table = results.log_table([{"date": "d", "command": "python train.py a=1|2", "host": "h", "note": "x\ny"}])
    assert table.splitlines()[2] == "| d | `python train.py a=1\\|2` | h | x y |"


def test_docs_results_is_what_the_saved_runs_and_the_log_make(tmp_path):
    """docs/RESULTS.md is up to date: rebuilt from benchmarks/records/ alone, it comes out the same."""
    docs = results.common.DOCS / "RESULTS.md"
    out = tmp_path / "RESULTS.md"
    shutil.copy(docs, out)  # its hand-written "Earlier runs" section is kept
    results.main(["--no-store", "--out", str(out)])
    rebuilt = out.read_text().replace(f" --out {out}", "")
    assert rebuilt == docs.read_text()
