"""The logged model without pickle: weights as plain arrays, the net's arguments as JSON, code from this package.

A model logged with ``mlflow.model_format=weights`` (the default) is a folder of data, never of code:

    MLmodel           python_function flavor, loader_module: mnist_sweep.saved_model (this module), no code paths
    data/model.json   what rebuilds the classifier: model.build's arguments, mean, std, deskew
    data/weights.npz  every tensor of the classifier's state dict (numpy's .npz, read with allow_pickle=False)

Loading reads the JSON, checks every argument against what ``model.build`` takes and the weights' names and
shapes against the net those arguments build (on the meta device: no memory), then copies the arrays in. Nothing
is unpickled and no code comes from the store: whoever can write the store can change the scores, not run code.
A file that is not what it should be is a one-line ``ModelFileError``.

``mlflow.pyfunc.load_model`` (and ``mlflow models serve``) loads it through ``_load_pyfunc`` below; this package
must be importable where it loads. ``tracking.load_model`` checks the MLmodel first, since MLflow itself follows
whatever an MLmodel names (a pickle flavor, code paths).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mnist_sweep import model

FORMAT = "mnist-sweep-classifier"  # model.json's "format"
VERSION = 1
SPEC = "model.json"
WEIGHTS = "weights.npz"
LOADER = __name__  # the python_function flavor's loader_module
# model.build's arguments and their types (bool is refused where a number is expected: JSON's true is no width)
ARGS: dict[str, tuple[type, ...]] = {
    "members": (int,),
    "in_features": (int,),
    "hidden": (int,),
    "depth": (int,),
    "num_classes": (int,),
    "activation": (str,),
    "dropout": (int, float),
    "norm": (str,),
    "input_dropout": (int, float),
}


class ModelFileError(ValueError):
    """A saved model's files are missing, damaged or not what this package writes."""


def build_args(net: torch.nn.Module) -> dict[str, Any]:
    """The arguments of ``model.build`` that rebuild ``net`` (an MLP or an Ensemble)."""
    if isinstance(net, model.Ensemble):
        return {"members": len(net.members), **build_args(net.members[0])}
    if isinstance(net, model.MLP):
        return dict(net.args)
    raise TypeError(f"cannot save a {type(net).__name__}: only model.MLP and model.Ensemble")


def save(classifier: model.Classifier, folder: str | Path) -> Path:
    """Write ``classifier`` into ``folder`` (created): model.json and weights.npz. Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = {
        "format": FORMAT,
        "version": VERSION,
        "build": build_args(classifier.net),
        "mean": float(classifier.mean),
        "std": float(classifier.std),
        "deskew": bool(classifier.deskew),
    }
    (folder / SPEC).write_text(json.dumps(spec, indent=1) + "\n")
    arrays = {
        k: v.detach().cpu().float().numpy() if v.is_floating_point() else v.detach().cpu().numpy()
        for k, v in classifier.state_dict().items()
    }
    np.savez(folder / WEIGHTS, **arrays)
    return folder


def _spec(folder: Path) -> dict[str, Any]:
    try:
        spec = json.loads((folder / SPEC).read_text())
    except FileNotFoundError:
        raise ModelFileError(f"{folder / SPEC} is missing: not a model saved by mnist_sweep") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise ModelFileError(f"{folder / SPEC} is not JSON ({type(e).__name__}): damaged or replaced") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise ModelFileError(f"{folder / SPEC} is not an {FORMAT} description")
    if spec.get("version") != VERSION:
        raise ModelFileError(f"{folder / SPEC} has version {spec.get('version')!r}; this mnist_sweep reads {VERSION}")
    args = spec.get("build")
    if not isinstance(args, dict):
        raise ModelFileError(f"{folder / SPEC}: 'build' must be an object of model.build's arguments")
    for key, value in args.items():
        if key not in ARGS:
            raise ModelFileError(f"{folder / SPEC}: unknown model argument {key!r} (known: {', '.join(ARGS)})")
        if isinstance(value, bool) or not isinstance(value, ARGS[key]):
            raise ModelFileError(f"{folder / SPEC}: model argument {key} must be {ARGS[key][0].__name__}")
    for key in ("mean", "std"):
        if isinstance(spec.get(key), bool) or not isinstance(spec.get(key), (int, float)):
            raise ModelFileError(f"{folder / SPEC}: {key!r} must be a number")
    if not isinstance(spec.get("deskew", False), bool):
        raise ModelFileError(f"{folder / SPEC}: 'deskew' must be true or false")
    return spec


def _damaged(path: Path, reason: str) -> ModelFileError:
    return ModelFileError(f"{path} is not a weights-only .npz ({reason}): damaged or replaced")


def _arrays(path: Path, expected: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The arrays of ``path``, each header checked against ``expected`` (name, shape, a number type) before its
    data is read: a replaced file can neither unpickle anything nor make this allocate more than the model needs."""
    try:
        archive = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise ModelFileError(f"{path} is missing") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise _damaged(path, str(e).splitlines()[0][:120] or type(e).__name__) from None
    with archive:
        members = {m.removesuffix(".npy"): m for m in archive.namelist()}
        if set(members) != set(expected) or not all(m.endswith(".npy") for m in members.values()):
            missing, extra = sorted(set(expected) - set(members)), sorted(set(members) - set(expected))
            raise ModelFileError(f"{path} does not match {SPEC}: missing {missing[:3]}, unexpected {extra[:3]}")
        arrays = {}
        for name, member in members.items():
            try:
                with archive.open(member) as f:
                    version = np.lib.format.read_magic(f)
                    if version not in ((1, 0), (2, 0)):
                        raise ValueError(f"{member}: .npy version {version}")
                    header = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = header(f)
                want = tuple(expected[name].shape)
                if tuple(shape) != want or dtype.hasobject or dtype.kind not in "fiu":
                    raise ModelFileError(
                        f"{path}: {name} is {list(shape)} {dtype}, the model needs {list(want)} numbers"
                    )
                with archive.open(member) as f:
                    arrays[name] = np.lib.format.read_array(f, allow_pickle=False)
            except ModelFileError:
                raise
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
                raise _damaged(path, str(e).splitlines()[0][:120] or type(e).__name__) from None
    return arrays


def load(folder: str | Path) -> model.Classifier:
    """The classifier saved in ``folder``, in eval mode; a one-line ModelFileError for anything amiss."""
    folder = Path(folder)
    spec = _spec(folder)
    try:
        with torch.device("meta"):  # the shapes the arguments imply, without allocating or initialising them
            classifier = model.Classifier(model.build(**spec["build"]), 0.0, 1.0, spec.get("deskew", False))
    except (ValueError, TypeError, RuntimeError) as e:
        raise ModelFileError(f"{folder / SPEC}: its arguments build no model ({str(e).splitlines()[0]})") from None
    expected = classifier.state_dict()
    arrays = _arrays(folder / WEIGHTS, expected)
    state = {name: torch.from_numpy(np.ascontiguousarray(a)).to(expected[name].dtype) for name, a in arrays.items()}
    classifier.load_state_dict(state, assign=True)  # the meta tensors replaced by the file's
    return classifier.eval()


class PyfuncClassifier:
    """What ``mlflow.pyfunc`` calls: ``predict(images)`` -> class scores ``[N, classes]`` as a numpy array.

    ``images`` as ``model.Classifier`` takes them (uint8 or float, [N,28,28], [N,1,28,28] or [N,784]), also as a
    pandas DataFrame of [N,784] pixels; a served JSON ``{"inputs": ...}`` arrives as a numpy array.
    """

    def __init__(self, classifier: model.Classifier):
        self.classifier = classifier

    def predict(self, data, params: dict[str, Any] | None = None) -> np.ndarray:
        if hasattr(data, "to_numpy"):  # a pandas DataFrame: one row of pixels per image
            data = data.to_numpy()
        if isinstance(data, list):
            data = np.asarray(data)
        with torch.no_grad():
            return self.classifier(data).float().numpy()

    def get_raw_model(self) -> model.Classifier:
        return self.classifier


def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> PyfuncClassifier:
    """MLflow's entry point (the python_function flavor's loader_module): ``data_path`` is the model's data/."""
    return PyfuncClassifier(load(data_path))
