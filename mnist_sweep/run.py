"""The task: one training run, step by step, in the tutorial's terms. The one module that reads Hydra's state.

``train.py`` hands every job of ``python train.py [-m] ...`` to ``task``, which returns the objective (the best
validation accuracy) so any Hydra sweeper can optimise it. ``run`` is the whole story, one step per function:

1. ``check``          - the settings, the device, the tracking store and the sweep this run belongs to, before
                        any compute is spent (so a mistake costs nothing);
2. ``boxes_and_belts`` - the datasets (boxes of raw material) and the loaders (conveyor belts), data.py;
3. ``student``        - the network and how it learns (optimizer and schedule), model.py;
4. ``lessons``        - epochs over the book, each followed by the mock exam (validation), training.py;
5. ``exam``           - the official test set, scored once and never used to choose anything;
6. ``notebook``       - the lab notebook: config beside the weights, per-epoch log, confusion matrix, model.

Each step takes plain values and hands plain values on: the Hydra config stops at ``check``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate, to_absolute_path
from omegaconf import DictConfig, OmegaConf

from mnist_sweep import UserError, augment, config, data, model, plots, search, tracking, training, trial
from mnist_sweep.cli import fail, sigterm_to_interrupt

log = logging.getLogger("mnist_sweep")

config.register()


def task(cfg: DictConfig) -> float:
    """Hydra's task function: one job of `python train.py [-m]`. Returns the objective, validation accuracy."""
    try:
        return run(cfg)
    except UserError as e:
        if not _in_sweep(_hydra()):
            fail(e)  # a single run: one line and out, before Hydra adds its own report of the failed job
        # In a sweep, Hydra goes on to the next job and reports this one's error at the end: say it now.
        log.error("run failed: %s", e)
        raise
    except Exception as e:
        log.error("run failed: %s: %s", type(e).__name__, e)
        raise


@dataclass
class Context:
    """What step 1 settled: everything the later steps need, as plain values."""

    cfg: DictConfig  # the composed config, kept only to be saved and logged
    settings: config.Config  # the checked, typed settings
    hc: Any  # Hydra's own config (None outside a Hydra run)
    out_dir: Path
    device: torch.device
    experiment_id: str
    trial: trial.Trial | None  # in a sweep: this trial's place in it


def run(cfg: DictConfig) -> float:
    """One training run: check, load, train, evaluate, log. Returns the validation accuracy (the objective)."""
    tracking.quiet()
    sigterm_to_interrupt()
    ctx = check(cfg)
    if ctx.trial is not None and not ctx.settings.sweep.rerun:
        reused = _reuse_finished(ctx)
        if reused is not None:
            return reused
    _share_machine(ctx)

    loaders, data_seconds = boxes_and_belts(ctx.settings, ctx.device)
    net, optimizer, args = student(ctx, len(loaders.classes))

    with tracking.start_run(ctx.experiment_id, _name(ctx), _tags(ctx), _parent(ctx)) as mlrun:
        if ctx.trial is not None:
            ctx.trial.run_id = mlrun.id
        mlrun.log_params({**params(cfg, ctx.hc), "trainer.precision": ctx.settings.trainer.precision})
        fitted, rows = lessons(ctx, net, optimizer, loaders, mlrun)
        test = exam(ctx.settings, net, loaders, ctx.device) if ctx.settings.trainer.test else None
        val_text = f"{fitted.val_acc:.4f}" if fitted.epochs[-1].validated else "none (data.val_size=0)"
        if test is not None:
            log.info(
                "test: loss %.4f acc %.4f (%d images, %.2f s) | val acc %s | training %.1f s",
                *(test.loss, test.acc, loaders.n_test, test.seconds, val_text, fitted.train_seconds),
            )
        final = _final_metrics(fitted, test, data_seconds)
        mlrun.log_metrics(final, step=fitted.best_epoch)
        notebook(ctx, mlrun, net, args, loaders, rows, test)

    tested = f"test/acc {test.acc:.4f}" if test is not None else "test set not used (trainer.test=false)"
    print(f"val/acc {val_text}  {tested}  ({fitted.train_seconds:.1f} s training)  mlflow run {mlrun.id}")
    return float(fitted.val_acc)


# ------------------------------------------------------------------------------------------------------------
# 1. Check everything the user gave us, cheapest first
# ------------------------------------------------------------------------------------------------------------


def check(cfg: DictConfig) -> Context:
    """Range-check the settings, find the device, open the tracking store and, in a sweep, join it."""
    hc = _hydra()
    settings = config.check(cfg)
    device = training.resolve_device(settings.device.type)
    settings.trainer.precision = training.resolve_precision(settings.trainer.precision, device)
    experiment_id = tracking.prepare(settings.mlflow.tracking_uri, settings.mlflow.experiment)
    joined = trial.join(experiment_id, trial.sweep_dir(hc), int(hc.job.num)) if _in_sweep(hc) else None
    out_dir = Path(hc.runtime.output_dir) if hc else Path.cwd()
    return Context(cfg, settings, hc, out_dir, device, experiment_id, joined)


def _reuse_finished(ctx: Context) -> float | None:
    """Resume: a trial whose config already FINISHED in this experiment is not trained again."""
    previous = trial.previous_result(ctx.experiment_id, config.config_hash(ctx.cfg))
    if previous is None:
        return None
    ctx.trial.reused_from = previous.info.run_id
    objective = float(previous.data.metrics[trial.OBJECTIVE_METRIC])
    print(
        f"skipped: this config already FINISHED as mlflow run {previous.info.run_id} "
        f"(val/acc {objective:.4f}); sweep.rerun=true trains it again"
    )
    return objective


def _share_machine(ctx: Context) -> None:
    """Threads (and, in a parallel sweep, which GPU) for this run, and the CPU's handling of tiny floats."""
    threads = ctx.settings.device.threads
    if ctx.trial is not None:  # parallel trials share the machine: divide the cores (and the GPUs) between them
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        launcher, n_trials = ctx.hc.launcher, ctx.trial.n_trials
        threads = threads or trial.trial_threads(launcher, n_trials, cores)
        if ctx.device.type == "cuda" and ctx.device.index is None:
            n_parallel = trial.parallel_jobs(launcher, n_trials, cores)
            ctx.device = torch.device(trial.trial_device("cuda", ctx.trial.num, n_parallel, torch.cuda.device_count()))
    if threads:
        torch.set_num_threads(threads)
    # Optimizer state that decays towards zero passes through the subnormal floats, where the CPU slows down
    # many times over: without this the best preset's epochs 26-30 took 2.2x as long (docs/BENCHMARKS.md).
    torch.set_flush_denormal(ctx.settings.device.flush_denormal)


# ------------------------------------------------------------------------------------------------------------
# 2. The boxes and the conveyor belts (data.py). Seeded: same seed + config => same run.
# ------------------------------------------------------------------------------------------------------------


def boxes_and_belts(settings: config.Config, device: torch.device) -> tuple[data.Loaders, float]:
    """The three splits on their conveyor belts, and the seconds it took to load them."""
    torch.manual_seed(settings.seed)
    order = torch.Generator().manual_seed(settings.seed)  # the order batches are drawn in, every epoch
    t0 = time.perf_counter()
    loaders = build_loaders(settings, device, order)
    seconds = time.perf_counter() - t0
    d = settings.data
    log.info(
        "data: %s%s via %s loader, %d train / %d val / %d test images, batch %d, on %s (%.2f s)",
        d.name,
        ", deskewed," if d.deskew else "",
        d.loader,
        loaders.n_train,
        loaders.n_val,
        loaders.n_test,
        d.batch_size,
        device,
        seconds,
    )
    return loaders, seconds


def build_loaders(settings: config.Config, device: torch.device, order: torch.Generator) -> data.Loaders:
    """The conveyor belts for ``settings.data``, batches drawn in the order of the ``order`` generator."""
    d = settings.data
    return data.build_loaders(
        name=d.name,
        root=_absolute(d.root),
        loader=d.loader,
        batch_size=d.batch_size,
        eval_batch_size=d.eval_batch_size,
        val_size=d.val_size,
        split_seed=d.split_seed,
        mean=d.mean,
        std=d.std,
        device=device,
        generator=order,
        cache_dir=_absolute(d.cache_dir) if d.cache_dir else None,
        download=d.download,
        verify=d.verify,
        num_workers=d.num_workers,
        deskewed=d.deskew,
    )


# ------------------------------------------------------------------------------------------------------------
# 3. The student (model.py) and how it learns (an optimizer from conf/optimizer/)
# ------------------------------------------------------------------------------------------------------------


def student(ctx: Context, num_classes: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, dict]:
    """The network, on the device, and its optimizer; ``args`` rebuild it from a checkpoint."""
    args = model_args(ctx.settings, num_classes)
    net = model.build(**args).to(ctx.device)
    optimizer = instantiate(ctx.cfg.optimizer, _convert_="all")(net.parameters())
    log.info(
        "model: %s, %d weights; optimizer: %s; precision: %s; mlflow run %r",
        _describe(ctx.settings.model),
        model.count_params(net),
        type(optimizer).__name__,
        ctx.settings.trainer.precision,
        _name(ctx),
    )
    return net, optimizer, args


def model_args(settings: config.Config, num_classes: int) -> dict:
    """The plain arguments of model.build (saved beside the weights, so a checkpoint can be rebuilt).

    ``members`` is saved only for an ensemble, so a single net's arguments still build ``model.MLP`` directly.
    """
    keys = ("hidden", "depth", "activation", "dropout", "norm", "input_dropout")
    args = {**{k: getattr(settings.model, k) for k in keys}, "num_classes": num_classes}
    if settings.model.members > 1:
        args["members"] = settings.model.members
    return args


# ------------------------------------------------------------------------------------------------------------
# 4. The lessons (training.py): the book, then the mock exam after each epoch
# ------------------------------------------------------------------------------------------------------------


def lessons(ctx: Context, net, optimizer, loaders: data.Loaders, mlrun: tracking.Run):
    """Train; log each epoch's metrics as it ends; let a search's pruner stop a hopeless trial."""
    settings, rows = ctx.settings, []
    epochs = settings.trainer.epochs
    pruner = search.reporter(settings.optuna, epochs)  # in an Optuna search: each epoch's val/acc to the study

    def on_epoch(er: training.EpochResult) -> bool:
        metrics = er.metrics()
        mlrun.log_metrics(metrics, step=er.epoch)  # one batched write per epoch
        rows.append({"epoch": er.epoch, **metrics})
        log.info(er.summary(epochs))
        if pruner is None or not pruner.report(er.epoch, er.val_acc):
            return False
        mlrun.set_tags({"pruned": "true", "pruned_at_epoch": er.epoch})
        if ctx.trial is not None:
            ctx.trial.note = f"pruned at epoch {er.epoch}"
        log.info("pruned: the search judged this trial hopeless after epoch %d", er.epoch)
        return True

    fitted = training.fit(
        net,
        loaders.train,
        loaders.val,
        optimizer,
        device=ctx.device,
        num_classes=len(loaders.classes),
        on_epoch=on_epoch,
        progress=settings.trainer.progress,
        **fit_options(settings),
    )
    return fitted, rows


def fit_options(settings: config.Config) -> dict:
    """training.fit's keyword arguments that come from the config: the trainer, schedule and augmentation."""
    t, s = settings.trainer, settings.scheduler
    return dict(
        epochs=t.epochs,
        schedule=lambda step, total: training.lr_multiplier(step, total, s.warmup, s.start, s.decay, s.final),
        precision=t.precision,
        patience=t.patience,
        grad_clip=t.grad_clip,
        label_smoothing=t.label_smoothing,
        max_loss=t.max_loss,
        augment=augment.from_config(settings.data.augment),
    )


# ------------------------------------------------------------------------------------------------------------
# 5. The exam it has never seen: reported once, never used to choose anything
# ------------------------------------------------------------------------------------------------------------


def exam(settings: config.Config, net, loaders: data.Loaders, device: torch.device) -> training.Evaluation:
    """The official test set. (A search's trials skip it, trainer.test=false: the chosen config is tested once.)"""
    t0 = time.perf_counter()
    test = training.evaluate(net, loaders.test, device, len(loaders.classes), settings.trainer.precision)
    test.seconds = time.perf_counter() - t0
    return test


def _final_metrics(fitted: training.FitResult, test: training.Evaluation | None, data_seconds: float) -> dict:
    # Without a validation split (data.val_size=0) there is no best_val/acc: the run has no objective.
    final = {
        "best_epoch": fitted.best_epoch,
        **({trial.OBJECTIVE_METRIC: fitted.val_acc} if fitted.epochs[-1].validated else {}),
        "train_time_s": fitted.train_seconds,
        "data_time_s": data_seconds,
    }
    if test is not None:
        final.update({"test/loss": test.loss, "test/acc": test.acc, "test_eval_time_s": test.seconds})
        final.update({f"test/acc_class_{i}": a for i, a in enumerate(test.per_class_acc)})
    return final


# ------------------------------------------------------------------------------------------------------------
# 6. The lab notebook (tracking.py): config beside the weights, the per-epoch log, the confusion matrix
# ------------------------------------------------------------------------------------------------------------


def notebook(ctx: Context, mlrun: tracking.Run, net, args: dict, loaders, rows, test) -> None:
    """Write the run's files into its output folder and log them, and (outside a sweep) the model."""
    d, m = ctx.settings.data, ctx.settings.mlflow
    example = example_images(loaders, d.mean, d.std)  # a few images, kept with the weights
    out = ctx.out_dir
    _save_checkpoint(out, ctx.cfg, net, args, d, loaders.classes, example)
    _save_epochs(out / "epochs.csv", rows)
    if test is not None:
        _save_confusion(out, test, loaders.classes)
    for item in ("config.yaml", "epochs.csv", "confusion_matrix.png", "confusion_matrix.csv"):
        if (out / item).exists():
            mlrun.log_artifact(out / item)
    mlrun.log_artifacts(out / "checkpoint", "checkpoint")
    if (out / ".hydra").is_dir():
        mlrun.log_artifacts(out / ".hydra", "hydra")
    # In a sweep the best trial's model is logged when the sweep ends (sweep.finish), from its checkpoint.
    if m.log_model and (ctx.trial is None or m.sweep_models == "all"):
        classifier = model.Classifier(net, d.mean, d.std, d.deskew)
        mlrun.log_model(classifier, example.numpy(), m.model_format)
    for handler in logging.getLogger().handlers:
        handler.flush()
    for log_file in out.glob("*.log"):
        mlrun.log_artifact(log_file)


def example_images(loaders: data.Loaders, mean: float, std: float) -> torch.Tensor:
    """A few validation images as the exported model expects them: ToTensor's 0..1 scale, [N,1,28,28].

    (With data.deskew they are the deskewed images: still valid input, as deskewing an upright digit again
    changes little.)
    """
    x, _ = next(iter(loaders.val if len(loaders.val) else loaders.test))
    return (x[:4].detach().float().cpu() * std + mean).clamp(0, 1)


def _save_checkpoint(out: Path, cfg: DictConfig, net, args: dict, d, classes, example: torch.Tensor) -> None:
    # The config is saved beside the weights, so a checkpoint can always be rebuilt (model.load_checkpoint).
    ckpt = out / "checkpoint"
    ckpt.mkdir(parents=True, exist_ok=True)
    text = OmegaConf.to_yaml(cfg, resolve=True)
    (out / "config.yaml").write_text(text)
    (ckpt / "config.yaml").write_text(text)
    state = {k: v.cpu() for k, v in net.state_dict().items()}
    torch.save(
        {
            "model_args": args,
            "mean": d.mean,
            "std": d.std,
            "deskew": d.deskew,
            "classes": list(classes),
            "state_dict": state,
            "example": example,  # input example for a model logged later from this checkpoint
        },
        ckpt / "model.pt",
    )


def _save_epochs(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _save_confusion(out: Path, test: training.Evaluation, classes) -> None:
    with open(out / "confusion_matrix.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true\\predicted", *classes])
        for name, counts in zip(classes, test.confusion.tolist(), strict=True):
            writer.writerow([name, *counts])
    title = f"test set confusion matrix (accuracy {test.acc:.2%})"
    plots.confusion_matrix_png(test.confusion, classes, out / "confusion_matrix.png", title)


# ------------------------------------------------------------------------------------------------------------
# What MLflow is told about the run
# ------------------------------------------------------------------------------------------------------------


def run_name(hc) -> str:
    """Runs of a sweep are told apart by what was overridden: ``model.hidden=128 optimizer=sgd``."""
    if hc is None:
        return "run"
    return hc.job.override_dirname or "defaults"


def params(cfg: DictConfig, hc) -> dict[str, object]:
    """The resolved config as dotted keys, plus which preset each config group came from."""
    flat = config.flatten(OmegaConf.to_container(cfg, resolve=True))
    flat = {k: v for k, v in flat.items() if not k.startswith(("optimizer._", "mlflow.", "sweep."))}
    flat["optimizer.name"] = str(cfg.optimizer._target_).rsplit(".", 1)[-1].lower()
    if hc is not None:
        for group, choice in hc.runtime.choices.items():
            if not group.startswith(("hydra/", "schema/")) and group != "base_config":
                flat[f"choice.{group}"] = choice
    return flat


def _name(ctx: Context) -> str:
    return ctx.settings.mlflow.run_name or run_name(ctx.hc)


def _parent(ctx: Context) -> str | None:
    return ctx.trial.parent_id if ctx.trial is not None else None


def _tags(ctx: Context) -> dict[str, str]:
    tags = {
        **tracking.git_state(),
        **tracking.version_tags(),
        "device": str(ctx.device),
        "device.name": training.device_name(ctx.device),
        "config_hash": config.config_hash(ctx.cfg),
        "hydra.output_dir": str(ctx.out_dir),
    }
    if ctx.trial is not None:
        tags["hydra.job.num"] = str(ctx.hc.job.num)
        tags[trial.SWEEP_DIR] = trial.sweep_dir(ctx.hc)
        tags["trial.overrides"] = json.dumps(list(ctx.hc.overrides.task))[:5000]
        tags["torch.threads"] = str(torch.get_num_threads())
    return tags


def _describe(m) -> str:
    shown = (("input dropout", m.input_dropout), ("dropout", m.dropout), ("norm", m.norm))
    extra = "".join(f", {k} {v}" for k, v in shown if v not in (0, 0.0, "none"))
    members = f"{m.members} nets of " if m.members > 1 else ""
    return f"{members}{m.depth} x {m.hidden} {m.activation}{extra}"


# ------------------------------------------------------------------------------------------------------------
# Hydra's state
# ------------------------------------------------------------------------------------------------------------


def _hydra():
    return HydraConfig.get() if HydraConfig.initialized() else None


def _in_sweep(hc) -> bool:
    """Whether this job is a trial of a multirun (`python train.py -m ...`)."""
    return hc is not None and hc.mode is not None and hc.mode.name == "MULTIRUN"


def _absolute(path: str) -> str:
    """Relative paths on the command line mean relative to where the user ran the command."""
    try:
        return to_absolute_path(os.path.expanduser(path))
    except ValueError:  # outside a Hydra run (tests calling run() directly)
        return os.path.abspath(os.path.expanduser(path))
