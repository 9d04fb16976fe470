"""The sweeper's settings: its schema, the ``hydra/sweeper/sampler`` group, and where ``hydra/sweeper=optuna`` is.

The keys and defaults are those of Hydra's own Optuna sweeper (hydra-optuna-sweeper), so its users' configs run
unchanged; the keys after ``custom_search_space`` are what this sweeper adds, each off by default. An app switches
them on in its own ``conf/hydra/sweeper/optuna.yaml``, which takes the place of the plugin's (this project's does).

Nothing here imports Optuna: Hydra imports every plugin module when any app starts. (No ``from __future__ import
annotations``: Hydra runs this module before it is in sys.modules, where dataclasses cannot resolve string
annotations.)
"""

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.config_store import ConfigStore
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import MISSING

PROVIDER = "mnist_sweep_optuna"
CONF = Path(__file__).resolve().parent / "conf"  # hydra/sweeper/optuna.yaml: the schema plus `sampler: tpe`


class Direction(Enum):
    minimize = 1
    maximize = 2


class DistributionType(Enum):
    int = 1
    float = 2
    categorical = 3


# ------------------------------------------------------------------------------------------------------------
# The samplers: hydra/sweeper/sampler=NAME, each key set as hydra.sweeper.sampler.KEY=VALUE
# ------------------------------------------------------------------------------------------------------------


@dataclass
class SamplerConfig:
    """How Optuna picks the next trial's parameters (``hydra/sweeper/sampler=tpe|random|cmaes|nsgaii|qmc|grid``)."""

    _target_: str = MISSING  # the Optuna sampler class
    seed: int | None = None  # the sampler's random seed: the same seed asks for the same parameters; null: random


@dataclass
class TPESamplerConfig(SamplerConfig):
    _target_: str = "optuna.samplers.TPESampler"
    n_startup_trials: int = 10
    n_ei_candidates: int = 24
    multivariate: bool = False


@dataclass
class RandomSamplerConfig(SamplerConfig):
    _target_: str = "optuna.samplers.RandomSampler"


@dataclass
class CmaEsSamplerConfig(SamplerConfig):
    _target_: str = "optuna.samplers.CmaEsSampler"
    x0: dict[str, Any] | None = None
    sigma0: float | None = None
    n_startup_trials: int = 1
    independent_sampler: Any = None
    warn_independent_sampling: bool = True
    consider_pruned_trials: bool = False
    restart_strategy: str | None = None
    inc_popsize: int = -1
    use_separable_cma: bool = False


@dataclass
class NSGAIISamplerConfig(SamplerConfig):
    _target_: str = "optuna.samplers.NSGAIISampler"
    population_size: int = 50
    mutation_prob: float | None = None
    crossover_prob: float = 0.9
    swapping_prob: float = 0.5
    constraints_func: Any = None


@dataclass
class MOTPESamplerConfig(SamplerConfig):
    """Kept so that configs naming it fail with a clear message: Optuna 4 removed MOTPESampler."""

    _target_: str = "hydra_plugins.mnist_sweep_optuna.config.motpe_removed"


@dataclass
class QMCSamplerConfig(SamplerConfig):
    _target_: str = "optuna.samplers.QMCSampler"
    qmc_type: str = "sobol"
    scramble: bool = False
    independent_sampler: Any = None
    warn_asynchronous_seeding: bool = True
    warn_independent_sampling: bool = True


@dataclass
class GridSamplerConfig(SamplerConfig):
    """Every combination of the discrete dimensions, once: the sweeper gives it the grid when the sweep starts."""

    _target_: str = "optuna.samplers.GridSampler"
    _partial_: bool = True


def motpe_removed(**_: Any) -> None:
    raise ValueError(
        "The 'motpe' sampler was removed in Optuna 4.0: hydra/sweeper/sampler=tpe handles several objectives "
        "(or nsgaii)"
    )


SAMPLERS = {
    "tpe": TPESamplerConfig,
    "random": RandomSamplerConfig,
    "cmaes": CmaEsSamplerConfig,
    "nsgaii": NSGAIISamplerConfig,
    "motpe": MOTPESamplerConfig,
    "qmc": QMCSamplerConfig,
    "grid": GridSamplerConfig,
}


# ------------------------------------------------------------------------------------------------------------
# The sweeper
# ------------------------------------------------------------------------------------------------------------


@dataclass
class OptunaSweeperConf:
    """Optuna asks for each trial's parameters and is told the value the task returns
    (hydra_plugins/mnist_sweep_optuna). The keys up to `custom_search_space` are hydra-optuna-sweeper's, with its
    defaults; the others are this sweeper's additions, off unless an app's conf/hydra/sweeper/optuna.yaml turns them
    on, as this project's does."""

    _target_: str = "hydra_plugins.mnist_sweep_optuna.optuna_sweeper.OptunaSweeper"  # the class Hydra instantiates
    sampler: SamplerConfig = MISSING  # chosen with hydra/sweeper/sampler=tpe|random|cmaes|nsgaii|qmc|grid
    # minimize or maximize the value the task returns; a list (one direction per value) for several objectives
    direction: Any = Direction.minimize
    storage: Any = None  # the study's database URL (sqlite:///optuna.db, postgresql://...); null: in memory
    study_name: str | None = None  # a study in `storage` with this name is continued; null: a new, random name
    n_trials: int = 20  # trials to run (with `resume`, counting those the study already ran)
    n_jobs: int = 2  # trials launched together (run side by side with a parallel launcher: hydra/launcher=joblib)
    # the share of the trials that may fail: once more fail, the first failure's error is raised
    max_failure_rate: float = 0.0
    search_space: dict[str, Any] | None = None  # deprecated: the search space as {key: {type, low, high, ...}}
    params: dict[str, str] | None = None  # key: sweep expression (choice(1,2), range(1,5), interval(0,1), ...)
    # dotted path of a function(cfg, trial) that suggests further parameters with Optuna's API
    custom_search_space: str | None = None

    # This sweeper's additions:

    pruner: str = "none"  # none | median | asha | hyperband: stop hopeless trials (the task reports each epoch)
    warmup_epochs: int = 1  # epochs every trial runs before it may be pruned
    startup_trials: int = 5  # trials that finish unpruned before pruning starts (median)
    resume: bool = False  # n_trials counts the study's finished trials; trials a killed launch left RUNNING rerun
    best_preset: str | None = None  # write the best trial's config as conf/experiment/<name>.yaml; null: don't
    preset_dir: str | None = None  # where that file goes; null: the experiment/ folder of the primary conf dir
    test_best: bool = False  # trials run with trainer.test=false; the best config runs once more with true
    # range(a,b) includes b, as in hydra-optuna-sweeper; false: it stops before b, as in Hydra's basic sweeper
    range_includes_stop: bool = True


class OptunaSearchPath(SearchPathPlugin):
    """Puts ``hydra/sweeper/optuna.yaml`` (the schema with the TPE sampler) in every app's config search path.

    A YAML file rather than a ConfigStore entry: Hydra refuses an app's own ``hydra/sweeper/optuna.yaml`` beside a
    ConfigStore entry of the same name that has a defaults list, and the app's file must be able to replace it.
    """

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider=PROVIDER, path=f"file://{CONF}")


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(group="hydra/sweeper", name="optuna_schema", node=OptunaSweeperConf, provider=PROVIDER)
    for name, node in SAMPLERS.items():
        cs.store(group="hydra/sweeper/sampler", name=name, node=node, provider=PROVIDER)


register()
