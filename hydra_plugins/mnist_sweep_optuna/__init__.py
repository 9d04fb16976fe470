"""An Optuna sweeper for Hydra: a drop-in for hydra-optuna-sweeper on current Optuna, plus pruning, resume and
the best config written as a preset. Select it with ``hydra/sweeper=optuna``.

Hydra's plugin layout: ``config.py`` (the settings and the sampler group), ``_impl.py`` (the search),
``optuna_sweeper.py`` (the class Hydra instantiates). The trials' side of pruning, and what a preset of this app
holds, are in ``mnist_sweep/search.py``, which the sweeper imports only when an app switches those on.
"""
