"""The winner, for use: the logged model's input handling through mlflow.pyfunc, the Model Registry's champion,
and `mlflow models serve` answering a real HTTP request (mnist_sweep/model.py Classifier, tracking.py, sweep.py)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import torch

from conftest import make_dataset, train_py
from mnist_sweep import model, sweep, tracking


def _classifier(seed: int = 0) -> model.Classifier:
    torch.manual_seed(seed)
    return model.Classifier(model.MLP(hidden=8, depth=1), 0.1307, 0.3081).eval()


def _images(n: int = 3, seed: int = 0) -> np.ndarray:
    """Digit-like test images: float64 in 0..1, [n,28,28], what `x / 255.0` gives."""
    return np.random.default_rng(seed).random((n, 28, 28)) ** 4


def _trial_run(client, experiment_id: str, val_acc: float, test_acc: float | None = 0.9, seed: int = 0) -> str:
    """A finished run as a sweep's trial leaves it: metrics and checkpoint/model.pt (no logged model)."""
    net = _classifier(seed).net
    run = client.create_run(experiment_id)
    run_id = run.info.run_id
    metrics = {"best_val/acc": val_acc, **({"test/acc": test_acc, "test/loss": 0.3} if test_acc is not None else {})}
    tracking.Run(run_id).log_metrics(metrics, step=2)
    folder = os.path.join(os.getcwd(), f"ckpt-{run_id}")
    os.makedirs(folder)
    example = torch.from_numpy(_images(4, seed)).float()[:, None]
    ckpt = {"model_args": {"hidden": 8, "depth": 1}, "mean": 0.1307, "std": 0.3081, "deskew": False}
    torch.save({**ckpt, "state_dict": net.state_dict(), "example": example}, os.path.join(folder, "model.pt"))
    client.log_artifacts(run_id, folder, "checkpoint")
    client.set_terminated(run_id)
    return run_id


# ------------------------------------------------------------------------------------------------------------
# 2. Images as users have them, through mlflow.pyfunc
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(params=["weights", "pickle"])
def logged(store, request):
    """The default format, and pickle (opted in, loaded trusting the store): both take the same images."""
    client, experiment_id, _ = store
    run = client.create_run(experiment_id)
    classifier = _classifier()
    uri = tracking.Run(run.info.run_id).log_model(classifier, _images(2)[:, None], request.param)
    return tracking.load_model(uri, trust_pickle=request.param == "pickle"), classifier


@pytest.mark.parametrize("shape", [(28, 28), (1, 28, 28), (784,)])
@pytest.mark.parametrize("dtype", ["uint8", "float32", "float64", "int64"])
def test_pyfunc_model_accepts_images_as_users_have_them(logged, shape, dtype):
    loaded, classifier = logged
    x = _images(3)
    expected = classifier(torch.from_numpy(x).float()[:, None]).detach().numpy()
    raw = (x * 255).round().astype(dtype) if dtype in ("uint8", "int64") else x.astype(dtype)
    scores = np.asarray(loaded.predict(raw.reshape(3, *shape)))
    tolerance = 1e-5 if dtype.startswith("float") else 0.1  # integers are the images rounded to 1/255
    np.testing.assert_allclose(scores, expected, atol=tolerance, rtol=0)
    assert scores.shape == (3, 10)


@pytest.mark.parametrize(
    ("x", "says"),
    [
        (np.zeros((2, 27, 27)), r"shaped \[N,28,28\], \[N,1,28,28\] or \[N,784\].*got \[2,27,27\] float64"),
        (np.zeros((28, 28), np.float32), r"got \[28,28\] float32 \(one image\? add the batch axis"),
        (np.zeros((2, 3, 28, 28), np.uint8), r"got \[2,3,28,28\] uint8"),
        (_images(2) * 255, r"float pixels must be 0\.\.1; got .*\.\.25\d.* \[2,28,28\] float64: divide .* by 255"),
        (np.full((2, 784), 300), r"integer pixels must be 0\.\.255; got values 300\.\.300"),
        (np.full((1, 28, 28), np.nan), r"float pixels must be 0\.\.1"),
        (np.zeros((1, 28, 28), bool), r"uint8 0\.\.255 or float 0\.\.1.*got \[1,28,28\] bool"),
    ],
)
def test_anything_else_gets_one_clear_line_not_the_array(logged, x, says):
    loaded, _ = logged
    with pytest.raises(ValueError, match=says) as e:
        loaded.predict(x)
    message = str(e.value)
    assert "\n" not in message and len(message) < 250 and "[[" not in message


def test_the_logged_model_carries_raw_uint8_images_as_its_input_example_and_its_scores(store):
    client, experiment_id, _ = store
    run_id = _trial_run(client, experiment_id, 0.97, 0.96)
    uri = tracking.Run(run_id).log_model(_classifier(), _images(4)[:, None])
    info = mlflow.models.get_model_info(uri)
    assert info.signature is None  # a tensor signature would refuse float64 and the other shapes
    logged = client.get_logged_model(uri.removeprefix("models:/"))
    path = mlflow.artifacts.download_artifacts(f"{logged.artifact_location}/serving_input_example.json")
    example = np.asarray(json.loads(open(path).read())["inputs"])
    assert example.shape == (2, 28, 28) and example.max() > 1  # what to send `mlflow models serve`: raw pixels
    assert {m.key: m.value for m in logged.metrics} == {"best_val/acc": 0.97, "test/acc": 0.96, "test/loss": 0.3}
    history = client.get_metric_history(run_id, "test/acc")
    assert len(history) == 1  # linking sent the same point again: the run's history is unchanged


# ------------------------------------------------------------------------------------------------------------
# 1. The Model Registry: a version per sweep, @champion on the best
# ------------------------------------------------------------------------------------------------------------


def test_each_sweep_registers_a_version_and_the_champion_moves_only_when_beaten(store, capsys):
    client, experiment_id, _ = store
    runs = [_trial_run(client, experiment_id, acc, seed=i) for i, acc in enumerate((0.90, 0.95, 0.93, 0.95))]
    results = [sweep.log_best_model(client, r, "weights", "digits", f"sweep-{i}") for i, r in enumerate(runs)]
    assert [(r.version, r.champion) for r in results] == [("1", "1"), ("2", "2"), ("3", "2"), ("4", "2")]
    assert client.get_model_version_by_alias("digits", tracking.CHAMPION).run_id == runs[1]
    out = capsys.readouterr().out
    assert "model registered: digits version 2 (best_val/acc 0.9500); @champion -> version 2 (was version 1" in out
    assert "digits version 3 (best_val/acc 0.9300); @champion stays version 2 (best_val/acc 0.9500)" in out
    assert "python -m mnist_sweep.predict" in out and "models:/digits@champion" in out
    v3 = client.get_model_version("digits", "3")
    assert v3.tags["best_val/acc"] == "0.93" and v3.tags["test/acc"] == "0.9" and v3.tags["sweep.parent_run_id"]
    model_id = tracking.Run(runs[2]).model_id()
    assert v3.source == f"models:/{model_id}"
    logged = client.get_logged_model(model_id)
    assert {m.key for m in logged.metrics} == {"best_val/acc", "test/acc", "test/loss"}  # the Models tab shows them
    # A resumed sweep whose best run is already registered adds no version and leaves the champion alone.
    again = sweep.log_best_model(client, runs[2], "weights", "digits", "resumed")
    assert (again.version, again.champion) == ("3", "2")
    assert len(client.search_model_versions("name = 'digits'")) == 4
    # The champion is the model that was registered: it loads by its alias.
    scores = mlflow.pyfunc.load_model("models:/digits@champion").predict(_images(2))
    expected = _classifier(1)(torch.from_numpy(_images(2)).float()).detach().numpy()
    np.testing.assert_allclose(np.asarray(scores), expected, atol=1e-5)


def test_a_champion_without_a_score_tag_is_judged_by_its_run(store):
    client, experiment_id, _ = store
    strong, weak = (_trial_run(client, experiment_id, acc, seed=i) for i, acc in enumerate((0.99, 0.98)))
    sweep.log_best_model(client, strong, "weights", None)  # logged, not registered
    assert tracking.Run(strong).model_id() and not client.search_registered_models()
    by_hand = mlflow.register_model(f"models:/{tracking.Run(strong).model_id()}", "digits")  # no score tag
    client.set_registered_model_alias("digits", tracking.CHAMPION, by_hand.version)
    result = sweep.log_best_model(client, weak, "weights", "digits")
    assert (result.version, result.champion, result.previous_score) == ("2", "1", 0.99)


def _row(trial: int, run_id: str, overrides: list[str], objective: float = 0.9, status: str = "FINISHED"):
    return {"trial": trial, "run_id": run_id, "overrides": overrides, "objective": objective, "status": status}


def test_the_kept_model_is_the_tested_rerun_of_the_chosen_recipe_when_there_is_one():
    metrics = {"best": {"best_val/acc": 0.9}, "rerun": {"best_val/acc": 0.9, "test/acc": 0.89}, "other": {}}
    metrics["other-tested"] = {"test/acc": 0.5}
    client = SimpleNamespace(get_run=lambda r: SimpleNamespace(data=SimpleNamespace(metrics=metrics[r])))
    chosen = ["model.hidden=64", "optimizer.lr=0.01"]
    best = _row(3, "best", [*chosen, "optuna.study=s", "optuna.trial=3", "trainer.test=false"])
    rows = [
        _row(0, "other-tested", ["model.hidden=32", "optimizer.lr=0.01", "trainer.test=true"]),
        best,
        _row(4, "rerun", [*reversed(chosen), "trainer.test=true"]),
    ]
    assert sweep.model_run(client, rows, best) == "rerun"  # an Optuna search: the re-run holds the test score
    assert sweep.model_run(client, rows[:2], best) == "best"  # no re-run (test_best=false): the trial itself
    rows[2]["status"] = "FAILED"
    assert sweep.model_run(client, rows, best) == "best"
    metrics["best"]["test/acc"] = 0.88  # a grid sweep: every trial took the test set; the best keeps its own
    rows[2]["status"] = "FINISHED"
    assert sweep.model_run(client, rows, best) == "best"


def test_a_sweep_on_tiny_data_registers_its_best_trial_as_champion(tmp_path):
    root = tmp_path / "tiny"
    make_dataset(root)
    common = (f"data.root={root}", "data.val_size=20", "data.verify=false", "data.download=false")
    proc = train_py("-m", "model.hidden=8,16", "trainer.epochs=1", "data.batch_size=32", *common, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model registered: mnist-mlp version 1" in proc.stdout and "@champion -> version 1" in proc.stdout
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    champion = client.get_model_version_by_alias("mnist-mlp", tracking.CHAMPION)
    trials = client.search_runs(
        [client.get_experiment_by_name("mnist-sweep").experiment_id], "tags.`hydra.job.num` != ''"
    )
    best = max(trials, key=lambda r: r.data.metrics["best_val/acc"])
    assert champion.run_id == best.info.run_id
    assert float(champion.tags["best_val/acc"]) == pytest.approx(best.data.metrics["best_val/acc"], abs=1e-6)
    folder = client.get_logged_model(champion.source.removeprefix("models:/")).artifact_location.removeprefix("file://")
    assert tracking.model_kind(folder) == "weights"  # the default format: no pickle, no code


# ------------------------------------------------------------------------------------------------------------
# 3. Serving: `mlflow models serve` answers JSON of raw uint8 images
# ------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 30) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.e2e
def test_mlflow_models_serve_answers_json_of_raw_uint8_images(store, tmp_path):
    client, experiment_id, uri = store
    run_id = _trial_run(client, experiment_id, 0.9)
    sweep.log_best_model(client, run_id, "weights", "digits")
    port = _free_port()
    bin_dir = os.path.dirname(sys.executable)  # mlflow starts `uvicorn` by name: the venv's, as when it is active
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    command = ["mlflow", "models", "serve", "-m", "models:/digits@champion", "--env-manager", "local", "-p", str(port)]
    command[0] = os.path.join(bin_dir, "mlflow")
    log = open(tmp_path / "serve.log", "wb")
    server = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "no answer on /ping in 90 s:\n" + (tmp_path / "serve.log").read_text()
            time.sleep(0.5)
        images = (_images(2) * 255).round().astype(np.uint8)
        status, answer = _post(f"http://127.0.0.1:{port}/invocations", {"inputs": images.tolist()})
        assert status == 200, answer
        expected = _classifier()(torch.from_numpy(images)).detach().numpy()
        np.testing.assert_allclose(np.asarray(answer["predictions"]), expected, atol=1e-5)
        status, answer = _post(f"http://127.0.0.1:{port}/invocations", {"inputs": images[:, :27, :27].tolist()})
        # MLflow's scoring server answers 400 with a fixed message; the model's one line ends its stack_trace.
        reason = answer["stack_trace"].strip().splitlines()[-1]
        assert status == 400 and reason.startswith("ValueError: images must be shaped [N,28,28], [N,1,28,28] or")
        assert "[2,27,27] int64" in reason and "[[" not in answer["message"] + reason
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)  # the server and its workers: the whole group
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=20)
        log.close()
