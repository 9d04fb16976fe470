"""mnist-sweep: Hydra-configured sweeps of a feedforward MNIST classifier, tracked in MLflow.

The pipeline, one module per step:

    config.py    the schema every run is checked against (Hydra ConfigStore)
    data.py      the raw material: IDX files -> checked -> tensors / torchvision datasets -> batches
    augment.py   new variants of the material: random distortions of each training batch, on the device
    model.py     the student: a feedforward net of any width and depth
    training.py  the lessons: optimiser, schedule, the train/evaluate loop
    tracking.py  the lab notebook: everything MLflow sees
    app.py       the one place that talks to Hydra; train.py calls it

Around it: sweep.py (a sweep as one MLflow parent run, and its leaderboard), search.py (the Optuna sweeper),
results.py and plots.py (reports from MLflow), and the bench*.py scripts that measure speed and accuracy.
"""

__version__ = "0.1.0"


class UserError(Exception):
    """A problem the user can fix (bad config, missing data, unreachable server).

    The command line prints it as one line, without a traceback, and exits with ``exit_code``.
    """

    exit_code = 2  # a usage error, like argparse's
