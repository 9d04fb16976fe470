"""An Optuna sweeper for Hydra: a drop-in for hydra-optuna-sweeper on current Optuna, plus pruning, resume and
the best config written as a preset. Select it with ``hydra/sweeper=optuna``.

Hydra's plugin layout: ``config.py`` (the settings and the sampler group), ``_impl.py`` (the search),
``optuna_sweeper.py`` (the class Hydra instantiates). The trials' side of pruning, and what a preset of this app
holds, are in ``mnist_sweep/search.py``, which the sweeper imports only when an app switches those on.

An app opts into an addition with its ``hydra.sweeper`` key (``hydra.sweeper.test_best=true``,
``hydra.sweeper.pruner=median``); it need not declare the keys the sweeper then sets in its trials
(``optuna.*``, ``trainer.test``): they are added. To be pruned, the task reports each epoch::

    from mnist_sweep import search

    r = search.reporter(cfg, epochs)  # None outside a pruning search, or where cfg has no optuna section
    for epoch in range(1, epochs + 1):
        val_acc = ...  # this epoch's value of the objective
        if r and r.report(epoch, val_acc):  # the pruner judged this trial hopeless
            break
"""
