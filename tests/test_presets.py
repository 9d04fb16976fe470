"""Presets cannot rot: every conf/experiment/*.yaml composes, passes the schema and runs one tiny epoch.

The folder is globbed, so a new preset is covered by being there. The runs are real `python train.py` commands on
synthetic IDX files (tests/conftest.py make_dataset) with as many validation images as the real split (5,000) and
120 training images, so no preset needs its data settings changed. Only what makes a run tiny is overridden: one
epoch, 32 units per hidden layer, no logged model. Whatever else a preset sets (ensembles, batch norm, deskewing,
augmentation, bf16, schedules, loaders, no validation split) runs as the preset has it.

- A plain preset runs in one `-m experiment=A,B,...` sweep (one trial each), so that Python, torch and MLflow
  start once.
- A grid (hydra.sweeper.params) runs with `-m experiment=NAME`: its key with the fewest values keeps the preset's
  grid, the others are fixed to their first value.
- A search (hydra/sweeper=optuna) runs 2 trials, its study and the best-config preset in temporary folders.
"""

from __future__ import annotations

import math

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from mlflow import MlflowClient
from omegaconf import OmegaConf

from conftest import REPO, make_dataset, train_py
from mnist_sweep import config, sweep

CONF = REPO / "conf"
PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
TINY = {"trainer.epochs": "1", "model.hidden": "32", "mlflow.log_model": "false"}


def _compose(*overrides: str, hydra: bool = False):
    config.register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra)


def _leaves(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        return {k: v for key, child in node.items() for k, v in _leaves(child, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def _task_settings(cfg) -> dict:
    """The task's settings by dotted key (``model.hidden``), resolved; Hydra's own node left out."""
    task = {k: cfg[k] for k in cfg if k != "hydra"}
    plain = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v for k, v in task.items()}
    return _leaves(plain)


def _sweeper(name: str):
    """(kind, the sweeper's config): kind is "search" (Optuna), "grid" (the basic sweeper with params), "plain",
    or "broken" (it does not compose: test_preset_composes_and_passes_the_schema says why)."""
    try:
        hydra = _compose(f"experiment={name}", hydra=True).hydra
    except Exception:
        return "broken", None
    if hydra.runtime.choices.get("hydra/sweeper") == "optuna":
        return "search", hydra.sweeper
    return ("grid" if hydra.sweeper.get("params") else "plain"), hydra.sweeper


KINDS = {name: _sweeper(name) for name in PRESETS}
PLAIN = [n for n in PRESETS if KINDS[n][0] == "plain"]
GRIDS = [n for n in PRESETS if KINDS[n][0] == "grid"]
SEARCHES = [n for n in PRESETS if KINDS[n][0] == "search"]


def _values(key: str, sweep: str) -> list[str]:
    """The values of a basic-sweeper expression (``sgd,adam``), as Hydra reads them."""
    (override,) = OverridesParser.create().parse_overrides([f"{key}={sweep}"])
    return list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Where the data is, as overrides: 5,120 synthetic training images (5,000 go to validation) and 40 test."""
    folder = tmp_path_factory.mktemp("presets")
    make_dataset(folder / "data", n_train=5120, n_test=40)
    where = {
        "data.root": str(folder / "data"),
        "data.cache_dir": str(folder / "cache"),
        "data.download": "false",
        "data.verify": "false",  # synthetic files: not the published checksums
    }
    return where


def _overrides(settings: dict[str, str], params: dict) -> list[str]:
    """``settings`` as overrides, leaving out the keys a preset sweeps or searches over."""
    return [f"{k}={v}" for k, v in settings.items() if k not in params]


def _runs(workdir):
    client = MlflowClient(f"sqlite:///{workdir}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("mnist-sweep")
    runs = client.search_runs([exp.experiment_id], max_results=1000) if exp else []
    trials = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, trials


def test_the_folder_holds_presets_of_every_kind():
    assert PLAIN and GRIDS and SEARCHES, KINDS  # so that each test below has something to run


@pytest.mark.parametrize("name", PRESETS)
def test_preset_composes_and_passes_the_schema(name):
    settings = config.check(_compose(f"experiment={name}"))
    kind, sweeper = KINDS[name]
    if kind == "grid":  # every value of the grid is a valid setting too
        for key, sweep in sweeper.params.items():
            for value in _values(key, sweep):
                config.check(_compose(f"experiment={name}", f"{key}={value}"))
    if kind == "search":
        assert settings.data.val_size > 0  # a search maximises val/acc


@pytest.fixture(scope="module")
def plain_sweep(tmp_path_factory, synthetic):
    """All plain presets in one sweep, one trial each: (workdir, the command's result)."""
    workdir = tmp_path_factory.mktemp("plain")
    proc = train_py("-m", f"experiment={','.join(PLAIN)}", *_overrides({**TINY, **synthetic}, {}), cwd=workdir)
    return workdir, proc


@pytest.mark.parametrize("name", PLAIN)
def test_plain_preset_runs_one_tiny_epoch_as_it_is_set(name, plain_sweep, synthetic):
    workdir, proc = plain_sweep
    client, trials = _runs(workdir)
    mine = [t for t in trials if t.data.params.get("choice.experiment") == name]
    assert len(mine) == 1, proc.stderr[-3000:]
    (run,) = mine
    assert run.info.status == "FINISHED", f"{run.data.tags.get('error')}\n{proc.stderr[-3000:]}"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1]
    assert math.isfinite(run.data.metrics["test/acc"])
    # What the preset sets (its difference from the defaults: values and group picks) is what the run used, the
    # tiny overrides aside. Hydra's own keys (optimizer._target_) show as the group pick (choice.optimizer); the
    # schema's and hydra/'s groups are not the task's.
    tiny = {*TINY, *synthetic}
    preset, default = _compose(f"experiment={name}", hydra=True), _compose(hydra=True)
    own = {
        k: v
        for k, v in _task_settings(preset).items()
        if _task_settings(default).get(k) != v and k not in tiny and not k.rsplit(".", 1)[-1].startswith("_")
    }
    own |= {
        sweep.GROUP_PARAMS.get(group, f"choice.{group}"): pick
        for group, pick in preset.hydra.runtime.choices.items()
        if "/" not in group and group != "experiment" and default.hydra.runtime.choices.get(group) != pick
    }
    assert own, f"experiment={name} changes nothing"
    logged = {k: run.data.params.get(k) for k in own}
    assert logged == {k: str(v) for k, v in own.items()}


@pytest.mark.parametrize("name", GRIDS)
def test_grid_preset_runs_its_smallest_axis(name, tmp_path, synthetic):
    params = KINDS[name][1].params
    grid = {key: _values(key, sweep) for key, sweep in params.items()}
    kept = min(grid, key=lambda k: len(grid[k]))  # the preset's own values, swept
    fixed = [f"{k}={values[0]}" for k, values in grid.items() if k != kept]
    proc = train_py("-m", f"experiment={name}", *fixed, *_overrides({**TINY, **synthetic}, params), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, trials = _runs(tmp_path)
    assert all(t.info.status == "FINISHED" for t in trials)
    param = kept if kept not in sweep.GROUP_PARAMS else sweep.GROUP_PARAMS[kept]  # a group: its option's name
    swept = sorted(yaml.safe_load(t.data.params.get(param, t.data.params.get(f"choice.{kept}"))) for t in trials)
    assert swept == sorted(yaml.safe_load(v) for v in grid[kept]), (kept, swept)


@pytest.mark.parametrize("name", SEARCHES)
def test_search_preset_runs_two_trials_and_writes_a_preset_that_composes(name, tmp_path, synthetic):
    sweeper = KINDS[name][1]
    params = sweeper.get("params") or {}
    extra = tmp_path / "written"  # the best config goes to extra/experiment/, not into conf/experiment/
    writes = sweeper.get("best_preset") is not None  # a Pareto search has a front, not one config to write
    preset = [f"hydra.sweeper.preset_dir={extra / 'experiment'}", "hydra.sweeper.best_preset=found"] if writes else []
    proc = train_py(
        "-m",
        f"experiment={name}",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweeper.storage=sqlite:///{tmp_path}/optuna.db",
        *preset,
        *_overrides({**TINY, **synthetic}, params),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, trials = _runs(tmp_path)
    searched = [t for t in trials if t.data.params.get("trainer.test") == "False"]
    tested = [t for t in trials if t.data.params.get("trainer.test") == "True"]
    assert len(searched) == 2 and len(tested) == int(sweeper.test_best), [t.info.run_name for t in trials]
    assert all(t.info.status == "FINISHED" for t in trials)
    assert (tmp_path / "optuna.db").exists()
    if not writes:
        assert not extra.exists()
        return
    written = extra / "experiment" / "found.yaml"
    assert written.exists(), proc.stderr[-3000:]
    config.register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        found = compose(config_name="config", overrides=[f"hydra.searchpath=[file://{extra}]", "experiment=found"])
    config.check(found)
