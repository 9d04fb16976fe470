"""Hydra finds sweepers only in the ``hydra_plugins`` namespace: this registers mnist-sweep's Optuna sweeper.

The logic lives in ``mnist_sweep/search.py``; select it with ``hydra/sweeper=optuna`` (conf/hydra/sweeper/).
"""

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper

from mnist_sweep.search import OptunaSweeperConf, OptunaSweeperImpl


class OptunaSweeper(OptunaSweeperImpl, Sweeper):
    """Optuna TPE search with per-epoch pruning and resumable studies (see mnist_sweep/search.py)."""


ConfigStore.instance().store(group="hydra/sweeper", name="mnist_optuna", node=OptunaSweeperConf, provider="mnist_sweep")
