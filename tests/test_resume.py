"""Preemption-safe runs: an interrupted run goes on from its last epoch, in the same MLflow run, and ends exactly
as an uninterrupted run with the same seed ends."""

import signal

import mlflow
import pytest
import torch

from conftest import make_dataset, start_train_py, tiny_loaders, train_py
from mnist_sweep import model, training


def _fit(root, cache, epochs, *, stop_after=None, resume=None, saved=None, augment=None):
    """A tiny dropout net for ``epochs``; ``stop_after``: interrupted (KeyboardInterrupt) after that epoch."""
    torch.manual_seed(0)
    loaders = tiny_loaders(root, cache, seed=0)
    order = loaders.train.generator
    net = model.MLP(hidden=32, depth=1, dropout=0.3)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    if resume is not None:
        order.set_state(resume["order"])

    def checkpoint(snapshot):
        saved.append(torch.load(_bytes({**snapshot, "order": order.get_state()}), weights_only=True))

    def on_epoch(er):
        if er.epoch == stop_after:
            raise KeyboardInterrupt

    result = training.fit(
        net,
        loaders.train,
        loaders.val,
        optimizer,
        epochs=epochs,
        device=torch.device("cpu"),
        schedule=lambda step, total: training.lr_multiplier(step, total, 0.25, 0.04, "cosine", 0.0),
        on_epoch=on_epoch,
        checkpoint=checkpoint if saved is not None else None,
        resume=resume,
        augment=augment,
    )
    return result, net


def _bytes(obj):
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)  # as the run writes it: a real round trip through torch.save / torch.load
    buffer.seek(0)
    return buffer


def test_a_resumed_fit_ends_exactly_as_an_uninterrupted_one(tiny_data, tmp_path):
    from mnist_sweep.augment import Augment

    root, cache = tiny_data[0], tmp_path / "cache"
    whole, net_whole = _fit(root, cache, 4, augment=Augment(rotate=10))
    saved = []
    with pytest.raises(KeyboardInterrupt):
        _fit(root, cache, 4, stop_after=2, saved=saved, augment=Augment(rotate=10))
    assert [s["epoch"] for s in saved] == [1, 2]  # saved before on_epoch was told: epoch 2 is in the state
    resumed, net_resumed = _fit(root, cache, 4, resume=saved[-1], augment=Augment(rotate=10))
    assert [e.epoch for e in resumed.epochs] == [1, 2, 3, 4]
    assert [e.train_loss for e in resumed.epochs] == [e.train_loss for e in whole.epochs]
    assert [e.val_acc for e in resumed.epochs] == [e.val_acc for e in whole.epochs]
    for a, b in zip(net_whole.state_dict().values(), net_resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # Without the random streams restored the continuation differs (dropout, augmentation, batch order):
    # the equality above is not an accident of a net that learns nothing.
    state = {**saved[-1], "rng": torch.Generator().manual_seed(99).get_state()}
    other, _ = _fit(root, cache, 4, resume=state, augment=Augment(rotate=10))
    assert [e.train_loss for e in other.epochs[2:]] != [e.train_loss for e in whole.epochs[2:]]


def _data(tmp_path):
    make_dataset(tmp_path / "data", n_train=600, n_test=60)
    store = f"sqlite:///{tmp_path}/mlflow.db"
    return (
        f"data.root={tmp_path / 'data'}",
        "data.verify=false",
        "data.download=false",
        "data.val_size=100",
        "data.batch_size=8",
        "model.hidden=64",
        "model.dropout=0.2",
        "device.threads=1",  # a run, a trial and their continuations: the same arithmetic on any machine
        f"mlflow.tracking_uri={store}",
        "mlflow.log_model=false",
    ), store


def _runs(store):
    mlflow.set_tracking_uri(store)
    return mlflow.search_runs(experiment_names=["mnist-sweep"], output_format="list")


def _history(store, run_id, key="val/acc"):
    return [
        (m.step, m.value) for m in sorted(mlflow.MlflowClient().get_metric_history(run_id, key), key=lambda m: m.step)
    ]


FINAL = ("best_epoch", "best_val/acc", "test/acc", "test/loss")


def _outcome(store, run) -> dict:
    """What a run ended with: each epoch's val/acc and train/loss, and its final metrics."""
    return {
        "val/acc": _history(store, run.info.run_id),
        "train/loss": _history(store, run.info.run_id, "train/loss"),
        **{key: run.data.metrics[key] for key in FINAL},
    }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """A 5-epoch run of ``_data``'s config that nobody interrupted: what a continued run must end with."""
    fresh = tmp_path_factory.mktemp("uninterrupted")
    overrides, store = _data(fresh)
    done = train_py(*overrides, "trainer.epochs=5", cwd=fresh)
    assert done.returncode == 0, done.stderr[-2000:]
    (whole,) = _runs(store)
    return _outcome(store, whole)


def test_a_killed_run_continues_by_its_run_id_in_the_same_mlflow_run(tmp_path, uninterrupted):
    overrides, store = _data(tmp_path)
    run = (*overrides, "trainer.epochs=5", "trainer.progress=false")
    child = start_train_py(*run, cwd=tmp_path)
    child.read_until(lambda line: "epoch 2/5" in line, 300)
    child.send_signal(signal.SIGTERM)
    child.finish(120)
    (killed,) = _runs(store)
    assert killed.info.status == "KILLED"
    done = train_py(f"resume={killed.info.run_id}", f"mlflow.tracking_uri={store}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from" in done.stderr + done.stdout
    (resumed,) = _runs(store)  # the same run, not a second one
    assert resumed.info.run_id == killed.info.run_id and resumed.info.status == "FINISHED"
    # Its page says how to get it again: the first command, not the resume.
    assert resumed.data.tags["command"] == "python train.py " + " ".join(run)
    assert resumed.data.tags["command"] in resumed.data.tags["mlflow.note.content"]
    history = _history(store, resumed.info.run_id)
    assert [step for step, _ in history] == [1, 2, 3, 4, 5]  # each epoch logged once
    assert _outcome(store, resumed) == uninterrupted  # the same numbers as never interrupted


def test_resume_of_an_unknown_or_finished_run_is_one_line(tmp_path):
    overrides, store = _data(tmp_path)
    done = train_py("resume=0123456789abcdef", f"mlflow.tracking_uri={store}", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: resume=0123456789abcdef: no such MLflow run in this store; copy the id from `mlflow ui`"
    ]
    assert train_py(*overrides, "trainer.epochs=1", cwd=tmp_path).returncode == 0
    (finished,) = _runs(store)
    done = train_py(f"resume={finished.info.run_id}", f"mlflow.tracking_uri={store}", cwd=tmp_path)
    assert done.returncode == 2 and "that run FINISHED; nothing to continue" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_relaunched_sweep_continues_its_interrupted_trial(tmp_path, uninterrupted):
    overrides, store = _data(tmp_path)
    sweep = ("-m", *overrides, "trainer.epochs=5", "model.hidden=64")
    child = start_train_py(*sweep, cwd=tmp_path)
    child.read_until(lambda line: "epoch 2/5" in line, 300)
    child.send_signal(signal.SIGINT)
    child.finish(120)
    trials = [r for r in _runs(store) if r.data.tags.get("mnist_sweep.role") != "sweep"]
    (killed,) = trials
    assert killed.info.status == "KILLED"
    done = train_py(*sweep, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    trials = [r for r in _runs(store) if r.data.tags.get("mnist_sweep.role") != "sweep"]
    (resumed,) = trials
    assert resumed.info.run_id == killed.info.run_id and resumed.info.status == "FINISHED"
    assert [step for step, _ in _history(store, resumed.info.run_id)] == [1, 2, 3, 4, 5]
    # It ends exactly as the same config, seed and thread count ends when never interrupted.
    assert _outcome(store, resumed) == uninterrupted


def _half_a_zip(obj, f, *args, **kwargs):
    f.write(b"PK\x03\x04 the first bytes of a state")  # torch.save's zip, cut short
    raise KeyboardInterrupt  # SIGTERM (a preemption, scancel) arrives as one, in the middle of the write


def _disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize(("where", "broken"), [("torch.save", _half_a_zip), ("os.fsync", _disk_full),
                                               ("os.replace", _disk_full)])  # fmt: skip
def test_a_save_that_fails_midway_leaves_the_last_state_whole(tmp_path, monkeypatch, where, broken):
    """The state saved at each epoch's end is written whole or not at all: a write that fails at any point
    leaves the previous state loadable and no temporary file behind."""
    import os
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from mnist_sweep import run, trial

    settings = SimpleNamespace(data=SimpleNamespace(root=str(tmp_path / "data")))
    ctx = SimpleNamespace(
        resume=None, out_dir=tmp_path, cfg=OmegaConf.create({"data": {"root": "data"}}), settings=settings
    )
    tags = {}
    save = run._saver(ctx, torch.Generator().manual_seed(0), SimpleNamespace(set_tags=tags.update))
    path = tmp_path / "resume.pt"
    assert tags == {trial.RESUME_STATE: str(path.resolve())}
    save({"epoch": 1, "weights": torch.ones(3)})

    module, name = where.split(".")
    monkeypatch.setattr({"torch": torch, "os": os}[module], name, broken)
    with pytest.raises((KeyboardInterrupt, OSError)):
        save({"epoch": 2, "weights": torch.zeros(3)})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resume.pt"]  # no stray temporary file
    state = run._load_state(path)
    assert state["epoch"] == 1 and torch.equal(state["weights"], torch.ones(3))
    assert state["config"] == {"data": {"root": str(tmp_path / "data")}}
    save({"epoch": 2, "weights": torch.zeros(3)})  # the next epoch's save works again
    assert run._load_state(path)["epoch"] == 2
