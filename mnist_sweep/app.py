"""The one module that talks to Hydra: it turns a composed config into a tracked training run.

``train.py`` hands every job of ``python train.py [-m] ...`` to ``task`` (which calls ``run``) and wraps the
whole command in ``cli``, which prints a user's mistake as one line instead of a traceback.

The order of ``run`` is deliberate: everything that can fail because of the user's input (config values,
device, tracking store, data files) is checked before the first batch is trained.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mnist_sweep import UserError, config

log = logging.getLogger("mnist_sweep")
REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"

config.register()


def _quiet_libraries() -> None:
    # MLflow and its database layer log every table migration and experiment creation at INFO.
    import mlflow  # noqa: F401  (mlflow sets its own log level when imported: import first, then quieten)

    for name in ("mlflow", "alembic", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore", module=r"mlflow(\..*)?")
    warnings.filterwarnings("ignore", message=r".*pkg_resources.*")


def _sigterm_to_interrupt() -> None:
    """Let SIGTERM (a scheduler or `kill`) unwind like Ctrl-C, so the MLflow run is closed as KILLED."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def _hydra_info():
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def _in_sweep(hc) -> bool:
    """Whether this job is a trial of a multirun (`python train.py -m ...`)."""
    return hc is not None and hc.mode is not None and hc.mode.name == "MULTIRUN"


def run_name(hc) -> str:
    """Runs of a sweep are told apart by what was overridden: ``model.hidden=128 optimizer=sgd``."""
    if hc is None:
        return "run"
    name = hc.job.override_dirname
    return name if name else "defaults"


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


def task(cfg: DictConfig) -> float:
    """Hydra's task function: one job of `python train.py [-m]`. Returns the objective, validation accuracy."""
    try:
        return run(cfg)
    except UserError as e:
        if not _in_sweep(_hydra_info()):
            # A single run: one line and out, before Hydra adds its own report of the failed job.
            print(f"error: {e}", file=sys.stderr)
            sys.exit(e.exit_code)
        # In a sweep, Hydra goes on to the next job and reports this one's error at the end: say it now.
        log.error("run failed: %s", e)
        raise
    except Exception as e:
        log.error("run failed: %s: %s", type(e).__name__, e)
        raise


def run(cfg: DictConfig) -> float:
    """One training run: check, load, train, evaluate, log. Returns the validation accuracy (the objective)."""
    import torch
    from hydra.utils import instantiate

    from mnist_sweep import model, plots, search, sweep, tracking, training

    _quiet_libraries()
    _sigterm_to_interrupt()
    hc = _hydra_info()
    out_dir = Path(hc.runtime.output_dir) if hc else Path.cwd()

    # 1. Check everything the user gave us, cheapest first, before any compute is spent.
    settings = config.check(cfg)
    device = training.resolve_device(settings.device.type)
    experiment_id = tracking.prepare(settings.mlflow.tracking_uri, settings.mlflow.experiment)
    threads = settings.device.threads
    in_sweep = _in_sweep(hc)
    trial = sweep.begin_trial(experiment_id, hc) if in_sweep else None
    if trial is not None:
        # Resume: a config that already FINISHED in this experiment is not trained again.
        previous = None if settings.sweep.rerun else sweep.previous_result(experiment_id, config.config_hash(cfg))
        if previous is not None:
            trial.reused_from = previous.info.run_id
            objective = float(previous.data.metrics[sweep.OBJECTIVE_METRIC])
            print(
                f"skipped: this config already FINISHED as mlflow run {previous.info.run_id} "
                f"(val/acc {objective:.4f}); "
                "sweep.rerun=true trains it again"
            )
            return objective
        # Parallel trials share the machine: divide the cores (and the GPUs) between them.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = threads or sweep.trial_threads(hc.launcher, trial.n_trials, cores)
        if device.type == "cuda" and device.index is None:
            n_parallel = sweep.parallel_jobs(hc.launcher, trial.n_trials, cores)
            device = torch.device(sweep.trial_device("cuda", trial.num, n_parallel, torch.cuda.device_count()))
    if threads:
        torch.set_num_threads(threads)
    # Optimizer state that decays towards zero passes through the subnormal floats, where the CPU slows down
    # many times over: without this the best preset's epochs 26-30 took 2.2x as long (docs/BENCHMARKS-denormal.md).
    torch.set_flush_denormal(settings.device.flush_denormal)

    # 2. The raw material and the conveyor belts (data.py). Seeded: same seed + config => same run.
    torch.manual_seed(settings.seed)
    order = torch.Generator().manual_seed(settings.seed)  # the order batches are drawn in, every epoch
    d = settings.data
    t0 = time.perf_counter()
    loaders = make_loaders(settings, device, order)
    data_seconds = time.perf_counter() - t0
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
        data_seconds,
    )

    # 3. The student (model.py) and how it learns (an optimizer from conf/optimizer/, a schedule).
    m = settings.model
    model_args = make_model_args(settings, len(loaders.classes))
    net = model.build(**model_args).to(device)
    optimizer = instantiate(cfg.optimizer, _convert_="all")(net.parameters())

    tags = {
        **tracking.git_state(REPO),
        **tracking.version_tags(),
        "device": str(device),
        "device.name": training.device_name(device),
        "config_hash": config.config_hash(cfg),
        "hydra.output_dir": str(out_dir),
    }
    if in_sweep:
        tags["hydra.job.num"] = str(hc.job.num)
        tags[sweep.SWEEP_DIR] = sweep.sweep_dir(hc)
        tags["trial.overrides"] = json.dumps(list(hc.overrides.task))[:5000]
        tags["torch.threads"] = str(torch.get_num_threads())
    name = settings.mlflow.run_name or run_name(hc)
    log.info(
        "model: %s, %d weights; optimizer: %s; mlflow run %r",
        _describe(m),
        model.count_params(net),
        type(optimizer).__name__,
        name,
    )

    with tracking.start_run(experiment_id, name, tags, trial.parent_id if trial else None) as mlrun:
        if trial is not None:
            trial.run_id = mlrun.id
        mlrun.log_params(params(cfg, hc))
        rows: list[dict] = []

        # In an Optuna search, each epoch's val/acc goes to the study, whose pruner may stop the trial.
        pruner = search.reporter(settings.optuna, settings.trainer.epochs)

        def on_epoch(er: training.EpochResult) -> bool:
            metrics = er.metrics()
            mlrun.log_metrics(metrics, step=er.epoch)  # one batched write per epoch
            rows.append({"epoch": er.epoch, **metrics})
            log.info(er.summary(settings.trainer.epochs))
            if pruner is not None and pruner.report(er.epoch, er.val_acc):
                mlrun.set_tags({"pruned": "true", "pruned_at_epoch": er.epoch})
                if trial is not None:
                    trial.note = f"pruned at epoch {er.epoch}"
                log.info("pruned: the search judged this trial hopeless after epoch %d", er.epoch)
                return True
            return False

        # 4. The lessons (training.py): train on the book, check on the mock exam after each epoch.
        t = settings.trainer
        fitted = training.fit(
            net,
            loaders.train,
            loaders.val,
            optimizer,
            device=device,
            num_classes=len(loaders.classes),
            on_epoch=on_epoch,
            progress=t.progress,
            **fit_options(settings),
        )

        # Without a validation split (data.val_size=0) there is no best_val/acc: the run has no objective.
        validated = fitted.epochs[-1].validated
        final = {
            "best_epoch": fitted.best_epoch,
            **({"best_val/acc": fitted.val_acc} if validated else {}),
            "train_time_s": fitted.train_seconds,
            "data_time_s": data_seconds,
        }
        # Test-time augmentation (trainer.tta_views): the final scores are each image's vote averaged with its
        # distorted copies; the plain ones are kept beside them. Each split gets the same copies on every run.
        n_classes, objective = len(loaders.classes), fitted.val_acc

        def tta(split):
            copies = tta_augmenter(d.augment, t.tta_strength, device)
            return training.evaluate(net, split, device, n_classes, t.precision, copies, t.tta_views)

        if t.tta_views and validated:
            final["best_val/acc_plain"] = fitted.val_acc
            final["best_val/acc"] = objective = tta(loaders.val).acc
        val_text = f"{objective:.4f}" if validated else "none (data.val_size=0)"
        # 5. The exam it has never seen: the official test set, reported once, never used to choose anything.
        #    (A search's trials skip it: trainer.test=false. The chosen config is tested once, afterwards.)
        test = None
        if t.test:
            t_eval = time.perf_counter()
            test = training.evaluate(net, loaders.test, device, n_classes, t.precision)
            if t.tta_views:
                final["test/acc_plain"] = test.acc
                test = tta(loaders.test)
            eval_seconds = time.perf_counter() - t_eval
            final.update({"test/loss": test.loss, "test/acc": test.acc, "test_eval_time_s": eval_seconds})
            final.update({f"test/acc_class_{i}": a for i, a in enumerate(test.per_class_acc)})
            log.info(
                "test: loss %.4f acc %.4f (%d images, %.2f s) | val acc %s | training %.1f s",
                test.loss,
                test.acc,
                loaders.n_test,
                eval_seconds,
                val_text,
                fitted.train_seconds,
            )
        mlrun.log_metrics(final, step=fitted.best_epoch)

        # 6. The lab notebook (tracking.py): config beside the weights, the per-epoch log, the confusion matrix.
        example = loaders_example(loaders, d.mean, d.std)  # a few images, kept with the weights
        _save_artifacts(out_dir, cfg, net, model_args, d, loaders.classes, rows, test, plots, example)
        for item in ("config.yaml", "epochs.csv", "confusion_matrix.png", "confusion_matrix.csv"):
            if (out_dir / item).exists():
                mlrun.log_artifact(out_dir / item)
        mlrun.log_artifacts(out_dir / "checkpoint", "checkpoint")
        if (out_dir / ".hydra").is_dir():
            mlrun.log_artifacts(out_dir / ".hydra", "hydra")
        # In a sweep the best trial's model is logged when the sweep ends (sweep.finish), from its checkpoint.
        if settings.mlflow.log_model and (not in_sweep or settings.mlflow.sweep_models == "all"):
            classifier = model.Classifier(net, d.mean, d.std, d.deskew)
            mlrun.log_model(classifier, example.numpy(), settings.mlflow.model_format)
        _flush_logs()
        for log_file in out_dir.glob("*.log"):
            mlrun.log_artifact(log_file)

    tested = f"test/acc {test.acc:.4f}" if test is not None else "test set not used (trainer.test=false)"
    print(f"val/acc {val_text}  {tested}  ({fitted.train_seconds:.1f} s training)  mlflow run {mlrun.id}")
    return float(objective)


# From the checked settings to the pipeline's pieces (shared with the benchmark, mnist_sweep/bench.py).


def make_loaders(settings, device, order):
    """The conveyor belts for ``settings.data`` (data.py), batches drawn in the order of the ``order`` generator."""
    from mnist_sweep import data

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


def make_model_args(settings, num_classes: int) -> dict:
    """The plain arguments of model.build (saved beside the weights, so a checkpoint can be rebuilt).

    ``members`` is saved only for an ensemble, so a single net's arguments still build ``model.MLP`` directly.
    """
    keys = ("hidden", "depth", "activation", "dropout", "norm", "input_dropout")
    args = {**{k: getattr(settings.model, k) for k in keys}, "num_classes": num_classes}
    if settings.model.members > 1:
        args["members"] = settings.model.members
    return args


def fit_options(settings) -> dict:
    """training.fit's keyword arguments that come from the config: the trainer, schedule and augmentation."""
    t = settings.trainer
    return dict(
        epochs=t.epochs,
        schedule=make_schedule(settings),
        precision=t.precision,
        patience=t.patience,
        grad_clip=t.grad_clip,
        label_smoothing=t.label_smoothing,
        max_loss=t.max_loss,
        augment=_augmenter(settings.data.augment),
    )


def make_schedule(settings):
    """The learning-rate multiplier ``schedule(step, total)`` of ``settings.scheduler``."""
    from mnist_sweep import training

    s = settings.scheduler
    return lambda step, total: training.lr_multiplier(step, total, s.warmup, s.start, s.decay, s.final)


def loaders_example(loaders, mean: float, std: float):
    """A few validation images as the exported model expects them: ToTensor's 0..1 scale, [N,1,28,28].

    (With data.deskew they are the deskewed images: still valid input, as deskewing an upright digit again
    changes little.)
    """
    x, _ = next(iter(loaders.val if len(loaders.val) else loaders.test))
    return (x[:4].detach().float().cpu() * std + mean).clamp(0, 1)


def _save_artifacts(out_dir, cfg, net, model_args, d, classes, rows, test, plots, example) -> None:
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    # The config is saved beside the weights, so a checkpoint can always be rebuilt (model.load_checkpoint).
    ckpt = out_dir / "checkpoint"
    ckpt.mkdir(exist_ok=True)
    (ckpt / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    torch.save(
        {
            "model_args": model_args,
            "mean": d.mean,
            "std": d.std,
            "deskew": d.deskew,
            "classes": list(classes),
            "state_dict": {k: v.cpu() for k, v in net.state_dict().items()},
            "example": example,  # input example for a model logged later from this checkpoint
        },
        ckpt / "model.pt",
    )
    with open(out_dir / "epochs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if test is None:
        return
    with open(out_dir / "confusion_matrix.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true\\predicted", *classes])
        for name, counts in zip(classes, test.confusion.tolist(), strict=True):
            writer.writerow([name, *counts])
    plots.confusion_matrix_png(
        test.confusion,
        classes,
        out_dir / "confusion_matrix.png",
        f"test set confusion matrix (accuracy {test.acc:.2%})",
    )


def _augmenter(a, kind=None):
    """The training batches' distortion (mnist_sweep/augment.py), or None when data.augment.strength is 0.

    ``kind``: an Augment subclass to build instead (bench_augment times the old elastic field that way)."""
    from mnist_sweep.augment import Augment

    augment = (kind or Augment)(a.strength, a.rotate, a.shear, a.scale, a.shift, a.elastic_alpha, a.elastic_sigma)
    return augment if augment.active else None


def tta_augmenter(a, strength: float, device, seed: int = 0):
    """Test-time augmentation's distortion: ``data.augment``'s magnitudes times ``strength``, drawn from a
    generator of its own seeded with ``seed`` (so every evaluation sees the same copies, and the run's own random
    stream is untouched), or None when every magnitude is 0."""
    import dataclasses

    import torch

    augment = _augmenter(dataclasses.replace(a, strength=strength))
    if augment is not None:
        augment.generator = torch.Generator(device).manual_seed(seed)
    return augment


def _describe(m) -> str:
    shown = (("input dropout", m.input_dropout), ("dropout", m.dropout), ("norm", m.norm))
    extra = "".join(f", {k} {v}" for k, v in shown if v not in (0, 0.0, "none"))
    members = f"{m.members} nets of " if m.members > 1 else ""
    return f"{members}{m.depth} x {m.hidden} {m.activation}{extra}"


def _absolute(path: str) -> str:
    """Relative paths on the command line mean relative to where the user ran the command."""
    from hydra.utils import to_absolute_path

    try:
        return to_absolute_path(os.path.expanduser(path))
    except ValueError:  # outside a Hydra run (tests calling run() directly)
        return os.path.abspath(os.path.expanduser(path))


def _flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()


# ------------------------------------------------------------------------------------------------------------
# The command line: one clear line for every mistake a user can make
# ------------------------------------------------------------------------------------------------------------


def _group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


# Hydra names a launcher/sweeper whose package is not installed only in a RuntimeError.
_MISSING_PLUGIN = re.compile(r"Unknown plugin class : '(hydra_plugins\.hydra_(\w+?)_\w+)\.")


def explain(e: BaseException) -> str:
    """Turn Hydra/OmegaConf/our own errors into one line that names the problem and the fix."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(e, UserError):
        return str(e)
    text = str(e).strip()
    m = _MISSING_PLUGIN.search(text)
    if m:
        package = {"joblib": "hydra-joblib-launcher", "submitit": "hydra-submitit-launcher"}.get(m.group(2), m.group(1))
        return f'the Hydra plugin {m.group(1)} is not installed; pip install {package} (or pip install -e ".[dev]")'
    if isinstance(e, MissingConfigException):
        m = re.search(r"Could not find '([\w/]+)/([^']+)'", text)
        if m:
            group, option = m.groups()
            choices = ", ".join(_group_options(group))
            return f"{group}={option} does not exist; choose one of: {choices} (e.g. {group}={choices.split(', ')[0]})"
    if isinstance(e, OverrideParseException):
        return f"cannot parse the command line: {text.splitlines()[0]}; write overrides as key=value"
    cause = e.__cause__ if isinstance(e, ConfigCompositionException) and e.__cause__ else e
    if isinstance(cause, OmegaConfBaseException):
        key = getattr(cause, "full_key", None)
        msg = str(cause).splitlines()[0].strip()
        m = re.search(r"override '?([^'\s]+)'?", text)
        where = m.group(1).rstrip(".") if m else key
        if "not in" in msg or "Key '" in msg and "not" in msg:
            return f"{where}: no such config key ({msg}); see `python train.py --cfg job` for the keys"
        return f"{where}: {msg}; fix the value on the command line (`python train.py --cfg job` shows the types)"
    if isinstance(e, ConfigCompositionException):
        return text.splitlines()[0] + "; see `python train.py --help`"
    first = text.splitlines()[0] if text else ""
    if isinstance(e, ValueError):  # Hydra's own command-line checks
        return f"{first}; see `python train.py --help`"
    return f"{type(e).__name__}: {first}"


def cli(hydra_main) -> None:
    """Run the ``@hydra.main`` function; print a user's mistake as ``error: ...``, no traceback.

    Mistakes (bad overrides, bad values, missing data...) exit with status 2, a diverged run with 1; anything
    else is a bug and keeps its traceback. Set HYDRA_FULL_ERROR=1 to see every traceback.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from mnist_sweep import sweep

    user_wants_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let exceptions reach us instead of Hydra's multi-line report
    _sigterm_to_interrupt()
    # Our presets conf/hydra/launcher/{joblib,submitit_*}.yaml set a few fields of the plugins' schemas of the
    # same name, which Hydra 1.3 merges as intended while warning that this might change in a later version.
    warnings.filterwarnings("ignore", message=r"(?s).*'hydra/launcher/\w+' is validated against ConfigStore schema")
    try:
        hydra_main()
        summary = sweep.finish()  # normally done by the callback's on_multirun_end already
        if summary is not None and summary.failed:  # a sweeper that keeps going after a failed trial
            print(f"error: {_failed_line(summary)}", file=sys.stderr)
            _exit_now(1)
        _exit_now(0)
    except KeyboardInterrupt as e:
        sweep.finish(e)
        print("interrupted: the MLflow run was closed as KILLED", file=sys.stderr)
        sys.exit(130)
    except BaseException as e:
        if isinstance(e, sweep.StartFailed):  # the sweep could not start (bad value, unreachable store)
            e = e.error
        # Hydra's basic sweeper raises the first failed trial's exception after the batch has run, without
        # calling on_multirun_end: close the sweep here, after every trial, and exit non-zero.
        summary = sweep.finish(e) if not isinstance(e, SystemExit) else None
        if summary is not None and summary.failed and not user_wants_traceback:
            print(f"error: {_failed_line(summary)}", file=sys.stderr)
            _exit_now(1)
        usage = isinstance(e, (UserError, HydraException, OmegaConfBaseException)) or _hydra_usage_error(e)
        usage = usage or _MISSING_PLUGIN.search(str(e)) is not None
        if not usage or user_wants_traceback:
            raise e
        print(f"error: {explain(e)}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))


def _hydra_usage_error(e: BaseException) -> bool:
    """Hydra rejects some command lines with a plain ValueError (e.g. `-m` together with `--cfg`)."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return isinstance(e, ValueError) and tb is not None and "/hydra/" in tb.tb_frame.f_code.co_filename


def _failed_line(summary) -> str:
    first = summary.failed[0]
    return (
        f"{len(summary.failed)} of {len(summary.rows)} trials failed (first: trial {first['trial']}, "
        f"{first.get('note') or 'no reason recorded'}); the leaderboard above lists them, their MLflow runs "
        "hold the tracebacks; fix and relaunch the same command to run only what is missing"
    )


def _exit_now(status: int) -> None:
    """Exit without the interpreter's teardown, once every run is closed and every stream flushed.

    Freeing torch's (CUDA build) library state at interpreter exit takes ~1.4 s here, a tenth of a short run.
    Nothing is lost: MLflow runs are ended and their writes committed before this point.
    """
    from mnist_sweep import sweep

    if sweep.release_workers():
        sys.exit(status)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
