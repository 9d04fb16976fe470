"""The speed work: the speedrun preset and the training loop's GPU-style code path.

Behaviour only: no test asserts a wall-clock time (timings belong in docs/BENCHMARKS.md, from benchmarks/speed.py).
"""

from __future__ import annotations

import math

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import REPO, tiny_fit
from mnist_sweep import config, training


def _settings(overrides: list[str]) -> config.Config:
    config.register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return config.check(compose(config_name="config", overrides=overrides))


def test_speedrun_preset_composes_with_its_recipe():
    s = _settings(["experiment=speedrun"])
    assert (s.model.hidden, s.model.depth) == (256, 2)
    assert s.data.batch_size == 512 and s.data.loader == "tensor"
    assert s.trainer.precision == "auto" and s.trainer.epochs == 4 and s.trainer.label_smoothing == 0.1
    assert s.optimizer.lr == pytest.approx(5e-3) and s.scheduler.warmup > 0
    # Command-line overrides still win over the recipe.
    s2 = _settings(["experiment=speedrun", "trainer.precision=fp32", "data.batch_size=256"])
    assert s2.trainer.precision == "fp32" and s2.data.batch_size == 256


def _fit(root, cache, **fit_args):
    """(epochs, test metrics) of a 2-layer tiny net on the GPU recipe's cosine schedule."""

    def schedule(step, total):
        return training.lr_multiplier(step, total, 0.25, 0.04, "cosine", 0.0)

    _, test, seen = tiny_fit(root, cache, depth=2, schedule=schedule, **fit_args)
    return seen, test


def test_gpu_style_loop_gives_the_same_metrics_as_the_cpu_loop(tiny_data, tmp_path):
    """The GPU's loop looks at the loss only every 50 steps; apart from that it is the CPU's loop."""
    every_step, _ = _fit(tiny_data[0], tmp_path, check_every=1)
    rarely, _ = _fit(tiny_data[0], tmp_path, check_every=50)
    assert [(e.train_loss, e.val_acc) for e in every_step] == [(e.train_loss, e.val_acc) for e in rarely]


def test_gpu_style_loop_still_stops_a_diverging_run(tiny_data, tmp_path):
    # A loss above max_loss at any step is remembered on the device until the host looks.
    with pytest.raises(training.DivergedError, match="diverged"):
        _fit(tiny_data[0], tmp_path, check_every=50, lr=1e6)


def test_speedrun_recipe_is_deterministic_in_bf16(tiny_data, tmp_path):
    """bf16 autocast and label smoothing (the speedrun's recipe): same seed, same metrics."""
    a, ta = _fit(tiny_data[0], tmp_path, precision="bf16", label_smoothing=0.1, seed=3)
    b, tb = _fit(tiny_data[0], tmp_path, precision="bf16", label_smoothing=0.1, seed=3)
    assert [(e.train_loss, e.val_loss) for e in a] == [(e.train_loss, e.val_loss) for e in b]
    assert (ta.loss, ta.acc) == (tb.loss, tb.acc)
    assert all(math.isfinite(e.train_loss) for e in a)


def test_speedrun_recipe_bf16_within_tolerance_of_fp32(tiny_data, tmp_path):
    # Stated tolerance on the 40 synthetic test images: 4 images (0.1) of accuracy, 0.25 of loss.
    _, fp32 = _fit(tiny_data[0], tmp_path, label_smoothing=0.1, epochs=4)
    _, bf16 = _fit(tiny_data[0], tmp_path, precision="bf16", label_smoothing=0.1, epochs=4)
    assert abs(fp32.acc - bf16.acc) <= 0.1
    assert abs(fp32.loss - bf16.loss) <= 0.25
