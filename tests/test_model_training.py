"""The model and the training loop, on tiny synthetic data (seconds, no MLflow)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import tiny_fit, tiny_loaders
from mnist_sweep import data, model, training


@pytest.mark.parametrize("depth", [0, 1, 3])
@pytest.mark.parametrize("activation", sorted(model.ACTIVATIONS))
def test_mlp_depth_and_width_are_what_was_asked(depth, activation):
    net = model.MLP(hidden=32, depth=depth, activation=activation, dropout=0.1, norm="layer")
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == depth + 1
    assert linears[0].in_features == 784 and linears[-1].out_features == 10
    assert all(m.out_features == 32 for m in linears[:-1])
    assert net(torch.randn(5, 1, 28, 28)).shape == (5, 10)


def test_input_dropout_drops_pixels_in_training_only():
    torch.manual_seed(0)
    net = model.MLP(hidden=16, depth=1, input_dropout=0.5)
    assert isinstance(net.net[1], torch.nn.Dropout) and net.net[1].p == 0.5  # right after Flatten
    x = torch.ones(4, 1, 28, 28)
    net.train()
    dropped = net.net[1](net.net[0](x))
    assert 0.3 < (dropped == 0).float().mean() < 0.7
    net.eval()
    assert torch.equal(net.net[1](net.net[0](x)), x.flatten(1))
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.MLP(hidden=16, depth=1).modules())


def test_mlp_rejects_unknown_names():
    with pytest.raises(ValueError, match="activation"):
        model.MLP(activation="sigmoidish")
    with pytest.raises(ValueError, match="norm"):
        model.MLP(norm="group")


@pytest.mark.parametrize("deskew", [False, True, None])  # None: a checkpoint from before data.deskew existed
def test_checkpoint_roundtrip_gives_the_same_predictions(tmp_path, deskew):
    net = model.MLP(hidden=16, depth=2)
    ckpt = {
        "model_args": {"hidden": 16, "depth": 2},
        "mean": 0.1307,
        "std": 0.3081,
        "classes": list("0123456789"),
        "state_dict": net.state_dict(),
    }
    if deskew is not None:
        ckpt["deskew"] = deskew
    torch.save(ckpt, tmp_path / "model.pt")
    images = torch.rand(3, 1, 28, 28) ** 4
    expected = model.Classifier(net, 0.1307, 0.3081, bool(deskew)).eval()(images)
    torch.testing.assert_close(model.load_checkpoint(tmp_path / "model.pt")(images), expected)
    # The exported model does the training preprocessing itself: deskew (when trained so), then Normalize.
    seen = data.deskew(images) if deskew else images
    torch.testing.assert_close(expected, net.eval()((seen - 0.1307) / 0.3081))


def test_ensemble_returns_each_member_in_training_and_their_mean_vote_in_evaluation():
    torch.manual_seed(0)
    assert type(model.build(hidden=16, depth=1)) is model.MLP  # one member: the plain net, its keys unchanged
    ens = model.build(members=3, hidden=16, depth=1)
    assert isinstance(ens, model.Ensemble) and len(ens.members) == 3
    x = torch.randn(5, 1, 28, 28)
    scores = ens.train()(x)
    assert scores.shape == (3, 5, 10)
    assert not torch.equal(scores[0], scores[1])  # each member starts from its own random weights
    mean_probs = torch.stack([m(x).softmax(-1) for m in ens.members]).mean(0)
    voted = ens.eval()(x)
    assert voted.shape == (5, 10)
    torch.testing.assert_close(voted.exp(), mean_probs)
    with pytest.raises(ValueError, match="2 or more"):
        model.Ensemble(1, hidden=16)


def test_ensemble_members_learn_as_if_each_trained_alone(tiny_data, tmp_path):
    """One SGD step of a 2-net ensemble moves each member exactly as that net's own step would."""
    loaders = tiny_loaders(tiny_data[0], tmp_path, batch_size=100)  # all 80 training images: one step
    assert len(loaders.train) == 1
    torch.manual_seed(0)
    ens = model.build(members=2, hidden=16, depth=1)
    alone = [copy.deepcopy(m) for m in ens.members]
    sgd = dict(lr=0.1, momentum=0.0)
    fit = dict(epochs=1, device=torch.device("cpu"), label_smoothing=0.1)
    training.fit(ens, loaders.train, loaders.val, torch.optim.SGD(ens.parameters(), **sgd), **fit)
    for net in alone:
        training.fit(net, loaders.train, loaders.val, torch.optim.SGD(net.parameters(), **sgd), **fit)
    for member, net in zip(ens.members, alone, strict=True):
        for a, b in zip(member.parameters(), net.parameters(), strict=True):
            torch.testing.assert_close(a, b)


def test_ensemble_checkpoint_roundtrip(tmp_path):
    ens = model.build(members=2, hidden=16, depth=1)
    ckpt = {"model_args": {"hidden": 16, "depth": 1, "members": 2}, "mean": 0.1307, "std": 0.3081}
    torch.save({**ckpt, "state_dict": ens.state_dict()}, tmp_path / "model.pt")
    images = torch.rand(3, 1, 28, 28)
    expected = model.Classifier(ens, 0.1307, 0.3081).eval()(images)
    torch.testing.assert_close(model.load_checkpoint(tmp_path / "model.pt")(images), expected)


@pytest.mark.parametrize(
    ("warmup", "start", "decay", "final", "points"),
    [
        (0.0, 1.0, "none", 1.0, {0: 1.0, 50: 1.0, 99: 1.0}),
        (0.0, 1.0, "cosine", 0.0, {0: 1.0, 99: 0.0}),
        (0.25, 0.04, "cosine", 0.0, {0: 0.04, 25: 1.0, 99: 0.0}),
        (0.0, 1.0, "linear", 0.1, {0: 1.0, 99: 0.1}),
    ],
)
def test_lr_schedules(warmup, start, decay, final, points):
    for step, value in points.items():
        assert math.isclose(training.lr_multiplier(step, 100, warmup, start, decay, final), value, abs_tol=1e-9)


def test_resolve_device():
    assert training.resolve_device("cpu") == torch.device("cpu")
    assert training.resolve_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(training.DeviceError, match="no usable CUDA"):
            training.resolve_device("cuda")


def test_fit_learns_and_reports_every_epoch(tiny_data, tmp_path):
    result, test, seen = tiny_fit(tiny_data[0], tmp_path, epochs=4)
    assert [e.epoch for e in seen] == [1, 2, 3, 4]
    assert seen[-1].train_loss < seen[0].train_loss
    assert test.acc > 0.5  # 10 classes: chance is 0.1
    assert int(test.confusion.sum()) == 40
    assert set(seen[0].metrics()) >= {"train/loss", "train/acc", "val/loss", "val/acc", "lr", "train/samples_per_s"}


def test_same_seed_same_metrics_other_seed_other_metrics(tiny_data, tmp_path):
    a = tiny_fit(tiny_data[0], tmp_path, seed=1)[2]
    b = tiny_fit(tiny_data[0], tmp_path, seed=1)[2]
    c = tiny_fit(tiny_data[0], tmp_path, seed=2)[2]
    assert [e.train_loss for e in a] == [e.train_loss for e in b]
    assert [e.val_acc for e in a] == [e.val_acc for e in b]
    assert [e.train_loss for e in a] != [e.train_loss for e in c]


def test_bf16_stays_close_to_fp32(tiny_data, tmp_path):
    fp32 = tiny_fit(tiny_data[0], tmp_path, epochs=4)[1]
    bf16 = tiny_fit(tiny_data[0], tmp_path, epochs=4, precision="bf16")[1]
    assert abs(fp32.acc - bf16.acc) <= 0.1  # stated tolerance on 40 test images: 4 images
    assert abs(fp32.loss - bf16.loss) <= 0.25


def test_diverging_loss_stops_at_once(tiny_data, tmp_path):
    with pytest.raises(training.DivergedError, match="diverged.*step 1"):
        tiny_fit(tiny_data[0], tmp_path, lr=1e6, max_loss=1e-6)
    with pytest.raises(training.DivergedError, match="lower optimizer.lr"):
        tiny_fit(tiny_data[0], tmp_path, lr=1e6)


def _batches(nan_in_first: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Three batches of 10 random images; with ``nan_in_first``, one pixel of the first batch is NaN."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 1, 28, 28, generator=g), torch.randint(0, 10, (30,), generator=g)
    if nan_in_first:
        x[0, 0, 0, 0] = float("nan")
    return [(x[i : i + 10], y[i : i + 10]) for i in range(0, 30, 10)]


def test_a_nan_weight_stops_training_at_the_first_step():
    """A real NaN loss (not a large finite one, as lr=1e6 gives) stops the run: `not loss <= limit` catches it."""
    torch.manual_seed(0)
    net = model.MLP(hidden=16, depth=1)
    with torch.no_grad():
        net.net[-1].weight[3, 5] = float("nan")
    cpu = torch.device("cpu")
    with pytest.raises(training.DivergedError, match=r"^training diverged: loss nan at epoch 1, step 1 "):
        training.fit(net, _batches(False), [], torch.optim.Adam(net.parameters()), epochs=1, device=cpu, max_loss=0)


def test_a_nan_between_two_looks_at_the_loss_is_not_forgotten():
    """With the host looking only every 3 steps (as on a GPU), a NaN at step 1 followed by finite losses still
    stops the run at the next look. The optimiser holds none of the net's weights, so they stay finite and the
    later losses are finite: only the kept worst loss remembers the NaN."""
    cpu = torch.device("cpu")

    def fit(batches):
        torch.manual_seed(0)
        net = model.MLP(hidden=16, depth=1)
        idle = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)  # never touches the net
        return training.fit(net, batches, [], idle, epochs=1, device=cpu, check_every=3)

    assert math.isfinite(fit(_batches(False)).epochs[0].train_loss)  # the same run without the NaN trains
    with pytest.raises(training.DivergedError, match=r"^training diverged: loss nan at epoch 1, step 3 "):
        fit(_batches(True))


def test_early_stopping_keeps_the_best_epoch(tiny_data, tmp_path):
    result, _, seen = tiny_fit(tiny_data[0], tmp_path, epochs=30, patience=2, lr=1e-2)
    assert len(seen) < 30  # stopped early
    best = max(e.val_acc for e in seen)
    assert result.val_acc == best
    assert seen[result.best_epoch - 1].val_acc == best


def test_augmentation_touches_training_batches_only(tiny_data, tmp_path):
    calls = []

    def augment(x):
        calls.append(x.shape[0])
        return x + 0.01 * torch.randn_like(x)

    loaders = tiny_loaders(tiny_data[0], tmp_path, eval_batch_size=50)
    net = model.MLP(hidden=16, depth=1)
    training.fit(
        net,
        loaders.train,
        loaders.val,
        torch.optim.Adam(net.parameters()),
        epochs=2,
        device=torch.device("cpu"),
        augment=augment,
    )
    assert sum(calls) == 2 * loaders.n_train  # every training image, every epoch; no validation image
    training.evaluate(net, loaders.test, torch.device("cpu"))
    assert sum(calls) == 2 * loaders.n_train


def test_on_epoch_can_stop_training(tiny_data, tmp_path):
    loaders = tiny_loaders(tiny_data[0], tmp_path)
    net = model.MLP(hidden=16, depth=1)
    result = training.fit(
        net,
        loaders.train,
        loaders.val,
        torch.optim.Adam(net.parameters()),
        epochs=10,
        device=torch.device("cpu"),
        on_epoch=lambda er: er.epoch == 3,
    )
    assert [e.epoch for e in result.epochs] == [1, 2, 3] and result.best_epoch == 3


@pytest.mark.parametrize("preset", ["SGDConfig", "AdamConfig", "AdamWConfig"])
def test_the_optimizer_steps_exactly_as_torchs(preset):
    """``build_optimizer`` peels off torch.compile's guards only: from the same start, each preset's optimizer
    and torch's own class reach the same weights bit for bit, and their state dicts load into each other."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from mnist_sweep import config

    make = instantiate(OmegaConf.structured(getattr(config, preset)), _convert_="all")
    torch.manual_seed(0)
    nets = [model.build(hidden=32, depth=1)]
    nets.append(copy.deepcopy(nets[0]))
    ours, theirs = training.build_optimizer(make, nets[0].parameters()), make(nets[1].parameters())
    assert type(ours).__mro__[1] is type(theirs) and type(ours) is not type(theirs)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    for _ in range(4):
        for net, opt in zip(nets, (ours, theirs), strict=True):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        assert torch.equal(a, b)
    assert not any(p.grad is None or p.grad.requires_grad for p in nets[0].parameters())
    state = ours.state_dict()
    assert str(state) == str(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(state)


def test_building_and_stepping_the_optimizer_imports_no_dynamo():
    """torch.optim imports torch._dynamo (about 1 s) when an optimizer is built, steps or zeroes its gradients;
    the optimizer ``build_optimizer`` makes does not. Torch's own class, last, shows the check can fail."""
    import subprocess
    import sys

    script = (
        "import functools, sys, torch\n"
        "from mnist_sweep import training\n"
        "net = torch.nn.Linear(4, 2)\n"
        "opt = training.build_optimizer(functools.partial(torch.optim.Adam, lr=0.1), net.parameters())\n"
        "net(torch.ones(1, 4)).sum().backward(); opt.step(); opt.zero_grad(); opt.load_state_dict(opt.state_dict())\n"
        "print('ours', 'torch._dynamo' in sys.modules)\n"
        "torch.optim.Adam(net.parameters(), lr=0.1)\n"
        "print('torch', 'torch._dynamo' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ours", "False", "torch", "True"]
