"""The class Hydra instantiates for ``hydra/sweeper=optuna``; the search itself is ``_impl.OptunaSweeperImpl``."""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from hydra_plugins.mnist_sweep_optuna._impl import OptunaSweeperImpl


class OptunaSweeper(Sweeper):
    """Hydra's sweeper contract, handed to the implementation (its keyword arguments: config.OptunaSweeperConf)."""

    def __init__(self, **settings: Any) -> None:
        self.sweeper = OptunaSweeperImpl(**settings)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        return self.sweeper.sweep(arguments)
