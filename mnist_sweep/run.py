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
import hashlib
import json
import logging
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate, to_absolute_path
from omegaconf import DictConfig, OmegaConf

from mnist_sweep import UserError, augment, config, data, model, plots, search, sweep, tracking, training, trial
from mnist_sweep.cli import CONF_DIR, fail, sigterm_to_interrupt
from mnist_sweep.redact import mask_secrets, mask_values

log = logging.getLogger("mnist_sweep")

config.register()


def task(cfg: DictConfig) -> float | tuple[float, ...]:
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
    resume: Resume | None = None  # an interrupted run this one continues


@dataclass
class Resume:
    """An interrupted run to go on with: its id, where its training state is saved, and that state."""

    run_id: str
    path: Path
    state: dict


def run(cfg: DictConfig) -> float | tuple[float, ...]:
    """One training run: check, load, train, evaluate, log. Returns the validation accuracy (the objective)."""
    tracking.quiet()
    sigterm_to_interrupt()
    ctx = check(cfg)
    while True:
        if ctx.trial is not None and not ctx.settings.sweep.rerun:
            reused = _take_turn(ctx)
            if reused is not None:
                return reused
        try:
            return _train(ctx)
        except tracking.Discard:  # another launch made a run of this config a moment before: wait for it
            continue


def _train(ctx: Context) -> float | tuple[float, ...]:
    _share_machine(ctx)

    loaders, data_seconds, order = boxes_and_belts(ctx.settings, ctx.device)
    net, optimizer, args = student(ctx, len(loaders.classes))

    reopen = ctx.resume.run_id if ctx.resume else None
    with tracking.start_run(ctx.experiment_id, _name(ctx), _tags(ctx), _parent(ctx), reopen) as mlrun:
        if ctx.trial is not None:
            ctx.trial.run_id = mlrun.id
            _step_back_if_claimed(ctx, mlrun)
        mlrun.log_params({**params(ctx.cfg, ctx.hc), "trainer.precision": ctx.settings.trainer.precision})
        _log_dataset(ctx, mlrun, loaders)
        fitted, rows = lessons(ctx, net, optimizer, loaders, order, mlrun)
        test = exam(ctx.settings, net, loaders, ctx.device) if ctx.settings.trainer.test else None
        val_text = f"{fitted.val_acc:.4f}" if fitted.epochs[-1].validated else "none (data.val_size=0)"
        if test is not None:
            log.info(
                "test: loss %.4f acc %.4f (%d images, %.2f s) | val acc %s | training %.1f s",
                *(test.loss, test.acc, loaders.n_test, test.seconds, val_text, fitted.train_seconds),
            )
        final = _final_metrics(fitted, test, data_seconds)
        final["weights"] = model.count_params(net)  # an objective a search may minimise (optuna.objectives)
        mlrun.log_metrics(final, step=fitted.best_epoch)
        notebook(ctx, mlrun, net, args, loaders, rows, test)
        _state_path(ctx).unlink(missing_ok=True)  # finished: nothing left to resume

    tested = f"test/acc {test.acc:.4f}" if test is not None else "test set not used (trainer.test=false)"
    print(f"val/acc {val_text}  {tested}  ({fitted.train_seconds:.1f} s training)  mlflow run {mlrun.id}")
    if ctx.trial is None:  # a sweep prints one link, to all its trials, when it ends
        print(f"see it in MLflow: {_link(ctx, mlrun.id)}")
    objectives = ctx.settings.optuna.objectives  # a multi-objective search's metrics (experiment=search_pareto)
    return search.objective_values(final, objectives) if objectives else float(fitted.val_acc)


# ------------------------------------------------------------------------------------------------------------
# 1. Check everything the user gave us, cheapest first
# ------------------------------------------------------------------------------------------------------------


def check(cfg: DictConfig) -> Context:
    """Range-check the settings, find the device, open the tracking store and, in a sweep, join it."""
    hc = _hydra()
    settings = config.check(cfg)
    experiment_id = tracking.prepare(settings.mlflow.tracking_uri, settings.mlflow.experiment)
    tracking.close_orphans(experiment_id)  # a killed process's runs are KILLED, never RUNNING, and can go on
    resume = None
    if settings.resume:  # `python train.py resume=RUN_ID`: that run's own settings, from its saved state
        resume = _resume_by_id(settings.resume)
        cfg = OmegaConf.merge(OmegaConf.create(resume.state["config"]), {"mlflow": cfg.mlflow, "resume": None})
        settings = config.check(OmegaConf.merge(OmegaConf.structured(config.Config), cfg))
    device = training.resolve_device(settings.device.type)
    settings.trainer.precision = training.resolve_precision(settings.trainer.precision, device)
    _check_size(settings, device)
    joined = trial.join(experiment_id, trial.sweep_dir(hc), int(hc.job.num)) if _in_sweep(hc) else None
    out_dir = Path(hc.runtime.output_dir) if hc else Path.cwd()
    return Context(cfg, settings, hc, out_dir, device, experiment_id, joined, resume)


def _check_size(settings: config.Config, device: torch.device) -> None:
    """Fit before compute: a batch larger than the training split, or a net that cannot fit in memory, is
    refused now, in one line, instead of training one step per epoch or growing until the system kills it."""
    d, m = settings.data, settings.model
    n_train = 60000 - d.val_size
    if d.batch_size > n_train:
        raise UserError(
            f"data.batch_size={d.batch_size} is larger than the training split ({n_train} images): every epoch "
            f"would be one step; use at most data.batch_size={n_train} (e.g. data.batch_size=256)"
        )
    o = settings.optimizer
    optimizer = str(o.get("_target_", "") if isinstance(o, dict) else o._target_).rsplit(".", 1)[-1].lower()
    parts = training.memory_estimate(
        hidden=m.hidden,
        depth=m.depth,
        members=m.members,
        num_classes=len(data.DATASETS[d.name].classes),
        batch_size=d.batch_size,
        eval_batch_size=d.eval_batch_size,
        optimizer=optimizer,
        dataset_on_device=d.loader == "tensor",
    )
    training.check_fits(parts, device)


def _resume_by_id(run_id: str) -> Resume:
    """The interrupted run ``run_id`` of this store, with its saved training state, or a one-line error."""
    found = tracking.find_run(run_id)
    if found is None:
        raise UserError(f"resume={run_id}: no such MLflow run in this store; copy the id from `mlflow ui`")
    if found.info.status == "FINISHED":
        raise UserError(f"resume={run_id}: that run FINISHED; nothing to continue")
    path = Path(found.data.tags.get(trial.RESUME_STATE, ""))
    if not path.is_file():
        raise UserError(f"resume={run_id}: its saved training state ({path or 'none'}) is gone; run it again")
    if found.info.status == "RUNNING":
        raise UserError(f"resume={run_id}: that run is RUNNING; stop it first (Ctrl-C), or wait for it")
    return Resume(run_id, path, _load_state(path))


def _interrupted_trial(ctx: Context) -> Resume | None:
    """A relaunched sweep continues a trial of the same config that was interrupted, in the same MLflow run."""
    found = trial.interrupted(ctx.experiment_id, _hash(ctx))
    if found is None:
        return None
    path = Path(found.data.tags[trial.RESUME_STATE])
    return Resume(found.info.run_id, path, _load_state(path))


def _load_state(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a file cut short by a crash cannot happen (see _saver), but a disk can fail
        raise UserError(f"cannot read the saved training state {path} ({e}); delete it to start over") from e
    log.info("resuming from %s: epoch %d done", path, state["epoch"])
    return state


def _take_turn(ctx: Context) -> float | tuple[float, ...] | None:
    """A config is trained once between launches of the same sweep: reuse its FINISHED run, wait while another
    launch's live process trains it, go on with it where it was interrupted, or (None) train it here."""
    while True:
        reused = _reuse_finished(ctx)
        if reused is not None:
            return reused
        claim = trial.live_claim(ctx.experiment_id, _hash(ctx))
        if claim is None:
            ctx.resume = _interrupted_trial(ctx)
            return None
        trial.wait_for(claim)


def _step_back_if_claimed(ctx: Context, mlrun: tracking.Run) -> None:
    """Whichever live run of this config started first trains it: a later one is taken back (Discard)."""
    if not ctx.settings.sweep.rerun and trial.live_claim(ctx.experiment_id, _hash(ctx), me=mlrun.id):
        raise tracking.Discard


def _hash(ctx: Context) -> str:
    return config.config_hash(ctx.cfg)


def _reuse_finished(ctx: Context) -> float | tuple[float, ...] | None:
    """Resume: a trial whose config already FINISHED in this experiment is not trained again."""
    previous = trial.previous_result(ctx.experiment_id, _hash(ctx))
    objectives = ctx.settings.optuna.objectives
    if previous is None or not set(objectives) <= set(previous.data.metrics):
        return None  # (a run logged before one of the objectives was: trained again)
    ctx.trial.reused_from = previous.info.run_id
    objective = float(previous.data.metrics[trial.OBJECTIVE_METRIC])
    print(
        f"skipped: this config already FINISHED as mlflow run {previous.info.run_id} "
        f"(val/acc {objective:.4f}); sweep.rerun=true trains it again"
    )
    return search.objective_values(previous.data.metrics, objectives) if objectives else objective


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


def boxes_and_belts(settings: config.Config, device: torch.device) -> tuple[data.Loaders, float, torch.Generator]:
    """The three splits on their conveyor belts, the seconds it took to load them, and the generator that
    draws each epoch's order (saved with the training state, so a resumed run draws what it would have)."""
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
    return loaders, seconds, order


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
    optimizer = training.build_optimizer(instantiate(ctx.cfg.optimizer, _convert_="all"), net.parameters())
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


def lessons(ctx: Context, net, optimizer, loaders: data.Loaders, order: torch.Generator, mlrun: tracking.Run):
    """Train; log each epoch's metrics as it ends; let a search's pruner stop a hopeless trial. Save the
    training state at each epoch's end; an interrupted run goes on from its last one."""
    settings, rows = ctx.settings, []
    epochs = settings.trainer.epochs
    state = ctx.resume.state if ctx.resume else None
    if state is not None:
        order.set_state(state["order"])
        rows = [{"epoch": e["epoch"], **training.EpochResult(**e).metrics()} for e in state["history"]]
        _log_missing_epochs(mlrun, rows)
    pruner = search.reporter(settings.optuna, epochs)  # in an Optuna search: each epoch's val/acc to the study

    def on_epoch(er: training.EpochResult) -> bool:
        metrics = er.metrics()
        mlrun.log_metrics(metrics, step=er.epoch)  # one batched write per epoch
        # Another launch's run of this config may have been created a moment before this one yet committed after
        # this run looked (its start time is taken before its write): the later one steps back at an epoch end.
        if ctx.trial is not None:
            _step_back_if_claimed(ctx, mlrun)
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
        checkpoint=_saver(ctx, order, mlrun) if settings.trainer.checkpoint else None,
        resume=state,
        **fit_options(settings),
    )
    return fitted, rows


def _state_path(ctx: Context) -> Path:
    return ctx.resume.path if ctx.resume else ctx.out_dir / "resume.pt"


def _saver(ctx: Context, order: torch.Generator, mlrun: tracking.Run):
    """What fit calls at each epoch's end: the state, written whole or not at all (a new file, synced, then
    renamed over the old one), with the order generator and the config needed to rebuild the run."""
    path = _state_path(ctx)
    path.parent.mkdir(parents=True, exist_ok=True)
    mlrun.set_tags({trial.RESUME_STATE: str(path.resolve())})
    saved_config = mask_values(OmegaConf.to_container(ctx.cfg, resolve=True))  # resume=RUN_ID takes mlflow.* anew
    saved_config["data"]["root"] = _absolute(ctx.settings.data.root)

    def save(snapshot: dict) -> None:
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save({**snapshot, "order": order.get_state(), "config": saved_config}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:  # a full disk, or a signal mid-write: the last whole state stays, no half file
            tmp.unlink(missing_ok=True)
            raise

    return save


def _log_missing_epochs(mlrun: tracking.Run, rows: list[dict]) -> None:
    """An epoch saved in the state but killed before its metrics reached MLflow is logged now, once."""
    logged = mlrun.logged_steps("train/loss")
    for row in rows:
        if row["epoch"] not in logged:
            mlrun.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])


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
    text = mask_secrets(OmegaConf.to_yaml(cfg, resolve=True))
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


def run_name(hc, swept_keys: list[str] | None = None, numbered: bool = False) -> str:
    """What the UI lists a run as: a trial by its values of the swept keys only (``hidden=64 optimizer=sgd``,
    ``#<trial>`` in front where values may repeat), a single run by what was overridden; short, values rounded."""
    if hc is None:
        return "run"
    overrides = list(hc.overrides.task)
    if swept_keys is not None:
        return sweep.trial_name(swept_keys, overrides, int(hc.job.num), numbered)
    exclude = set(OmegaConf.select(hc, "job.config.override_dirname.exclude_keys") or [])
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o]
    return sweep.trial_name([k for k in keys if k not in exclude], overrides, None)


def params(cfg: DictConfig, hc) -> dict[str, object]:
    """The settings the run used, as dotted keys: the resolved config without what is unset (None), what the
    run did not use (``_unused``) and where things go (``mlflow.*``, ``sweep.*``, ``trainer.progress``); plus
    the option of each config group whose name says something the values do not (``choice.model=deep``)."""
    flat = config.flatten(OmegaConf.to_container(cfg, resolve=True))
    flat = {k: v for k, v in flat.items() if not k.startswith(("optimizer._", "mlflow.", "sweep."))}
    flat["optimizer.name"] = str(cfg.optimizer._target_).rsplit(".", 1)[-1].lower()
    unused = _unused(flat) | {"trainer.progress"}
    flat = {k: v for k, v in flat.items() if v is not None and k not in unused}
    if hc is not None:
        for group, choice in hc.runtime.choices.items():
            if _tells_something(group, choice):
                flat[f"choice.{group}"] = choice
    return flat


def _unused(flat: dict[str, object]) -> set[str]:
    """Keys of features the run did not use: a search's settings outside a search, the distortions' magnitudes
    with augmentation off, the parts of the schedule it skips, the torchvision loader's workers."""
    unused = set()
    if flat.get("optuna.study") is None:
        unused |= {k for k in flat if k.startswith("optuna.")}
    if not flat.get("data.augment.strength"):
        unused |= {k for k in flat if k.startswith("data.augment.") and k != "data.augment.strength"}
    elif not flat.get("data.augment.elastic_alpha"):
        unused.add("data.augment.elastic_sigma")
    if not flat.get("scheduler.warmup"):
        unused.add("scheduler.start")
    if flat.get("scheduler.decay") == "none":
        unused.add("scheduler.final")
    if flat.get("data.loader") != "torchvision":
        unused.add("data.num_workers")
    if "optimizer.momentum" in flat and not flat["optimizer.momentum"]:
        unused.add("optimizer.nesterov")
    return unused


def _tells_something(group: str, choice: str | None) -> bool:
    """Whether ``choice.<group>`` adds information: not Hydra's own groups, not unset, not where runs are
    logged (mlflow), not a group with one option, not one whose option is a logged value already
    (``optimizer.name``, ``data.name``, ``device.type``)."""
    if choice is None or group.startswith(("hydra/", "schema/")) or group in ("base_config", "mlflow"):
        return False
    return group not in sweep.GROUP_PARAMS and len(list((CONF_DIR / group).glob("*.yaml"))) > 1


def _name(ctx: Context) -> str:
    if ctx.settings.mlflow.run_name:
        return ctx.settings.mlflow.run_name
    if ctx.trial is None:
        return run_name(ctx.hc)
    swept = json.loads(_parent_tags(ctx).get("sweep.swept_keys", "null") or "null")
    if swept is None:  # no parent found: what was overridden
        return run_name(ctx.hc)
    name = run_name(ctx.hc, swept, numbered=ctx.settings.optuna.trial is not None)  # a search may repeat values
    if not name.startswith("#") and tracking.sibling_named(ctx.experiment_id, ctx.trial.parent_id, name):
        name = run_name(ctx.hc, swept, numbered=True)
    return name


_PARENT_TAGS: dict[str, dict[str, str]] = {}


def _parent_tags(ctx: Context) -> dict[str, str]:
    """The sweep's run's tags (read once per process and sweep): its swept keys, its source."""
    parent = _parent(ctx)
    if parent is None:
        return {}
    if parent not in _PARENT_TAGS:
        _PARENT_TAGS.clear()
        _PARENT_TAGS[parent] = tracking.run_tags(parent)
    return _PARENT_TAGS[parent]


def _parent(ctx: Context) -> str | None:
    return ctx.trial.parent_id if ctx.trial is not None else None


def _tags(ctx: Context) -> dict[str, str]:
    """Tags beside the ones tracking.start_run adds (source, user, owner): code, versions, device, config.
    A trial's source is its sweep's command (a worker process's own is the launcher's machinery)."""
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
        tags["trial.overrides"] = json.dumps([mask_secrets(o) for o in ctx.hc.overrides.task])[:5000]
        tags["torch.threads"] = str(torch.get_num_threads())
        source = ("mlflow.source.name", "mlflow.source.type")
        tags.update({k: v for k, v in _parent_tags(ctx).items() if k in source})
    # The run's page shows how to get this run again: its own overrides as one plain run (a trial's included).
    if ctx.resume is None:  # a continued run keeps the command it was first started with
        command = _reproduce(ctx)
        tags["command"] = command
        tags["mlflow.note.content"] = (
            f"Reproduce this run:\n\n    {command}\n\nIf it was interrupted, continue it: "
            "`python train.py resume=<this run's id>` (a relaunched sweep does so by itself)."
        )
    tags.update(tracking.slurm_tags())  # a SLURM job (submitit_slurm): its id, and which start of it
    return tags


def _reproduce(ctx: Context) -> str:
    """``python train.py OVERRIDES``: this run alone (a search's bookkeeping left out, its test run kept as is)."""
    overrides = list(ctx.hc.overrides.task) if ctx.hc is not None else []
    kept = [o for o in overrides if not o.startswith(("optuna.", "hydra."))]
    return " ".join(["python train.py", *(shlex.quote(mask_secrets(o)) for o in kept)])


def _link(ctx: Context, run_id: str) -> str:
    """The run's page in the MLflow UI (and, for a local store, how to start the UI)."""
    m = ctx.settings.mlflow
    base = tracking.ui_base(m.ui_url, m.tracking_uri)
    return tracking.run_link(base, ctx.experiment_id, run_id) + tracking.serve_hint(m.ui_url, m.tracking_uri)


def _log_dataset(ctx: Context, mlrun: tracking.Run, loaders: data.Loaders) -> None:
    """The splits the run used, as MLflow dataset inputs: the dataset's name, where its files are, and per split a
    digest of the files' SHA-256 (the published ones the files were checked against; computed when data.verify
    is off) and of how the split was carved (data.val_size, data.split_seed)."""
    d = ctx.settings.data
    files = data.find_files(Path(_absolute(d.root)), d.name)
    if files is None:
        return
    known = data.DATASETS[d.name].sha256
    sha = {base: known[base] if d.verify else data.sha256_of(path) for base, path in files.items()}

    def digest(split: str, *parts) -> str:
        hashes = [sha[data.FILES[(split, kind)]] for kind in ("images", "labels")]
        return hashlib.sha256(json.dumps([hashes, *parts]).encode()).hexdigest()[:8]

    carved = {"val_size": d.val_size, "split_seed": d.split_seed}
    splits = {"train": (digest("train", carved, "train"), {"num_rows": loaders.n_train})}
    if loaders.n_val:
        splits["validation"] = (digest("train", carved, "validation"), {"num_rows": loaders.n_val})
    if ctx.settings.trainer.test:
        splits["test"] = (digest("test"), {"num_rows": loaders.n_test})
    folder = next(iter(files.values())).parent
    tracking.log_dataset(mlrun.id, d.name, str(folder), splits)


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
