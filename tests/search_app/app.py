"""A stand-in task for testing the Optuna sweeper quickly: no data, a known optimum at x = 0.3.

Each "epoch" reports a value that grows towards 1 - (x - 0.3)^2, and appends a line to trials.log, so the
tests can count the epochs every trial actually ran (pruning must cut them short). It prunes the way run.py does:
one ``search.reporter`` per run, one ``report`` per epoch.
"""

import os

import hydra

from mnist_sweep import search


@hydra.main(version_base="1.3", config_path=".", config_name="config")
def main(cfg) -> float:
    reporter = search.reporter(cfg.optuna, cfg.trainer.epochs)
    final = 1 - (cfg.x - 0.3) ** 2
    value = 0.0
    for epoch in range(1, cfg.trainer.epochs + 1):
        value = final * epoch / cfg.trainer.epochs
        with open(os.path.join(os.environ["SWEEP_LOG"]), "a") as f:
            f.write(f"trial={cfg.optuna.trial} x={cfg.x} epoch={epoch} test={cfg.trainer.test}\n")
        if cfg.fail:
            raise RuntimeError(f"stand-in failure at x={cfg.x}")
        if reporter and reporter.report(epoch, value):
            break
    return value


if __name__ == "__main__":
    main()
