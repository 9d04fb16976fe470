"""`python train.py` for real, on the real MNIST files, checked through MlflowClient as a user would see it."""

from __future__ import annotations

import gzip
import json
import shutil
import signal
import socket
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from conftest import raw_test_images, read_until, start_train_py, train_py

pytestmark = pytest.mark.e2e


def _client(workdir) -> MlflowClient:
    uri = f"sqlite:///{workdir}/mlruns/mlflow.db"
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


def _runs(workdir, experiment="mnist-sweep"):
    client = _client(workdir)
    exp = client.get_experiment_by_name(experiment)
    return client, (client.search_runs([exp.experiment_id]) if exp else [])


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, mnist_root, cache_dir):
    """One default run, 1 epoch: shared by the checks below."""
    workdir = tmp_path_factory.mktemp("single")
    proc = train_py("trainer.epochs=1", f"data.root={mnist_root}", f"data.cache_dir={cache_dir}", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, proc


def test_single_run_is_tracked_completely(single_run):
    workdir, proc = single_run
    assert "epoch 1/1" in proc.stdout and "test/acc" in proc.stdout
    client, runs = _runs(workdir)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "epochs=1"  # data.root / cache_dir are left out of the name
    p = run.data.params
    assert p["model.hidden"] == "256" and p["model.depth"] == "2" and p["optimizer.lr"] == "0.003"
    assert p["data.batch_size"] == "256" and p["optimizer.name"] == "adam" and p["choice.model"] == "mlp"
    assert "None" not in p.values() and "choice.optimizer" not in p and not any(k.startswith("optuna.") for k in p)
    # The data as MLflow dataset inputs, described by the published checksums the files were checked against.
    inputs = {
        next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in run.inputs.dataset_inputs
    }
    assert sorted(inputs) == ["test", "train", "validation"] and {d.name for d in inputs.values()} == {"mnist"}
    assert [json.loads(inputs[k].profile)["num_rows"] for k in ("train", "validation", "test")] == [55000, 5000, 10000]
    for key in ("train/loss", "train/acc", "val/loss", "val/acc", "lr", "epoch_time_s", "train/samples_per_s"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1], key
    m = run.data.metrics
    assert {"test/loss", "test/acc", "test/acc_class_0", "test/acc_class_9"} <= set(m)
    t = run.data.tags
    assert len(t["config_hash"]) == 16 and t["device"] == "cpu" and t["version.torch"]
    assert "git.commit" in t and t["git.dirty"] in ("true", "false")
    assert t["mlflow.source.name"].endswith("train.py") and t["mlflow.source.type"] == "LOCAL" and t["mlflow.user"]
    assert "see it in MLflow: http://127.0.0.1:5000/#/experiments/" in proc.stdout
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {
        "config.yaml",
        "epochs.csv",
        "confusion_matrix.png",
        "confusion_matrix.csv",
        "hydra",
        "checkpoint",
    } <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "hydra")} >= {
        "hydra/config.yaml",
        "hydra/overrides.yaml",
    }
    assert any(a.path.endswith(".log") for a in client.list_artifacts(run.info.run_id))


def test_one_epoch_reaches_95_percent_test_accuracy(single_run):
    _, runs = _runs(single_run[0])
    assert runs[0].data.metrics["test/acc"] >= 0.95


def test_logged_model_reloads_and_classifies_raw_images(single_run, mnist_root):
    client, runs = _runs(single_run[0])
    images, labels = raw_test_images(mnist_root)
    loaded = mlflow.pyfunc.load_model(f"runs:/{runs[0].info.run_id}/model")
    scores = np.asarray(loaded.predict(images))
    assert scores.shape == (200, 10)
    assert (scores.argmax(1) == labels).mean() >= 0.9


def test_grid_sweep_one_run_per_value(tmp_path, mnist_root, cache_dir):
    proc = train_py(
        "-m",
        "model.hidden=128,256",
        "trainer.epochs=1",
        f"data.root={mnist_root}",
        f"data.cache_dir={cache_dir}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, runs = _runs(tmp_path)
    (sweep,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]  # the sweep's parent run
    runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == sweep.info.run_id]
    assert sorted(r.data.params["model.hidden"] for r in runs) == ["128", "256"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert len({r.info.run_name for r in runs}) == 2
    assert len({r.data.tags["config_hash"] for r in runs}) == 2
    for r in runs:
        assert [m.step for m in client.get_metric_history(r.info.run_id, "val/acc")] == [1]
        assert r.data.metrics["test/acc"] > 0.9
    assert (tmp_path / "outputs" / "multirun").is_dir()


def test_runs_started_together_keep_their_own_folders(tmp_path, mnist_root, cache_dir):
    """Two seeds launched side by side (`python train.py seed=1 & python train.py seed=2 &`) start in the same
    second: each must still log its own .hydra/ overrides, config and checkpoint (they once shared one folder)."""
    common = ("trainer.epochs=1", "model.hidden=32", "mlflow.log_model=false", f"data.root={mnist_root}")
    procs = [start_train_py(*common, f"data.cache_dir={cache_dir}", f"seed={s}", cwd=tmp_path) for s in (1, 2)]
    for proc in procs:
        output = proc.finish(600)
        assert proc.returncode == 0, output[-3000:]
    folders = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(folders) == 2, folders
    client, runs = _runs(tmp_path)
    assert len(runs) == 2
    for run in runs:
        seed = run.data.params["seed"]
        texts = {
            path: Path(client.download_artifacts(run.info.run_id, path, str(tmp_path / run.info.run_id))).read_text()
            for path in ("hydra/overrides.yaml", "config.yaml", "checkpoint/config.yaml")
        }
        assert f"- seed={seed}\n" in texts["hydra/overrides.yaml"]
        assert f"\nseed: {seed}\n" in texts["config.yaml"] and f"\nseed: {seed}\n" in texts["checkpoint/config.yaml"]


def test_refit_on_all_training_images_logs_no_validation(tmp_path, mnist_root, cache_dir):
    """data.val_size=0 (experiment=best_aug_refit): all 60,000 train, val/acc is absent, never NaN or a best."""
    proc = train_py(
        "-m",
        "data.val_size=0",
        "seed=0,1",
        "trainer.epochs=1",
        "model.hidden=64",
        "mlflow.log_model=false",
        f"data.root={mnist_root}",
        f"data.cache_dir={cache_dir}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "60000 train / 0 val / 10000 test" in proc.stdout and "| no val |" in proc.stdout
    assert proc.stdout.count("val/acc none (data.val_size=0)") == 2 and "acc nan" not in proc.stdout
    assert "Callback" not in proc.stderr  # the sweep's summary (mean ± std over seeds) skips the missing val/acc
    client, runs = _runs(tmp_path)
    (sweep,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == sweep.info.run_id]
    assert len(trials) == 2 and sweep.info.status == "FINISHED"
    for r in trials:
        assert r.info.status == "FINISHED" and r.data.metrics["test/acc"] > 0.9
        assert not {"val/acc", "val/loss", "best_val/acc"} & set(r.data.metrics)
        assert [m.step for m in client.get_metric_history(r.info.run_id, "train/acc")] == [1]
    assert "best_val/acc" not in sweep.data.metrics  # no trial can be the best without a validation split


def test_fashion_mnist_preset_uses_the_same_code(tmp_path, mnist_root, cache_dir):
    root = mnist_root.parent / "fashion-mnist"
    proc = train_py(
        "data=fashion_mnist",
        f"data.root={root}",
        "trainer.epochs=1",
        "mlflow.log_model=false",
        f"data.cache_dir={cache_dir}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, runs = _runs(tmp_path)
    assert runs[0].data.params["data.name"] == "fashion_mnist"
    assert 0.75 < runs[0].data.metrics["test/acc"] < 0.95  # clothing is harder than digits


def _one_line_error(proc, *fragments):
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (["optimizer=lion"], ["optimizer=lion", "adam, adamw, sgd"]),
        (["model.hidden=0"], ["model.hidden=0", "e.g. model.hidden=256"]),
        (["model.hidden=abc"], ["model.hidden", "abc"]),
        (["model.depth=-1"], ["model.depth=-1"]),
        (["data.batch_size=0"], ["data.batch_size=0"]),
        (["data.val_size=0", "trainer.patience=3"], ["trainer.patience=3", "no validation split"]),
        (["device=cuda"], ["device=cuda", "device=cpu"]),
        (["mlflow.tracking_uri=http://127.0.0.1:9"], ["unreachable", "mlflow.tracking_uri"]),
    ],
)
def test_bad_input_gets_one_line_and_logs_nothing(tmp_path, mnist_root, cache_dir, overrides, fragments):
    if overrides == ["device=cuda"]:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA, so device=cuda is valid here")
    proc = train_py(*overrides, f"data.root={mnist_root}", f"data.cache_dir={cache_dir}", cwd=tmp_path, timeout=120)
    _one_line_error(proc, *fragments)
    assert proc.returncode == 2
    _, runs = _runs(tmp_path)
    assert runs == []  # nothing was started, so nothing is left RUNNING or half-logged


def test_missing_data_without_download_says_how_to_point_at_a_local_copy(tmp_path, cache_dir):
    args = (f"data.root={tmp_path / 'nothing'}", "data.download=false", f"data.cache_dir={cache_dir}")
    proc = train_py(*args, cwd=tmp_path, timeout=120)
    _one_line_error(proc, f"mnist not found in {tmp_path / 'nothing'}", "point data.root at a folder holding them")
    assert "download failed" not in proc.stderr  # none was tried


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens on it once the socket is closed


def test_failed_download_says_how_to_point_at_a_local_copy(tmp_path, cache_dir):
    """data.download is on by default: the download fails the same way with or without a network, because every
    request goes through a proxy (the standard *_proxy variables, which urllib and so torchvision obey) that
    refuses connections."""
    proxy = f"http://127.0.0.1:{_closed_port()}"
    env = {"http_proxy": proxy, "https_proxy": proxy, "HTTP_PROXY": proxy, "HTTPS_PROXY": proxy}
    env |= {"no_proxy": None, "NO_PROXY": None, "all_proxy": None, "ALL_PROXY": None}
    proc = train_py(
        f"data.root={tmp_path / 'nothing'}", f"data.cache_dir={cache_dir}", cwd=tmp_path, timeout=120, env=env
    )
    _one_line_error(proc, "the download failed", "Connection refused", "data.root=")
    _, runs = _runs(tmp_path)
    assert runs == []


def test_corrupt_idx_file_is_named_before_training(tmp_path, mnist_root, cache_dir):
    broken = tmp_path / "broken"
    shutil.copytree(mnist_root, broken)
    target = broken / "t10k-labels-idx1-ubyte.gz"
    target.write_bytes(gzip.compress(gzip.decompress(target.read_bytes())[:-100]))  # truncated inside
    proc = train_py(f"data.root={broken}", f"data.cache_dir={tmp_path / 'cache'}", cwd=tmp_path, timeout=120)
    _one_line_error(proc, "t10k-labels-idx1-ubyte.gz", "truncated")
    _, runs = _runs(tmp_path)
    assert runs == []


def test_sigterm_closes_the_run_as_killed(tmp_path, mnist_root, cache_dir):
    proc = start_train_py("trainer.epochs=50", f"data.root={mnist_root}", f"data.cache_dir={cache_dir}", cwd=tmp_path)
    read_until(proc, lambda line: "epoch 1/50" in line, 120)  # training is under way
    proc.send_signal(signal.SIGTERM)
    rest = proc.finish(60)
    assert proc.returncode == 130, rest[-3000:]
    _, runs = _runs(tmp_path)
    assert [r.info.status for r in runs] == ["KILLED"]
    assert runs[0].data.metrics["val/acc"] > 0  # what was logged before the signal is kept
