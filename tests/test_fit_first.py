"""Fit before compute: configs that cannot run are refused in one line before anything is built."""

import pytest
import torch

from conftest import make_dataset, train_py
from mnist_sweep import training

GB = 1024**3


def _estimate(**overrides):
    args = dict(hidden=256, depth=2, members=1, num_classes=10, batch_size=256, eval_batch_size=1000)
    args.update(optimizer="adam", dataset_on_device=True)
    args.update(overrides)
    return training.memory_estimate(**args)


def test_the_estimate_counts_the_weights_exactly_and_grows_with_the_config():
    from mnist_sweep import model

    for hidden, depth, members in ((256, 2, 1), (64, 0, 1), (128, 3, 3)):
        net = model.build(hidden=hidden, depth=depth, members=members, norm="batch")
        estimate = _estimate(hidden=hidden, depth=depth, members=members)
        assert estimate["weights"] == 4 * model.count_params(net)
    assert _estimate(optimizer="sgd")["optimizer state"] == _estimate()["weights"]
    assert _estimate(optimizer="adam")["optimizer state"] == 2 * _estimate()["weights"]
    assert _estimate(batch_size=512)["activations"] > _estimate()["activations"]
    assert _estimate(dataset_on_device=False)["dataset"] == 0


def test_what_does_not_fit_is_refused_with_the_estimate():
    cpu = torch.device("cpu")
    small = _estimate()
    training.check_fits(small, cpu, available=8 * GB)  # the default net: about 0.3 GB
    huge = _estimate(hidden=60000)
    assert sum(huge.values()) > 50 * GB
    with pytest.raises(training.TooLargeError, match=r"needs about \d+\.\d GB \(.*\) and cpu has 24\.0 GB available"):
        training.check_fits(huge, cpu, available=24 * GB)


def test_train_py_refuses_a_net_or_a_batch_too_large_before_building_anything(tmp_path):
    make_dataset(tmp_path / "data")
    common = (f"data.root={tmp_path / 'data'}", "data.verify=false", f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db")
    done = train_py(*common, "model.hidden=10000000", cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: this config needs about ") and "lower model.hidden" in line
    done = train_py(*common, "data.batch_size=100000000", cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: data.batch_size=100000000 is larger than the training split (55000 images): every epoch would be "
        "one step; use at most data.batch_size=55000 (e.g. data.batch_size=256)"
    ]
