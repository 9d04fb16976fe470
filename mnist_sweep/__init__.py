"""mnist-sweep: Hydra-configured sweeps of a feedforward MNIST classifier, tracked in MLflow.

The pipeline, one module per step, in the order a run happens (``run.py`` calls them):

    config.py    the schema every run is checked against (Hydra ConfigStore): every default, once
    data.py      the boxes and the conveyor belts: IDX files -> checked -> tensors -> batches
    augment.py   new variants of the book's pages: random distortions of each training batch, on the device
    model.py     the student: a feedforward net of any width and depth
    training.py  the lessons and the exams: the train/evaluate loop
    tracking.py  the lab notebook: the one module that talks to MLflow
    saved_model.py  the model as MLflow keeps it: weights and JSON, loaded without running any code
    run.py       the task, step by step: the one module that reads Hydra's state; train.py calls it
    cli.py       the command line: one line for every mistake, exit codes

A sweep: sweep.py is the launcher's side (parent run, leaderboard), trial.py each trial's side (joining it,
resume, a config trained once between launches, dividing the machine), slurm.py checks a SLURM cluster before any
job is submitted. search.py is what this app adds to an Optuna search (per-epoch pruning, the best config as a
preset; the sweeper itself is hydra_plugins/mnist_sweep_optuna); plots.py draws the pictures; redact.py masks
passwords. Measurements live outside, in benchmarks/.
"""

__version__ = "0.1.0"


class UserError(Exception):
    """A problem the user can fix (bad config, missing data, unreachable server).

    The command line prints it as one line, without a traceback, and exits with ``exit_code``.
    """

    exit_code = 2  # a usage error, like argparse's
