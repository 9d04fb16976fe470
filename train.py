"""Train a feedforward MNIST classifier, configured by Hydra (conf/) and tracked in MLflow (mlruns/).

    python train.py                               # one run with the defaults
    python train.py -m model.hidden=128,256       # a sweep: one run per value
    python train.py --help                        # every config group and key

The pipeline itself lives in mnist_sweep/: run.py is the task, step by step; cli.py prints mistakes as one line.
"""

import hydra
from omegaconf import DictConfig

from mnist_sweep import cli, run


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    return run.task(cfg)  # validation accuracy: the objective any Hydra sweeper can optimise


if __name__ == "__main__":
    cli.cli(main)
