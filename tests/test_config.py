"""The config tree through Hydra's compose API: every preset composes, and bad values are refused."""

from __future__ import annotations

import dataclasses
import os

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf.errors import ValidationError

from conftest import REPO
from mnist_sweep import cli, config, model

CONF = REPO / "conf"
GROUPS = ["model", "optimizer", "scheduler", "data", "device", "trainer", "mlflow"]


def _compose(*overrides):
    config.register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_defaults_compose_and_check():
    cfg = _compose()
    settings = config.check(cfg)
    assert settings.model.hidden == 256 and settings.model.depth == 2
    assert settings.data.batch_size == 256 and settings.data.val_size == 5000
    assert cfg.mlflow.tracking_uri == "sqlite:///mlruns/mlflow.db"


def test_output_folders_end_in_the_process_id():
    """Runs started in the same second get different folders (the end-to-end check: test_end_to_end.py)."""
    config.register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True)
    assert cfg.hydra.run.dir.startswith("outputs/") and cfg.hydra.run.dir.endswith(f"-{os.getpid()}")
    assert cfg.hydra.sweep.dir.startswith("outputs/multirun/") and cfg.hydra.sweep.dir.endswith(f"-{os.getpid()}")


@pytest.mark.parametrize("override", [f"{g}={p.stem}" for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))])
def test_every_preset_composes_and_instantiates(override):
    import torch

    cfg = _compose(override)
    settings = config.check(cfg)
    net = model.MLP(
        hidden=settings.model.hidden,
        depth=settings.model.depth,
        activation=settings.model.activation,
        dropout=settings.model.dropout,
        norm=settings.model.norm,
        input_dropout=settings.model.input_dropout,
    )
    optimizer = instantiate(cfg.optimizer, _convert_="all")(net.parameters())
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert optimizer.param_groups[0]["lr"] == cfg.optimizer.lr


def test_optimizer_presets_build_the_right_class():
    import torch

    for name, cls in (("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)):
        cfg = _compose(f"optimizer={name}", "optimizer.lr=0.01")
        opt = instantiate(cfg.optimizer, _convert_="all")(torch.nn.Linear(2, 2).parameters())
        assert type(opt) is cls and opt.param_groups[0]["lr"] == 0.01


def test_wrong_types_and_unknown_keys_are_rejected_while_composing():
    with pytest.raises(ConfigCompositionException, match="model.hidden=abc") as info:
        _compose("model.hidden=abc")
    assert isinstance(info.value.__cause__, ValidationError)
    assert "model.hidden" in cli.explain(info.value)
    with pytest.raises(ConfigCompositionException, match="Could not override 'model.hiden'"):
        _compose("model.hiden=3")
    with pytest.raises(ConfigCompositionException, match="Could not override 'optimizer.momentum'"):
        _compose("optimizer.momentum=0.5")  # adam has no momentum; its schema says so


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.hidden=0", "model.hidden=0"),
        ("model.depth=-1", "model.depth=-1"),
        ("model.activation=swish2", "model.activation"),
        ("data.batch_size=0", "data.batch_size=0"),
        ("data.val_size=60000", "data.val_size"),
        ("optimizer.lr=-1", "optimizer.lr"),
        ("trainer.epochs=0", "trainer.epochs"),
        ("trainer.precision=fp8", "trainer.precision"),
        ("device.type=tpu", "device"),
        ("model.input_dropout=1", "model.input_dropout"),
        ("model.members=0", "model.members=0"),
        ("mlflow.sweep_models=some", "mlflow.sweep_models"),
    ],
)
def test_out_of_range_values_are_rejected_before_any_work(override, message):
    with pytest.raises(config.ConfigError, match=message):
        config.check(_compose(override))


def test_missing_option_lists_the_choices():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="Could not find 'optimizer/lion'") as info:
        _compose("optimizer=lion")
    assert cli.explain(info.value) == (
        "optimizer=lion does not exist; choose one of: adam, adamw, sgd (e.g. optimizer=adam)"
    )


def test_config_hash_ignores_where_things_go_but_not_what_is_computed():
    base = config.config_hash(_compose())
    assert config.config_hash(_compose("data.root=/elsewhere", "mlflow.experiment=x")) == base
    assert config.config_hash(_compose("model.hidden=128")) != base
    assert config.config_hash(_compose("seed=1")) != base


def test_best_presets_compose_with_their_recipes():
    best = config.check(_compose("experiment=best"))
    assert (best.model.hidden, best.model.depth, best.model.input_dropout, best.model.dropout) == (2048, 2, 0.2, 0.5)
    assert best.data.augment.strength == 0 and best.trainer.precision == "auto" and best.data.deskew
    aug = config.check(_compose("experiment=best_aug"))
    assert best.model.members == 3 and aug.model.members == 1  # best votes with 3 nets; best_aug trains one
    assert aug.data.augment.strength > 0 and aug.data.deskew  # deskewed, then distorted
    assert aug.data.augment.shift == aug.data.augment.shear == 0  # deskewing already centred and straightened
    assert aug.data.augment.rotate > 0 and aug.data.augment.elastic_alpha > 0
    assert aug.model.hidden == best.model.hidden  # the same net...
    assert best.model.norm == "none" and aug.model.norm == "batch"  # ...with batch norm, which won under augmentation
    assert _compose("experiment=best_aug").optimizer._target_ == "torch.optim.AdamW"
    refit = config.check(_compose("experiment=best_aug_refit"))
    assert refit.data.val_size == 0 and aug.data.val_size == 5000  # all 60,000, after the choice on 55,000
    assert dataclasses.replace(refit.data, val_size=5000) == aug.data
    assert (refit.model, refit.trainer) == (aug.model, aug.trainer)


@pytest.mark.parametrize("override", ["trainer.patience=3", "optuna.study=s"])
def test_what_chooses_by_val_acc_needs_a_validation_split(override):
    config.check(_compose(override))  # fine with the default 5,000 validation images
    with pytest.raises(config.ConfigError, match=rf"{override.split('=')[0]}=\S+ is invalid: .*data.val_size=0"):
        config.check(_compose(override, "data.val_size=0"))
