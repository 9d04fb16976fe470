"""Smart search: a Hydra sweeper on current Optuna, with pruning and resumable studies.

``python train.py -m hydra/sweeper=optuna`` asks Optuna's TPE sampler (seeded) for one configuration at a
time, launches it through Hydra's launcher like any trial, and tells Optuna the validation accuracy the task
function returns. Three things the published ``hydra-optuna-sweeper`` (which pins optuna<3) does not do:

* **pruning** - each trial reports val/acc after every epoch to the study's storage and stops early when the
  pruner (``median``, ``asha`` or ``hyperband``; ``none`` turns pruning off) judges it hopeless; it is
  recorded as PRUNED in Optuna and tagged ``pruned=true`` on its (FINISHED) MLflow run, never as failed;
* **resume** - the study lives in a database (``sqlite:///mlruns/optuna.db`` by default, or PostgreSQL);
  relaunching the same command continues it, reruns trials an interrupted launch left RUNNING, and only
  runs what is missing of ``n_trials``;
* **the choice, then the exam** - trials never look at the test set; when the search ends, the best trial's
  config is written as ``conf/experiment/<best_preset>.yaml`` (with what the sweep's own ``experiment=``
  preset set, so it stands alone) and run once more with ``trainer.test=true``, so the test accuracy is
  measured once, after the choice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mnist_sweep import UserError
from mnist_sweep.config import flatten

log = logging.getLogger("mnist_sweep.search")

PRUNED_ATTR = "pruned_at_epoch"


class SearchError(UserError):
    """A search space or study setting that cannot work."""


# ------------------------------------------------------------------------------------------------------------
# The search space: Hydra's own sweep syntax, turned into Optuna distributions
# ------------------------------------------------------------------------------------------------------------


def parse_space(overrides: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Split overrides into fixed ``key=value`` strings and search dimensions.

    Dimensions use Hydra's override grammar: ``choice(128,256,512)`` or ``128,256,512`` (categorical),
    ``range(1,5)`` (integers, categorical), ``interval(0.0,0.5)`` (float), ``int(interval(64,1024))``
    (integer), ``tag(log, interval(1e-4,1e-2))`` (log scale).
    """
    import optuna.distributions as D
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    fixed: list[str] = []
    space: dict[str, Any] = {}
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.get_key_element()
        if not override.is_sweep_override():
            fixed.append(override.input_line or f"{key}={override.get_value_element_as_str()}")  # as typed
            continue
        value = override.value()
        if isinstance(value, ChoiceSweep):
            choices = [_plain(v) for v in value.list]
            space[key] = D.CategoricalDistribution(choices)
        elif isinstance(value, RangeSweep):
            space[key] = D.CategoricalDistribution(list(override.sweep_iterator()))
        elif isinstance(value, IntervalSweep):
            log_scale = "log" in value.tags
            if isinstance(value.start, int) and isinstance(value.end, int):
                space[key] = D.IntDistribution(int(value.start), int(value.end), log=log_scale)
            else:
                space[key] = D.FloatDistribution(float(value.start), float(value.end), log=log_scale)
        else:
            raise SearchError(f"{key}: cannot search over {type(value).__name__}; use choice(), range() or interval()")
    return fixed, space


def _plain(value: Any) -> Any:
    """Optuna's categorical choices must be None, bool, int, float or str."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def as_override(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return f"{key}={str(value).lower()}"
    if isinstance(value, float):
        return f"{key}={value!r}"
    return f"{key}={value}"


def preset_yaml(params: dict[str, Any], header: str, groups: set[str]) -> str:
    """A ``conf/experiment`` preset that sets every key in ``params`` (dotted keys become nested YAML).

    Keys that name a config group (``groups``) pick that group's option (``override /optimizer: sgd``); the
    others are values (``seed: 1``).
    """
    groups = {k for k in params if k in groups}
    tree = OmegaConf.create()
    for key, value in params.items():
        if key in groups:
            continue
        OmegaConf.update(tree, key, value, force_add=True)
    defaults = "".join(f"  - override /{g}: {params[g]}\n" for g in sorted(groups))
    body = OmegaConf.to_yaml(tree) if len(tree) else ""
    return f"# @package _global_\n{header}" + (f"defaults:\n{defaults}" if defaults else "") + body


# ------------------------------------------------------------------------------------------------------------
# Inside a trial: report each epoch, learn whether to stop
# ------------------------------------------------------------------------------------------------------------


class TrialReporter:
    """The trial's side of pruning: ``report(epoch, val_acc)`` returns True when the trial should stop."""

    def __init__(self, storage: str, study: str, trial_number: int, pruner):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # The pruner is not stored with the study: the sweeper passes its settings to every trial.
        self.study = optuna.load_study(study_name=study, storage=storage, pruner=pruner)
        trial_id = next(t._trial_id for t in self.study.get_trials(deepcopy=False) if t.number == trial_number)
        self.trial = optuna.trial.Trial(self.study, trial_id)

    def report(self, epoch: int, value: float) -> bool:
        self.trial.report(value, step=epoch)
        if self.trial.should_prune():
            self.trial.set_user_attr(PRUNED_ATTR, epoch)
            return True
        return False


def reporter(o, max_epochs: int) -> TrialReporter | None:
    """The reporter for this run when it is a trial of a search (the sweeper sets ``optuna.*``)."""
    if o.trial is None:
        return None
    pruner = make_pruner(o.pruner, o.warmup_epochs, o.startup_trials, max_epochs)
    return TrialReporter(o.storage, o.study, o.trial, pruner)


# ------------------------------------------------------------------------------------------------------------
# The sweeper
# ------------------------------------------------------------------------------------------------------------


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.mnist_sweep_optuna.OptunaSweeper"  # the sweeper class Hydra instantiates
    n_trials: int = 20  # trials in the study, counting those a resumed study already ran
    n_jobs: int = 1  # trials launched together (use with hydra/launcher=joblib)
    seed: int = 0  # the TPE sampler's seed: the same seed asks the same configs
    direction: str = "maximize"  # maximize the objective the task returns (validation accuracy)
    study_name: str | None = None  # default: the MLflow experiment's name + "-search"
    storage: str | None = "sqlite:///mlruns/optuna.db"  # the study's database; relaunching resumes the study
    pruner: str = "median"  # none | median | asha | hyperband
    warmup_epochs: int = 1  # epochs every trial runs before it may be pruned
    startup_trials: int = 5  # trials that finish unpruned before pruning starts
    best_preset: str | None = "found"  # conf/experiment/<name>.yaml gets the best config; null = don't write
    preset_dir: str | None = None  # where that file goes; default: the experiment/ folder of the primary conf dir
    test_best: bool = True  # rerun the best config once with trainer.test=true
    params: dict[str, str] = field(default_factory=dict)  # key: sweep expression, e.g. "choice(128,256)"


def make_pruner(name: str, warmup_epochs: int, startup_trials: int, max_epochs: int):
    import optuna

    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs)
    if name == "asha":
        # Successive halving (ASHA, Li et al. 2020), one bracket: at epoch warmup_epochs, then at 4x that (and 16x,
        # ...), a trial goes on only if it is in the top quarter of the trials that reached that epoch. Optuna's
        # default reduction factor, 4. Unlike Hyperband, the sampler learns from all the trials as one study.
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, warmup_epochs), reduction_factor=4)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, warmup_epochs), max_resource=max_epochs)
    raise SearchError(f"hydra.sweeper.pruner={name} is not a pruner; choose none, median, asha or hyperband")


class OptunaSweeperImpl:
    """Hydra's sweeper contract (setup, sweep) around an Optuna ask-and-tell loop."""

    def __init__(self, **kwargs: Any):
        self.cfg = OptunaSweeperConf(**{k: v for k, v in kwargs.items() if k != "_target_"})
        self.params = dict(self.cfg.params or {})
        self.launcher = None
        self.config: DictConfig | None = None
        self.hydra_context = None
        self.job_idx = 0
        self.storage: str | None = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> list:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        c = self.cfg
        fixed, space = parse_space([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        if not space:
            raise SearchError("the search space is empty: give hydra.sweeper.params or sweep values (e.g. a=1,2)")
        if OmegaConf.select(self.config, "data.val_size") == 0:  # before the study exists or any trial runs
            raise SearchError(
                "data.val_size=0 leaves no validation split for the search to maximise: search with "
                "data.val_size=5000, then refit the chosen preset on all 60,000 with data.val_size=0"
            )
        study = self._open_study()
        # Every finished trial counts towards n_trials, as in the launch that ran it: a diverged (FAIL) trial is the
        # search's outcome, not a slot to fill again. Only the interrupted ones, queued again, are rerun.
        done = [t for t in study.trials if t.state.is_finished() and not t.user_attrs.get("interrupted")]
        remaining = c.n_trials - len(done)
        log.info(
            "study %r in %s: %d trials done, %d to run (%s)",
            study.study_name,
            self.storage,
            len(done),
            max(0, remaining),
            ", ".join(f"{k} ~ {_describe(d)}" for k, d in space.items()),
        )
        failed, returns = 0, []
        while remaining > 0:
            n = min(c.n_jobs, remaining)
            batch_failed, batch_returns = self._run_batch(study, [study.ask(space) for _ in range(n)], fixed)
            failed += batch_failed
            returns += batch_returns
            remaining -= n
        returns += self._conclude(study, fixed)
        if failed:
            raise SearchError(f"{failed} of the search's trials failed (see their MLflow runs' error tags)")
        return returns

    def _open_study(self):
        """Create the study, or load it to resume, and queue again what a killed launch left RUNNING."""
        import optuna

        c = self.cfg
        self.storage = _absolute_sqlite(c.storage)
        epochs = int(OmegaConf.select(self.config, "trainer.epochs", default=1))
        study = optuna.create_study(
            study_name=c.study_name or f"{self.config.mlflow.experiment}-search",
            storage=self.storage,
            direction=c.direction,
            sampler=optuna.samplers.TPESampler(seed=c.seed),
            pruner=make_pruner(c.pruner, c.warmup_epochs, c.startup_trials, epochs),
            load_if_exists=True,
        )
        self._rerun_interrupted(study)
        return study

    def _run_batch(self, study, trials: list, fixed: list[str]) -> tuple[int, list]:
        """Launch the asked trials together, then tell the study how each ended; returns (failed, returns)."""
        import optuna
        from hydra.core.utils import JobStatus

        c = self.cfg
        bookkeeping = [
            f"optuna.storage={self.storage}",
            f"optuna.study={study.study_name}",
            f"optuna.pruner={c.pruner}",
            f"optuna.warmup_epochs={c.warmup_epochs}",
            f"optuna.startup_trials={c.startup_trials}",
            "trainer.test=false",  # trials are judged on validation only
        ]
        batch = [
            fixed + [as_override(k, v) for k, v in t.params.items()] + [*bookkeeping, f"optuna.trial={t.number}"]
            for t in trials
        ]
        results = self.launcher.launch(batch, initial_job_idx=self.job_idx)
        self.job_idx += len(batch)
        failed = 0
        for trial, ret in zip(trials, results, strict=True):
            frozen = study._storage.get_trial(trial._trial_id)
            if ret.status == JobStatus.COMPLETED and PRUNED_ATTR in frozen.user_attrs:
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            elif ret.status == JobStatus.COMPLETED:
                study.tell(trial, float(ret.return_value))
            else:
                failed += 1
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return failed, list(results)

    def _conclude(self, study, fixed: list[str]) -> list:
        """Name the best trial, write it as a preset and, with test_best, run it once with the test set."""
        best = study.best_trial
        log.info(
            "best trial #%d: val/acc %.4f with %s",
            best.number,
            best.value,
            " ".join(as_override(k, v) for k, v in best.params.items()),
        )
        summary = self._write_preset(fixed, best, study.study_name)
        returns = []
        if self.cfg.test_best:
            final = fixed + [as_override(k, v) for k, v in best.params.items()] + ["trainer.test=true"]
            (ret,) = self.launcher.launch([final], initial_job_idx=self.job_idx)
            self.job_idx += 1
            returns.append(ret)
            ret.return_value  # noqa: B018  (raises the job's error, if it failed)
        if summary:
            log.info("%s", summary)
        return returns

    def _rerun_interrupted(self, study) -> None:
        """Trials a killed launch left RUNNING are failed and queued again with the same parameters."""
        import optuna

        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)  # failed by no fault of its own
            study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
            study.enqueue_trial(t.params)
            log.info("trial #%d was interrupted: queued again", t.number)

    def _experiment_settings(self, fixed: list[str]) -> dict[str, Any]:
        """The config groups and values that ``experiment=X`` (if among ``fixed``) changed, as overrides.

        Found by composing the config as the trials did, then without X but with its picks of the hydra/ groups
        (the sweeper's own overrides need them) and of the config groups, and comparing the two.
        """
        experiment = [o for o in fixed if o.split("=", 1)[0].lstrip("+") == "experiment"]
        if not experiment:
            return {}
        rest = [o for o in fixed if o not in experiment]
        load = self.hydra_context.config_loader.load_sweep_config
        try:
            full = load(self.config, fixed)
            choices = {g: c for g, c in full.hydra.runtime.choices.items() if c is not None}
            pins = [f"{g}={c}" for g, c in choices.items() if g.startswith("hydra/")]
            plain = load(self.config, rest + pins).hydra.runtime.choices
            groups = {
                g: c
                for g, c in choices.items()
                if not g.startswith(("hydra/", "schema/"))
                and g not in ("experiment", "base_config")
                and plain.get(g) != c
            }
            same = load(self.config, rest + pins + [f"{g}={c}" for g, c in groups.items()])
        except Exception as e:  # the search has run: write what is known rather than lose the result
            log.warning(
                "could not tell what %s set (%s): the preset holds the search's own keys only", experiment[0], e
            )
            return {}
        before = _leaves(same)
        values = {k: v for k, v in _leaves(full).items() if not k.startswith(NOT_IN_PRESET) and before.get(k) != v}
        return {**groups, **values}

    def _write_preset(self, fixed: list[str], best, study_name: str) -> str | None:
        name = self.cfg.best_preset
        if not name:
            return None
        folder = Path(self.cfg.preset_dir) if self.cfg.preset_dir else _primary_conf_dir(self.config) / "experiment"
        import yaml

        # What the sweep's own experiment preset set comes first (the search preset's 10 epochs, say), so the new
        # preset stands alone; then the command line's fixed overrides; then the trial's choices.
        params: dict[str, Any] = self._experiment_settings(fixed)
        for item in fixed:
            key, value = item.split("=", 1)
            if not key.startswith(NOT_IN_PRESET):
                params[key.lstrip("+")] = yaml.safe_load(value) if value else value
        params.update(best.params)
        header = (
            f"# Written by the Optuna search {study_name!r}: trial #{best.number}, val/acc {best.value:.4f}.\n"
            f"# Rerun: python train.py experiment={name}\n"
        )
        path = folder / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(preset_yaml(params, header, set(self.config.hydra.runtime.choices)))
        return f"best config written to {path}; rerun it with: python train.py experiment={name}"


# Where things go and how a search is run: not part of a recipe.
NOT_IN_PRESET = ("hydra.", "hydra/", "optuna.", "mlflow.", "data.root", "data.cache_dir", "experiment")


def _leaves(cfg: DictConfig) -> dict[str, Any]:
    """The task config's values by dotted key (``trainer.epochs``), interpolations unresolved; hydra's left out."""
    return flatten({k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if k != "hydra"})


def _describe(d) -> str:
    import optuna.distributions as D

    if isinstance(d, D.CategoricalDistribution):
        return "{" + ",".join(map(str, d.choices)) + "}"
    return f"[{d.low}, {d.high}]" + (" log" if d.log else "")


def _absolute_sqlite(uri: str | None) -> str | None:
    """Trials may run in other folders or processes: pin a relative SQLite path to an absolute one."""
    if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri[len("sqlite:///") :]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    return uri


def _primary_conf_dir(config: DictConfig) -> Path:
    for source in config.hydra.runtime.config_sources:
        if source.provider == "main" and source.schema == "file":
            return Path(source.path)
    return Path(__file__).resolve().parent.parent / "conf"
