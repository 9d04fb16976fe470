"""The schema every run is checked against.

Each config group (``conf/<group>/*.yaml``) is typed by a dataclass here, registered in Hydra's ConfigStore:
a value of the wrong type (``model.hidden=abc``) or a key that does not exist is rejected by Hydra while it
composes the config; a value of the right type but out of range (``model.hidden=0``) is rejected by
``check()`` before anything is loaded or trained. Either way the user gets one line naming the key and the fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from mnist_sweep import UserError
from mnist_sweep.data import DATASETS
from mnist_sweep.model import ACTIVATIONS, NORMS


class ConfigError(UserError):
    """A config value out of range."""


def _require(ok: bool, key: str, value: Any, rule: str, example: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value} is invalid: {rule} (e.g. {example})")


@dataclass
class ModelConfig:
    hidden: int = 256  # units in each hidden layer
    depth: int = 2  # number of hidden layers (0 = logistic regression)
    activation: str = "relu"  # relu | gelu | tanh | silu | leaky_relu
    dropout: float = 0.0  # dropout after each hidden activation
    norm: str = "none"  # none | batch | layer
    input_dropout: float = 0.0  # dropout on the pixels, before the first layer
    members: int = 1  # nets trained side by side from different starts, their predictions averaged (model.py)

    def __post_init__(self) -> None:
        _require(self.hidden >= 1, "model.hidden", self.hidden, "width must be a positive integer", "model.hidden=256")
        _require(self.depth >= 0, "model.depth", self.depth, "depth must be 0 or more", "model.depth=2")
        _require(
            self.activation in ACTIVATIONS,
            "model.activation",
            self.activation,
            f"choose one of {', '.join(ACTIVATIONS)}",
            "model.activation=gelu",
        )
        _require(0 <= self.dropout < 1, "model.dropout", self.dropout, "must be in [0, 1)", "model.dropout=0.1")
        _require(
            0 <= self.input_dropout < 1,
            "model.input_dropout",
            self.input_dropout,
            "must be in [0, 1)",
            "model.input_dropout=0.2",
        )
        _require(self.members >= 1, "model.members", self.members, "must be 1 or more", "model.members=2")
        _require(self.norm in NORMS, "model.norm", self.norm, f"choose one of {', '.join(NORMS)}", "model.norm=layer")


@dataclass
class OptimizerConfig:
    """Arguments of a ``torch.optim`` class; ``instantiate`` returns it as a partial awaiting the parameters."""

    _target_: str = MISSING  # the torch.optim class, set by the optimizer=... preset
    _partial_: bool = True  # instantiate() returns a partial that run.py completes with the model's parameters
    lr: float = 1e-3  # the peak learning rate (the schedule scales it)
    weight_decay: float = 0.0  # L2 penalty (AdamW: decoupled weight decay)

    def __post_init__(self) -> None:
        _require(self.lr > 0, "optimizer.lr", self.lr, "learning rate must be > 0", "optimizer.lr=0.001")
        _require(
            self.weight_decay >= 0,
            "optimizer.weight_decay",
            self.weight_decay,
            "must be >= 0",
            "optimizer.weight_decay=0",
        )


@dataclass
class SGDConfig(OptimizerConfig):
    _target_: str = "torch.optim.SGD"
    lr: float = 0.05
    momentum: float = 0.9  # fraction of the previous update kept in the next
    nesterov: bool = True  # Nesterov's look-ahead form of momentum

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(
            0 <= self.momentum < 1, "optimizer.momentum", self.momentum, "must be in [0, 1)", "optimizer.momentum=0.9"
        )
        _require(
            self.momentum > 0 or not self.nesterov,
            "optimizer.nesterov",
            self.nesterov,
            "Nesterov momentum needs optimizer.momentum > 0",
            "optimizer.nesterov=false",
        )


@dataclass
class AdamConfig(OptimizerConfig):
    _target_: str = "torch.optim.Adam"
    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.999)  # decay rates of the running mean of the gradient and of its square
    eps: float = 1e-8  # added to the denominator for numerical stability
    fused: bool | None = None  # one fused kernel for all parameters (CPU and CUDA); null = torch's choice


@dataclass
class AdamWConfig(AdamConfig):
    _target_: str = "torch.optim.AdamW"
    weight_decay: float = 0.01


@dataclass
class SchedulerConfig:
    """The learning-rate multiplier over training: linear warm-up, then hold or decay.

    The defaults are the one-cycle schedule (conf/scheduler/onecycle.yaml); constant: warmup=0, decay=none;
    cosine: warmup=0, decay=cosine.
    """

    warmup: float = 0.25  # fraction of all steps spent ramping up from start*lr to lr
    start: float = 0.04  # multiplier at step 0 when warming up
    decay: str = "cosine"  # none | cosine | linear, after the warm-up
    final: float = 0.0  # multiplier at the last step when decaying

    def __post_init__(self) -> None:
        _require(0 <= self.warmup <= 1, "scheduler.warmup", self.warmup, "must be in [0, 1]", "scheduler.warmup=0.25")
        _require(
            self.decay in ("none", "cosine", "linear"),
            "scheduler.decay",
            self.decay,
            "choose none, cosine or linear",
            "scheduler.decay=cosine",
        )
        _require(self.final >= 0, "scheduler.final", self.final, "must be >= 0", "scheduler.final=0")


# The data.augment magnitudes: each distortion's own, 0 switching it off.
DISTORTIONS = ("rotate", "shear", "scale", "shift", "elastic_alpha")


@dataclass
class AugmentConfig:
    """Distortions of the training batches, on the device (mnist_sweep/augment.py); evaluation never sees them."""

    strength: float = 0.0  # 0 = off; scales every magnitude below (sweep this one)
    rotate: float = 12.0  # degrees, either way
    shear: float = 8.0  # degrees
    scale: float = 0.1  # zoom in or out by up to this fraction
    shift: float = 0.1  # fraction of the image size
    elastic_alpha: float = 2.5  # peak elastic displacement in pixels (0 = affine only)
    elastic_sigma: float = 4.0  # smoothness of the elastic field, pixels

    def __post_init__(self) -> None:
        for key in ("strength", *DISTORTIONS):
            value = getattr(self, key)
            _require(value >= 0, f"data.augment.{key}", value, "must be >= 0", f"data.augment.{key}=0")
        _require(self.scale < 1, "data.augment.scale", self.scale, "must be below 1", "data.augment.scale=0.1")
        _require(
            self.elastic_sigma > 0,
            "data.augment.elastic_sigma",
            self.elastic_sigma,
            "must be > 0",
            "data.augment.elastic_sigma=4",
        )


@dataclass
class DataConfig:
    name: str = "mnist"  # mnist | fashion_mnist
    root: str = "data"  # holds the four IDX files (or torchvision's <Class>/raw/); downloaded there if absent
    loader: str = "tensor"  # tensor (fast, in memory) | torchvision (the tutorial's DataLoader)
    batch_size: int = 256  # training images per step (the tutorial: 64; 256 reaches 98% in fewer seconds)
    eval_batch_size: int = 1000  # the tutorial's test batch
    val_size: int = 5000  # images carved out of the 60,000 for validation
    split_seed: int = 0  # fixed apart from `seed`, so every run of a sweep is judged on the same images
    mean: float = 0.1307  # Normalize((mean,), (std,)): the training set's pixel mean
    std: float = 0.3081  # and standard deviation
    deskew: bool = False  # straighten each slanted digit first (data.py deskew), for every split and the model
    download: bool = True  # try torchvision's download when the files are not under root
    verify: bool = True  # check each file's SHA-256 (once; the result is cached)
    cache_dir: str | None = None  # decoded tensors and checksum records; default ~/.cache/mnist-sweep
    num_workers: int = 0  # DataLoader worker processes (torchvision loader only)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        _require(self.name in DATASETS, "data.name", self.name, f"choose one of {', '.join(DATASETS)}", "data=mnist")
        _require(
            self.loader in ("tensor", "torchvision"),
            "data.loader",
            self.loader,
            "choose tensor or torchvision",
            "data.loader=tensor",
        )
        _require(self.batch_size >= 1, "data.batch_size", self.batch_size, "must be >= 1", "data.batch_size=256")
        _require(
            self.eval_batch_size >= 1,
            "data.eval_batch_size",
            self.eval_batch_size,
            "must be >= 1",
            "data.eval_batch_size=1000",
        )
        _require(
            0 <= self.val_size < 60000, "data.val_size", self.val_size, "must be in [0, 60000)", "data.val_size=5000"
        )
        _require(self.std > 0, "data.std", self.std, "must be > 0", "data.std=0.3081")
        _require(self.num_workers >= 0, "data.num_workers", self.num_workers, "must be >= 0", "data.num_workers=0")


@dataclass
class DeviceConfig:
    type: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    threads: int = 0  # CPU threads for torch; 0 leaves torch's default (one per core)
    # Treat subnormal floats (< 1.2e-38) as zero on the CPU. Optimizer state of weights that get almost no
    # gradient decays into that range, where every operation on it is many times slower (docs/BENCHMARKS.md,
    # "Subnormal floats").
    flush_denormal: bool = True

    def __post_init__(self) -> None:
        ok = self.type in ("auto", "cpu", "cuda", "mps") or (self.type.startswith("cuda:") and self.type[5:].isdigit())
        _require(ok, "device", self.type, "choose auto, cpu, cuda, cuda:N or mps", "device=cpu")
        _require(self.threads >= 0, "device.threads", self.threads, "must be >= 0", "device.threads=2")


@dataclass
class TrainerConfig:
    epochs: int = 5  # passes over the training split
    precision: str = "auto"  # auto (bf16 where native: CUDA, CPUs with AVX512_BF16/AMX; else fp32) | fp32 | bf16
    patience: int = 0  # early stopping: epochs without val/acc improvement; 0 = off
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    label_smoothing: float = 0.0  # share of each target spread over the other classes (cross-entropy)
    max_loss: float = 100.0  # stop as diverged when the training loss is NaN, inf or above this; 0 = only NaN/inf
    progress: bool = True  # a progress bar while an epoch runs (only when attached to a terminal)
    test: bool = True  # score the test set at the end; a search's trials set it false (validation only)
    checkpoint: bool = True  # save the training state at each epoch's end, so an interrupted run can go on

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, "trainer.epochs", self.epochs, "must be >= 1", "trainer.epochs=5")
        _require(
            self.precision in ("auto", "fp32", "bf16"),
            "trainer.precision",
            self.precision,
            "choose auto, fp32 or bf16",
            "trainer.precision=auto",
        )
        _require(self.patience >= 0, "trainer.patience", self.patience, "must be >= 0", "trainer.patience=3")
        _require(self.grad_clip >= 0, "trainer.grad_clip", self.grad_clip, "must be >= 0", "trainer.grad_clip=1.0")
        _require(
            0 <= self.label_smoothing < 1,
            "trainer.label_smoothing",
            self.label_smoothing,
            "must be in [0, 1)",
            "trainer.label_smoothing=0.1",
        )
        _require(self.max_loss >= 0, "trainer.max_loss", self.max_loss, "must be >= 0", "trainer.max_loss=100")


@dataclass
class MlflowConfig:
    tracking_uri: str = "sqlite:///mlruns/mlflow.db"  # or http://HOST:PORT for a tracking server
    experiment: str = "mnist-sweep"  # the MLflow experiment every run and sweep goes into
    run_name: str | None = None  # default: built from the command-line overrides
    log_model: bool = True  # log the model (format: model_format) with an input example (raw uint8 images)
    # weights (no pickle, no code: loading runs nothing from the store) | pt2 (torch.export, ~2 s more per run) |
    # pickle (opt-in: loading it runs any code its files hold - trusts whoever can write the store)
    model_format: str = "weights"
    # In a sweep: best = only the best trial's model is logged, once, when the sweep ends (every trial keeps its
    # checkpoint artifact); all = every trial logs its model (about 0.2 s each, 2 s for the first in a process).
    sweep_models: str = "best"
    # The Model Registry: each sweep registers its best trial's model as a new version of this registered model and
    # moves the alias @champion to it when its best_val/acc beats the champion's; null: register nothing.
    registered_model: str | None = "${data.name}-mlp"
    ui_url: str | None = None  # MLflow UI the printed links open; null: the tracking server, else http://127.0.0.1:5000

    def __post_init__(self) -> None:
        _require(
            bool(self.experiment),
            "mlflow.experiment",
            repr(self.experiment),
            "must not be empty",
            "mlflow.experiment=mnist",
        )
        _require(
            self.model_format in ("weights", "pt2", "pickle"),
            "mlflow.model_format",
            self.model_format,
            "choose weights, pt2 or pickle",
            "mlflow.model_format=weights",
        )
        _require(
            self.sweep_models in ("best", "all"),
            "mlflow.sweep_models",
            self.sweep_models,
            "choose best or all",
            "mlflow.sweep_models=all",
        )


@dataclass
class OptunaTrialConfig:
    """Set by the Optuna sweeper on each trial of a search (mnist_sweep/search.py); null outside a search."""

    storage: str | None = None  # the study's storage URL
    study: str | None = None  # the study's name
    trial: int | None = None  # this trial's number in the study
    pruner: str = "median"  # the search's pruner (hydra.sweeper.pruner)
    warmup_epochs: int = 1  # epochs before this trial may be pruned
    startup_trials: int = 5  # trials that finish unpruned before pruning starts
    # the final metrics a run returns, in order, for a search of several objectives (experiment=search_pareto);
    # empty: it returns the validation accuracy
    objectives: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        unknown = [n for n in self.objectives if n not in OBJECTIVES]
        _require(
            not unknown,
            "optuna.objectives",
            self.objectives,
            f"choose from {', '.join(OBJECTIVES)}",
            "optuna.objectives=[best_val/acc,weights]",
        )


# The final metrics of a run that a search may optimise (run.py logs them).
OBJECTIVES = ("best_val/acc", "weights", "train_time_s")


@dataclass
class SweepConfig:
    """How a multirun treats trials that already ran (mnist_sweep/sweep.py)."""

    rerun: bool = False  # false: a trial whose config already FINISHED in the experiment is skipped (resume)


@dataclass
class Config:
    model: ModelConfig = MISSING
    optimizer: Any = MISSING  # one of SGDConfig / AdamConfig / AdamWConfig, chosen by `optimizer=...`
    scheduler: SchedulerConfig = MISSING
    data: DataConfig = MISSING
    device: DeviceConfig = MISSING
    trainer: TrainerConfig = MISSING
    mlflow: MlflowConfig = MISSING
    sweep: SweepConfig = field(default_factory=SweepConfig)
    seed: int = 0  # model initialisation and batch order; the validation split has its own data.split_seed
    resume: str | None = None  # an interrupted run's MLflow run id: continue it from its last epoch
    optuna: OptunaTrialConfig = field(default_factory=OptunaTrialConfig)

    def __post_init__(self) -> None:
        # data.val_size=0 trains on all 60,000 (a refit after the choice, experiment=best_aug_refit): nothing is
        # left to choose by, so whatever chooses by val/acc must fail here, before any compute.
        if self.data is not MISSING and self.data.val_size == 0:
            for needs_val, key, value in (
                (self.trainer.patience > 0, "trainer.patience", self.trainer.patience),
                (self.optuna.study is not None, "optuna.study", self.optuna.study),
            ):
                _require(
                    not needs_val,
                    key,
                    value,
                    "chooses by val/acc, and data.val_size=0 leaves no validation split",
                    "data.val_size=5000",
                )


def register() -> None:
    """Put the schemas in Hydra's ConfigStore (``conf/`` YAML files extend them), and the ``${pid:}`` resolver."""
    # Output folders end in the process id (conf/config.yaml, hydra.run.dir): two runs started in the same second
    # (`python train.py seed=1 & python train.py seed=2 &`) would otherwise share one folder, each overwriting
    # the other's .hydra/, log and checkpoint before logging them to MLflow. Cached, so the jobs of a parallel
    # sweep resolve their sweep folder to the parent's.
    if not OmegaConf.has_resolver("pid"):
        OmegaConf.register_new_resolver("pid", os.getpid, use_cache=True)
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    # Per-option schemas live in their own group, so `optimizer=...` lists only the real presets.
    cs.store(group="schema/optimizer", name="sgd", node=SGDConfig)
    cs.store(group="schema/optimizer", name="adam", node=AdamConfig)
    cs.store(group="schema/optimizer", name="adamw", node=AdamWConfig)


def check(cfg: DictConfig) -> Config:
    """Range-check every value (the dataclasses' ``__post_init__``) and return the typed config."""
    return OmegaConf.to_object(cfg)


# Keys that name where things go, not what is computed: left out of the config hash.
NOT_HASHED = (
    "mlflow",
    "sweep",
    "optuna",
    "resume",
    "data.root",
    "data.cache_dir",
    "data.num_workers",
    "trainer.progress",
    "trainer.checkpoint",
)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"model": {"hidden": 256}}`` -> ``{"model.hidden": 256}`` (lists stay values)."""
    out: dict[str, Any] = {}
    if isinstance(node, dict):
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = node
    return out


def config_hash(cfg: DictConfig) -> str:
    """A short hash of what determines a run's result (the resolved config minus NOT_HASHED keys)."""
    import hashlib
    import json

    flat = flatten(OmegaConf.to_container(cfg, resolve=True))
    kept = {k: v for k, v in flat.items() if not any(k == n or k.startswith(n + ".") for n in NOT_HASHED)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]
