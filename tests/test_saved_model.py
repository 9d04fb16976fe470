"""Models that load without running code: the default logged format holds no pickle and no code, loads with every
unpickler forbidden, pickle only when opted in, and a tampered file is a clear error (mnist_sweep/saved_model.py,
tracking.py's log_model / model_kind / load_model, predict --trust-pickle)."""

from __future__ import annotations

import pickle
import shutil
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml

from mnist_sweep import config, model, predict, saved_model, tracking

FIXTURES = Path(__file__).parent / "fixtures" / "digits"


def _classifier(**args) -> model.Classifier:
    torch.manual_seed(0)
    net = model.build(**{"hidden": 8, "depth": 1, **args})
    return model.Classifier(net, 0.1307, 0.3081).eval()


def _images(n: int = 3) -> np.ndarray:
    return (np.random.default_rng(0).random((n, 28, 28)) ** 4 * 255).round().astype(np.uint8)


def _log(store, classifier=None, fmt: str | None = None) -> tuple[str, Path]:
    """Log a model in ``fmt`` (None: the default); its URI and its folder in the store (artifacts are local here)."""
    client, experiment_id, _ = store
    run_id = client.create_run(experiment_id).info.run_id
    example = _images(2)[:, None].astype(np.float32) / 255
    extra = () if fmt is None else (fmt,)
    uri = tracking.Run(run_id).log_model(classifier or _classifier(), example, *extra)
    location = client.get_logged_model(uri.removeprefix("models:/")).artifact_location
    return uri, Path(location.removeprefix("file://"))


def _scores(classifier: model.Classifier, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return classifier(images).numpy()


@pytest.fixture
def no_unpickling(monkeypatch):
    """Every way to unpickle (pickle, cloudpickle, torch.load, torch.export.load) raises while it is active."""
    import cloudpickle

    def forbidden(*args, **kwargs):
        raise AssertionError("something was unpickled")

    class Unpickler:
        def __init__(self, *args, **kwargs):
            forbidden()

    for target, name in ((pickle, "load"), (pickle, "loads"), (cloudpickle, "load"), (cloudpickle, "loads")):
        monkeypatch.setattr(target, name, forbidden)
    monkeypatch.setattr(pickle, "Unpickler", Unpickler)
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(torch.export, "load", forbidden)


def test_the_default_format_is_weights_and_pickle_an_explicit_choice():
    assert config.MlflowConfig().model_format == "weights"
    assert config.MlflowConfig(model_format="pickle").model_format == "pickle"
    with pytest.raises(Exception, match="choose weights, pt2 or pickle"):
        config.MlflowConfig(model_format="cloudpickle")


def test_the_default_format_holds_no_pickle_and_no_code(store):
    _, folder = _log(store)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert "data/classifier/weights.npz" in files and "data/classifier/model.json" in files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pth", ".pt", ".pt2", ".py", ".pyc"))], files
    assert not (folder / "code").exists()
    flavor = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]
    assert set(flavor) == {"python_function"}
    assert (
        flavor["python_function"]["loader_module"] == "mnist_sweep.saved_model"
        and not flavor["python_function"]["code"]
    )
    for name in files:  # every other file is text: JSON, YAML, requirements
        if not name.endswith(".npz"):
            (folder / name).read_text(encoding="utf-8")
    with zipfile.ZipFile(folder / "data/classifier/weights.npz") as npz:  # plain .npy arrays, none of objects
        for member in npz.namelist():
            assert member.endswith(".npy")
            with npz.open(member) as f:
                major, _ = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                _, _, dtype = read(f)
                assert not dtype.hasobject


@pytest.mark.parametrize("args", [{}, {"members": 2, "norm": "batch", "activation": "gelu", "depth": 2}])
def test_it_loads_and_predicts_with_every_unpickler_forbidden(store, no_unpickling, args):
    classifier = _classifier(**args)
    if args:
        classifier.deskew = True
    uri, _ = _log(store, classifier)
    images = _images()
    for loaded in (tracking.load_model(uri), mlflow.pyfunc.load_model(uri)):  # ours checks first; MLflow's works
        np.testing.assert_allclose(loaded.predict(images), _scores(classifier, images), atol=1e-6, rtol=0)
    assert saved_model.load(mlflow.artifacts.download_artifacts(uri) + "/data/classifier").deskew == bool(args)


def test_a_pickled_model_loads_only_when_the_store_is_trusted(store, tmp_path, capsys):
    classifier = _classifier()
    uri, folder = _log(store, classifier, "pickle")
    assert (folder / "data" / "model.pth").exists()  # what the user opted in to
    with pytest.raises(tracking.UntrustedModelError, match=r"pickle .*only if you trust .*--trust-pickle"):
        tracking.load_model(uri)
    images = _images()
    trusted = tracking.load_model(uri, trust_pickle=True)
    np.testing.assert_allclose(trusted.predict(images), _scores(classifier, images), atol=1e-6, rtol=0)
    tracking_uri = store[2]
    capsys.readouterr()
    image = str(sorted(FIXTURES.glob("*"))[0])
    assert predict.main([image, "--model", uri, "--tracking-uri", tracking_uri]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--trust-pickle" in err and "Traceback" not in err
    assert predict.main([image, "--model", uri, "--tracking-uri", tracking_uri, "--trust-pickle"]) == 0


def _payload(marker: Path):
    """An object whose unpickling creates ``marker``: what an attacker's file would run."""

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    return Payload()


def test_a_pickle_in_place_of_the_weights_is_a_clear_error_not_code_execution(store, tmp_path, capsys):
    uri, folder = _log(store)
    marker = tmp_path / "pwned"
    weights = folder / "data" / "classifier" / "weights.npz"
    with np.load(weights) as npz:
        arrays = dict(npz)
    arrays["net.net.1.weight"] = np.full((8, 784), _payload(marker), dtype=object)  # pickled inside the npz
    np.savez(weights, **arrays)
    with pytest.raises(saved_model.ModelFileError, match=r"net.net.1.weight is \[8, 784\] object, the model needs"):
        tracking.load_model(uri)
    weights.write_bytes(pickle.dumps(_payload(marker)))  # a bare pickle under the same name
    with pytest.raises(saved_model.ModelFileError, match=r"weights.npz is not a weights-only \.npz .*replaced"):
        tracking.load_model(uri)
    code = predict.main([str(sorted(FIXTURES.glob("*"))[0]), "--model", uri, "--tracking-uri", store[2]])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "ModelFileError" in err and "weights.npz" in err
    assert not marker.exists()


def test_a_tampered_mlmodel_is_refused_before_anything_loads(store, tmp_path):
    uri, folder = _log(store)
    mlmodel = folder / "MLmodel"
    original = mlmodel.read_text()
    code = folder / "code" / "mnist_sweep"
    code.mkdir(parents=True)
    (code / "saved_model.py").write_text(f"open({str(tmp_path / 'pwned')!r}, 'w')\n")
    for change, says in (
        (("loader_module: mnist_sweep.saved_model", "loader_module: mlflow.pytorch"), "is a pickle"),
        (("code: null", "code: code"), "ships Python code"),
        (("loader_module: mnist_sweep.saved_model", "loader_module: os"), "loads through 'os'"),
    ):
        mlmodel.write_text(original.replace(*change))
        with pytest.raises(tracking.UntrustedModelError, match=says):
            tracking.load_model(uri)
    assert not (tmp_path / "pwned").exists()
    mlmodel.write_text("{{ not yaml")
    with pytest.raises(tracking.UntrustedModelError, match="not YAML"):
        tracking.load_model(uri)


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (
            lambda s: s.update(build={**s["build"], "hidden": 4096}),
            r"net.net.1.weight is \[8, 784\].*needs \[4096, 784\]",
        ),
        (lambda s: s.update(build={**s["build"], "_target_": "os.system"}), "unknown model argument '_target_'"),
        (lambda s: s.update(build={**s["build"], "hidden": "8"}), "hidden must be int"),
        (lambda s: s.update(build={**s["build"], "activation": "sigmoid"}), "build no model"),
        (lambda s: s.update(format="something"), "not an mnist-sweep-classifier"),
        (lambda s: s.update(version=2), "has version 2"),
        (lambda s: s.update(mean=True), "'mean' must be a number"),
    ],
)
def test_a_tampered_description_is_one_clear_line(store, edit, says):
    import json

    uri, folder = _log(store)
    path = folder / "data" / "classifier" / "model.json"
    spec = json.loads(path.read_text())
    edit(spec)
    path.write_text(json.dumps(spec))
    with pytest.raises(saved_model.ModelFileError, match=says) as e:
        tracking.load_model(uri)
    assert "\n" not in str(e.value)


def test_missing_or_damaged_files_are_one_clear_line(store):
    uri, folder = _log(store)
    data = folder / "data" / "classifier"
    (data / "weights.npz").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(saved_model.ModelFileError, match="not a weights-only .npz"):
        tracking.load_model(uri)
    (data / "weights.npz").unlink()
    with pytest.raises(saved_model.ModelFileError, match="weights.npz is missing"):
        tracking.load_model(uri)
    shutil.rmtree(data)
    with pytest.raises(saved_model.ModelFileError, match="model.json is missing"):
        tracking.load_model(uri)


def test_a_pt2_model_loads_after_mlflow_checks_its_archive_for_pickles(store, monkeypatch):
    classifier = _classifier()
    uri, _ = _log(store, classifier, "pt2")
    checked = []
    import mlflow.pytorch as flavor

    original = flavor._validate_pt2_archive_is_pickle_free
    monkeypatch.setattr(flavor, "_validate_pt2_archive_is_pickle_free", lambda p: checked.append(p) or original(p))
    x = _images().astype(np.float32)[:, None] / 255  # a traced graph takes exactly its signature
    np.testing.assert_allclose(tracking.load_model(uri).predict(x), _scores(classifier, x), atol=1e-5, rtol=0)
    assert checked  # loaded with MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false: MLflow checked the archive


def test_download_model_copies_a_checked_model_and_nothing_that_would_run_code(store, tmp_path):
    uri, _ = _log(store)
    folder, kind = tracking.download_model(uri, tmp_path / "champion")
    assert kind == "weights" and (folder / "MLmodel").is_file() and (folder / "data/classifier/weights.npz").is_file()
    pickled, _ = _log(store, fmt="pickle")
    with pytest.raises(tracking.UntrustedModelError, match="is a pickle"):
        tracking.download_model(pickled, tmp_path / "other")
    assert not (tmp_path / "other").exists()
