"""The search: Hydra's sweep expressions become Optuna distributions, then Optuna is asked for a batch of trials,
Hydra's launcher runs them, and Optuna is told how each ended, until ``n_trials`` have run.

What a trial is told: the fixed values (from ``params`` and the command line; the command line wins for a key
both give), the ``~key`` deletions, and the parameters Optuna chose. The additions (config.py), where an app turns
them on, also tell it how to report each epoch to the study (``optuna.*``, for pruning) and ``trainer.test=false``
- added with ``++`` where the app's config does not declare those keys, so an app that declares nothing can opt in.

Optuna is imported inside the functions: Hydra imports this module whenever any app starts.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import socket
import threading
import time
import warnings
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import get_method
from omegaconf import DictConfig, ListConfig, OmegaConf

from hydra_plugins.mnist_sweep_optuna.config import Direction, DistributionType

log = logging.getLogger(__name__)


class SearchError(HydraException):
    """A sweeper setting, search space or returned value that cannot work."""


# ------------------------------------------------------------------------------------------------------------
# Sweep expressions -> Optuna distributions
# ------------------------------------------------------------------------------------------------------------


def create_optuna_distribution_from_config(config: Any):
    """One dimension of the deprecated ``search_space`` form: ``{type: int|float|categorical, low, high, step,
    log}`` or ``{type: categorical, choices: [...]}``."""
    import optuna.distributions as D

    kind = config["type"]
    kind = kind.name if isinstance(kind, DistributionType) else str(kind)
    if kind == "categorical":
        return D.CategoricalDistribution(list(config["choices"]))
    step, log_scale = config.get("step"), bool(config.get("log") or False)
    if kind == "int":
        return D.IntDistribution(int(config["low"]), int(config["high"]), log=log_scale, step=int(step or 1))
    if kind == "float":
        step = None if step is None else float(step)
        return D.FloatDistribution(float(config["low"]), float(config["high"]), log=log_scale, step=step)
    raise SearchError(f"search_space: type {kind!r} is not a distribution; choose int, float or categorical")


def create_optuna_distribution_from_override(override: Override, range_includes_stop: bool = True):
    """``choice(...)``, ``a,b,c`` and ``shuffle(range(...))``: categorical; ``range(a,b[,step])``: integers (floats
    if any bound or the step is a float) from a to b in steps, b included unless ``range_includes_stop`` is false;
    ``interval(a,b)``: floats, ``int(interval(a,b))``: integers; ``tag(log, ...)``: on a log scale."""
    import optuna.distributions as D

    key = override.get_key_element()
    if not override.is_sweep_override():
        raise SearchError(f"{override.input_line}: a fixed value, not a search dimension")
    value = override.value()
    if isinstance(value, ChoiceSweep) or (isinstance(value, RangeSweep) and value.shuffle):
        return D.CategoricalDistribution([_choice(v) for v in override.sweep_iterator()])
    log_scale = "log" in value.tags
    if isinstance(value, RangeSweep):
        start, stop, step = value.start, value.stop, value.step
        if step <= 0 or stop <= start:
            raise SearchError(f"{key}: range({start}, {stop}, step={step}) is empty; give start < stop and step > 0")
        first, span = Decimal(str(start)), (Decimal(str(stop)) - Decimal(str(start))) / Decimal(str(step))
        n = int(span) if range_includes_stop else math.ceil(span) - 1  # the last value is start + n * step
        last = first + n * Decimal(str(step))
        if all(isinstance(x, int) for x in (start, stop, step)):
            return D.IntDistribution(int(start), int(last), step=int(step), log=log_scale)
        return D.FloatDistribution(float(start), float(last), step=float(step), log=log_scale)
    if isinstance(value, IntervalSweep):
        if isinstance(value.start, int) and isinstance(value.end, int):
            return D.IntDistribution(value.start, value.end, log=log_scale)
        return D.FloatDistribution(value.start, value.end, log=log_scale)
    raise SearchError(f"{key}: cannot search over {type(value).__name__}; use choice(), range() or interval()")


def _choice(value: Any) -> Any:
    """Optuna's categorical values are None, bool, int, float or str: anything else goes as its override text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return Override._get_value_element_as_str(value)


@dataclass
class Space:
    """What a sweep varies and what it fixes, in the order given; a later entry for a key replaces an earlier one."""

    dimensions: dict[str, Any] = field(default_factory=dict)  # key -> Optuna distribution
    fixed: dict[str, str] = field(default_factory=dict)  # key -> value, as override text
    deleted: list[str] = field(default_factory=list)  # ~key overrides, as typed
    grid: dict[str, list | None] = field(default_factory=dict)  # key -> values for the grid sampler (None: none)

    def add(self, override: Override, range_includes_stop: bool) -> None:
        key = override.get_key_element()
        self._forget(_name(override))
        if override.is_delete():
            self.deleted.append(override.input_line or key)
        elif override.is_sweep_override():
            self.dimensions[key] = create_optuna_distribution_from_override(override, range_includes_stop)
            # The grid walks a range as Hydra does, without its stop value (as hydra-optuna-sweeper's grid does).
            self.grid[key] = [_choice(v) for v in override.sweep_iterator()] if override.is_discrete_sweep() else None
        else:
            self.fixed[key] = override.get_value_element_as_str()

    def _forget(self, name: str) -> None:
        for table in (self.dimensions, self.fixed, self.grid):
            for key in [k for k in table if k.lstrip("+~") == name]:
                del table[key]
        self.deleted = [d for d in self.deleted if d.split("=", 1)[0].lstrip("~") != name]

    def overrides(self) -> list[str]:
        """The fixed values and deletions, as overrides every trial gets."""
        return [f"{k}={v}" for k, v in self.fixed.items()] + list(self.deleted)


def _name(override: Override) -> str:
    return override.key_or_group + (f"@{override.package}" if override.package else "")


def _parse(lines: list[str], range_includes_stop: bool, space: Space | None = None) -> Space:
    space = space if space is not None else Space()
    for override in OverridesParser.create().parse_overrides(list(lines)):
        space.add(override, range_includes_stop)
    return space


def create_params_from_overrides(arguments: list[str], range_includes_stop: bool = True):
    """``(dimensions, fixed values, deletions)`` of a list of overrides."""
    space = _parse(arguments, range_includes_stop)
    return space.dimensions, space.fixed, space.deleted


def as_override(key: str, value: Any) -> str:
    if value is None:
        return f"{key}=null"
    if isinstance(value, bool):
        return f"{key}={str(value).lower()}"
    if isinstance(value, float):
        return f"{key}={value!r}"
    if isinstance(value, str):
        return f"{key}={Override._get_value_element_as_str(value)}"
    return f"{key}={value}"


# ------------------------------------------------------------------------------------------------------------
# The sweeper
# ------------------------------------------------------------------------------------------------------------


class OptunaSweeperImpl(Sweeper):
    """Hydra's sweeper contract (setup, sweep) around an Optuna ask-and-tell loop. Settings: config.py."""

    def __init__(
        self,
        sampler: Any,
        direction: Any = Direction.minimize,
        storage: Any = None,
        study_name: str | None = None,
        n_trials: int = 20,
        n_jobs: int = 2,
        max_failure_rate: float = 0.0,
        search_space: DictConfig | None = None,
        params: DictConfig | None = None,
        custom_search_space: str | None = None,
        pruner: str = "none",
        warmup_epochs: int = 1,
        startup_trials: int = 5,
        resume: bool = False,
        best_preset: str | None = None,
        preset_dir: str | None = None,
        test_best: bool = False,
        range_includes_stop: bool = True,
    ) -> None:
        self.sampler = sampler
        self.direction = direction
        self.storage = storage
        self.study_name = study_name
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.max_failure_rate = max_failure_rate
        self.search_space = search_space
        self.params = params
        self.custom_search_space = custom_search_space
        self.pruner = pruner
        self.warmup_epochs = warmup_epochs
        self.startup_trials = startup_trials
        self.resume = resume
        self.best_preset = best_preset
        self.preset_dir = preset_dir
        self.test_best = test_best
        self.range_includes_stop = range_includes_stop
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher = None
        self.job_idx = 0
        self._storage_url: str | None = None
        self._custom = None
        self._owner = _owner()  # this launcher, as its trials record it
        self._waiting_since: float | None = None
        self._reseeded = False
        self._baseline = 0  # trials a launch without resume found: they do not count

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    # --- the search space ---

    def _process_searchspace_config(self) -> Space:
        """The space that ``params`` (or the deprecated ``search_space``) gives, before the command line's."""
        if self.search_space is not None and self.params is not None:
            warnings.warn(
                "Both hydra.sweeper.params and hydra.sweeper.search_space are configured: only hydra.sweeper.params"
                " is used (search_space is deprecated)",
                UserWarning,
                stacklevel=2,
            )
        elif self.search_space is not None:
            warnings.warn(
                "`hydra.sweeper.search_space` is deprecated and will be removed in the next major release: write the"
                " space as sweep expressions in hydra.sweeper.params (x: interval(0, 1), n: range(1, 5))",
                UserWarning,
                stacklevel=2,
            )
            space = Space()
            for key, spec in self.search_space.items():
                space.dimensions[key] = create_optuna_distribution_from_config(spec)
                space.grid[key] = _grid_values(space.dimensions[key])
            return space
        params = self.params or {}
        return _parse([f"{k}={v}" for k, v in params.items()], self.range_includes_stop)

    def _space(self, arguments: list[str]) -> Space:
        return _parse(arguments, self.range_includes_stop, self._process_searchspace_config())

    def _directions(self) -> list[str]:
        given = self.direction
        items = list(given) if isinstance(given, (list, tuple, ListConfig)) else [given]
        names = [str(getattr(d, "name", d)) for d in items]  # Direction members, or their names
        wrong = [n for n in names if n not in ("minimize", "maximize")]
        if not names or wrong:
            raise SearchError(f"hydra.sweeper.direction={given}: give minimize or maximize, or a list of them")
        return names

    def _check(self, directions: list[str]) -> None:
        if self.n_jobs < 1 or self.n_trials < 0:
            raise SearchError(f"hydra.sweeper.n_jobs={self.n_jobs}, n_trials={self.n_trials}: need n_jobs >= 1")
        if not 0.0 <= self.max_failure_rate <= 1.0:
            raise SearchError(f"hydra.sweeper.max_failure_rate={self.max_failure_rate} is a share: give 0.0 to 1.0")
        if len(directions) > 1 and self.pruner != "none":
            raise SearchError(
                f"hydra.sweeper.pruner={self.pruner}: Optuna cannot prune a study of {len(directions)} objectives;"
                " set hydra.sweeper.pruner=none"
            )
        if len(directions) > 1 and (self.best_preset or self.test_best):
            raise SearchError(
                f"a study of {len(directions)} objectives has a front of best trials, not one best config to write"
                " or test: set hydra.sweeper.best_preset=null hydra.sweeper.test_best=false"
            )

    def _app(self):
        """This project's side of the additions (mnist_sweep/search.py): imported only where an app turned one on."""
        if self.pruner == "none" and not self.best_preset and not self.test_best:
            return None
        from mnist_sweep import search

        return search

    # --- the loop ---

    def sweep(self, arguments: list[str]) -> None:
        import optuna

        assert self.config is not None and self.launcher is not None
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        directions = self._directions()
        self._check(directions)
        space = self._space(arguments)
        app = self._app()
        if app is not None:
            app.make_pruner(self.pruner, self.warmup_epochs, self.startup_trials, 1)  # a wrong name fails here
            app.before_search(self.config, list(space.dimensions))
        self._custom = get_method(self.custom_search_space) if self.custom_search_space else None
        study, planned = self._open_study(directions, space, app)
        done = 0
        if self.resume:
            self._rerun_interrupted(study)
            done = sum(1 for t in _counting(study.get_trials(deepcopy=False)) if t.state.is_finished())
        to_run = max(0, planned - done)
        # Without resume, n_trials are this launch's own: what the study held before does not count.
        self._baseline = 0 if self.resume else _tally(study, self._owner)[0]
        where = self._storage_url or ("memory" if self.storage is None else type(self.storage).__name__)
        log.info(
            "study %r in %s: %s sampler, %s; %d trials done, %d to run (%s)",
            study.study_name,
            where,
            type(study.sampler).__name__,
            " and ".join(directions),
            done,
            to_run,
            ", ".join(f"{k} ~ {_describe(d)}" for k, d in space.dimensions.items()) or "no dimensions",
        )
        failed: list[tuple[JobReturn, BaseException]] = []
        ran = 0
        beat = _Heartbeat(study)
        try:
            while True:
                if self.resume:
                    self._rerun_interrupted(study)
                counted, waiting, others = _tally(study, self._owner)
                counted -= self._baseline
                if counted >= planned and not waiting:
                    if not others or not self.resume:
                        break
                    if not self._wait_for_others(study, others):
                        break
                    continue
                trials = []
                for _ in range(self.n_jobs):
                    trial = self._ask(study, space, planned)
                    if trial is None:
                        break
                    trials.append(trial)
                    beat.add(trial)
                if not trials:
                    continue
                batch = [space.overrides() + self._chosen(t) + self._bookkeeping(study, t) for t in trials]
                returns = self.launcher.launch(batch, initial_job_idx=self.job_idx)
                self.job_idx += len(returns)
                for trial, ret in zip(trials, returns, strict=True):
                    self._tell(study, trial, ret, len(directions), failed, app)
                    beat.remove(trial)
                ran += len(trials)
                if len(failed) > self.max_failure_rate * max(to_run, ran, 1):
                    self._give_up(failed, max(to_run, ran))
        finally:
            beat.stop()
        self._conclude(study, directions, space, failed, app)

    def _wait_for_others(self, study, others: list[int]) -> bool:
        """Trials of other launchers still run: wait for them (the best is the study's, once all are told), while
        their launchers live; False when WAIT_FOR_OTHERS_S passed (the best so far is reported, and said so)."""
        if self._waiting_since is None:
            self._waiting_since = time.monotonic()
            log.info("trials %s run in other launchers: waiting for them before naming the best", others)
        if time.monotonic() - self._waiting_since > WAIT_FOR_OTHERS_S:
            log.warning(
                "trials %s of other launchers still run after %d s: the best below is the best so far",
                others,
                WAIT_FOR_OTHERS_S,
            )
            return False
        time.sleep(POLL_S)
        return True

    def _open_study(self, directions: list[str], space: Space, app) -> tuple[Any, int]:
        """Create the study (or load it: a study of the same name in the storage is continued)."""
        import optuna

        storage = self.storage
        if isinstance(storage, str):
            self._storage_url = _absolute_sqlite(storage)
            storage = open_study_storage(storage)
            if isinstance(storage, optuna.storages.RDBStorage):  # a stale trial of another launcher: run it again
                storage.heartbeat_stale_trial_callback = storage.failed_trial_callback = self._requeue
        sampler, planned = self.sampler, self.n_trials
        if isinstance(sampler, functools.partial) and sampler.func is optuna.samplers.GridSampler:
            grid = {}
            for key, values in space.grid.items():
                if values is None:
                    raise SearchError(f"{key}: the grid sampler walks choice() and range(), not interval()")
                grid[key] = values
            sampler = _grid_sampler(grid, sampler)
            planned = min(planned, math.prod(len(v) for v in grid.values()))  # every point once
        study = optuna.create_study(
            study_name=self.study_name, storage=storage, sampler=sampler, directions=directions, load_if_exists=True
        )
        if app is not None and self._storage_url is None:
            app.IN_MEMORY[study.study_name] = study._storage  # trials in this process prune through it
        return study, planned

    def _ask(self, study, space: Space, planned: int):
        """A new trial (a re-queued one first), or None when the study already has ``planned`` trials: another
        launcher may have asked between our count and our ask, so the count is taken again below this trial's
        number, and a trial over the budget is told FAIL as ``surplus`` (counted nowhere, never run)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Heartbeat of storage is supposed to be used with Study.optimize"
            trial = study.ask()
        study._storage.set_trial_user_attr(trial._trial_id, OWNER_ATTR, self._owner)  # before anything slow
        if self._surplus(study, trial, planned):
            return None
        if not self._reseeded and any(
            t.user_attrs.get(OWNER_ATTR, self._owner) != self._owner and _owner_alive(t.user_attrs[OWNER_ATTR])
            for t in study.get_trials(deepcopy=False)
        ):  # another launcher runs this study: with the same seed it would ask for the same configs as this one
            study.sampler.reseed_rng()
            self._reseeded = True
        for name, dist in space.dimensions.items():
            trial._suggest(name, dist)
        if self._surplus(study, trial, planned):  # again: a trial asked just before ours may have committed late
            return None
        for key, value in space.fixed.items():
            trial.set_user_attr(key, value)  # what custom_search_space must not suggest again
        if self._custom is not None:
            self._custom(self.config, trial)
            clash = sorted(set(space.fixed) & set(trial.params))
            if clash:
                study.tell(trial, state=_state("FAIL"))
                raise SearchError(f"custom_search_space suggested {clash}, which have fixed values on the command line")
        return trial

    def _surplus(self, study, trial, planned: int) -> bool:
        """Whether the trials asked before this one (by any launcher) already make ``planned``: then it is told
        FAIL as surplus, which counts nowhere."""
        before = [t for t in _counting(study.get_trials(deepcopy=False)) if t._trial_id < trial._trial_id]
        if len(before) - self._baseline < planned:
            return False
        study._storage.set_trial_user_attr(trial._trial_id, SURPLUS_ATTR, True)
        study.tell(trial, state=_state("FAIL"))
        return True

    @staticmethod
    def _chosen(trial) -> list[str]:
        return [as_override(k, v) for k, v in trial.params.items()]

    def _bookkeeping(self, study, trial) -> list[str]:
        """What an app that turned the additions on needs to hear: where to report each epoch, and no test set."""
        out = []
        opted_in = OmegaConf.select(self.config, "optuna", default=None) is not None
        # An app that opted in reports every epoch to a study in a database even unpruned (the study then holds
        # each trial's learning curve, as benchmarks/search.py counts it); a study of several objectives cannot.
        curves = opted_in and self._storage_url is not None and len(self._directions()) == 1
        if self.pruner != "none" or curves:
            p = "" if opted_in else "++"
            out += [
                f"{p}optuna.storage={self._storage_url or 'null'}",
                as_override(f"{p}optuna.study", study.study_name),
                f"{p}optuna.trial={trial.number}",
                f"{p}optuna.pruner={self.pruner}",
                f"{p}optuna.warmup_epochs={self.warmup_epochs}",
                f"{p}optuna.startup_trials={self.startup_trials}",
            ]
        if self.test_best:
            out.append(f"{self._add('trainer.test')}trainer.test=false")  # trials are judged on validation only
        return out

    def _add(self, key: str) -> str:
        """The prefix that sets ``key`` in the trials' config: none where the app declares it, ``++`` (add it)
        where it does not - an app that declares nothing can still opt into test_best or pruning."""
        return "" if OmegaConf.select(self.config, key, default=_ABSENT) is not _ABSENT else "++"

    def _tell(self, study, trial, ret: JobReturn, n_values: int, failed: list, app) -> None:
        import optuna

        try:
            self._tell_once(study, trial, ret, n_values, failed, app)
        except optuna.exceptions.UpdateFinishedTrialError:  # judged stale (no heartbeat for GRACE_S) and rerun
            log.warning("trial #%d was failed as interrupted by another launcher: its rerun counts", trial.number)

    def _tell_once(self, study, trial, ret: JobReturn, n_values: int, failed: list, app) -> None:
        import optuna

        error: BaseException | None = None
        if ret.status == JobStatus.COMPLETED:
            try:
                values = _values(ret._return_value, n_values)
            except SearchError as e:
                error = e
            else:
                if self.pruner != "none" and app.PRUNED_ATTR in study._storage.get_trial(trial._trial_id).user_attrs:
                    study.tell(trial, state=_state("PRUNED"))
                else:
                    study.tell(trial, values if n_values > 1 else values[0])
                return
        else:
            error = ret._return_value
            if isinstance(error, optuna.TrialPruned):  # a task that prunes itself the Optuna way
                study.tell(trial, state=_state("PRUNED"))
                return
        study.tell(trial, state=_state("FAIL"))
        failed.append((ret, error))
        log.warning("trial #%d failed: %s: %s", trial.number, type(error).__name__, error)

    def _give_up(self, failed: list, planned: int) -> None:
        """More trials failed than max_failure_rate allows: raise the first failure's own error."""
        log.error(
            "%d of %d trials failed, more than hydra.sweeper.max_failure_rate=%s allows: the sweep stops",
            len(failed),
            planned,
            self.max_failure_rate,
        )
        ret, error = failed[0]
        if ret.status != JobStatus.COMPLETED:
            ret.return_value  # noqa: B018  (Hydra's JobReturn raises the task's exception, with its traceback)
        raise error

    def _conclude(self, study, directions: list[str], space: Space, failed: list, app) -> None:
        """optimization_results.yaml in the sweep folder; with the additions, the best config's preset and test."""
        complete = study.get_trials(deepcopy=False, states=(_state("COMPLETE"),))
        if not complete:
            first = f"; the first failed with {type(failed[0][1]).__name__}: {failed[0][1]}" if failed else ""
            log.error(
                "no trial of study %r completed (%d failed, within max_failure_rate=%s)%s",
                study.study_name,
                len(failed),
                self.max_failure_rate,
                first,
            )
            return
        if len(directions) == 1:
            best = study.best_trial
            results: dict[str, Any] = {"name": "optuna", "best_params": dict(best.params), "best_value": best.value}
            log.info("best trial #%d: value %s with %s", best.number, best.value, " ".join(self._chosen(best)))
        else:
            front = study.best_trials
            results = {"name": "optuna", "solutions": [{"params": dict(t.params), "values": t.values} for t in front]}
            log.info("Pareto front: %d trials (%s)", len(front), ", ".join(f"#{t.number}" for t in front))
        folder = Path(str(self.config.hydra.sweep.dir))
        folder.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(results), folder / "optimization_results.yaml")
        if len(directions) == 1 and app is not None:
            best = study.best_trial
            owner = best.user_attrs.get(OWNER_ATTR)
            # Several launchers share the study: the one that ran the best trial writes and tests its config (the
            # others do where it is gone without having done so, as in a relaunch).
            if owner is None or owner == self._owner or not _owner_alive(owner):
                if study.user_attrs.get(CONCLUDED_ATTR) != best.number or owner == self._owner:
                    self._best_config(best, space, study.study_name, app)
                    study.set_user_attr(CONCLUDED_ATTR, best.number)
            else:
                log.info("best trial #%d ran in launcher %s, which writes and tests its config", best.number, owner)

    def _best_config(self, best, space: Space, study_name: str, app) -> None:
        """The best config as a preset of the app's conf/experiment/ and, with test_best, tested once."""
        summary = None
        if self.best_preset:
            folder = Path(self.preset_dir) if self.preset_dir else _primary_conf_dir(self.config) / "experiment"
            summary = app.write_preset(
                self.hydra_context.config_loader.load_sweep_config,
                self.config,
                space.fixed,
                space.deleted,
                best,
                study_name,
                folder / f"{self.best_preset}.yaml",
            )
        if self.test_best:
            final = space.overrides() + self._chosen(best) + [f"{self._add('trainer.test')}trainer.test=true"]
            (ret,) = self.launcher.launch([final], initial_job_idx=self.job_idx)
            self.job_idx += 1
            ret.return_value  # noqa: B018  (raises the run's error, if it failed)
        if summary:
            log.info("%s", summary)

    def _rerun_interrupted(self, study) -> None:
        """Trials left RUNNING by a launcher that is gone are failed (``interrupted``) and queued again with the same
        parameters. Another launcher's trials are left alone while it lives: one on this host is checked by its
        process, one on another host by its heartbeat (RDB storage: ``fail_stale_trials``, which calls
        ``_requeue``). A trial without an owner is an orphan only if it still has none a moment later (an owner
        records itself right after asking)."""
        import optuna

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        running = study.get_trials(deepcopy=False, states=(_state("RUNNING"),))
        ownerless = [t._trial_id for t in running if OWNER_ATTR not in t.user_attrs]
        if ownerless:
            time.sleep(ORPHAN_WAIT_S)
            running = study.get_trials(deepcopy=False, states=(_state("RUNNING"),))
        for t in running:
            owner = t.user_attrs.get(OWNER_ATTR)
            if owner is None and t._trial_id not in ownerless:
                continue  # asked after our first look
            if owner is not None and (owner == self._owner or _owner_alive(owner)):
                continue
            try:
                study._storage.set_trial_user_attr(t._trial_id, INTERRUPTED_ATTR, True)  # not its own fault
                if not study._storage.set_trial_state_values(t._trial_id, _state("FAIL")):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # told meanwhile, by its owner or by another launcher that found it first
            self._requeue(study, t)

    def _requeue(self, study, trial) -> None:
        study.enqueue_trial(dict(trial.params), user_attrs={RETRY_ATTR: trial.number}, skip_if_exists=False)
        log.info("trial #%d was interrupted (its launcher is gone): queued again", trial.number)


# Who runs a trial: "host:pid:process start time" (a user attribute written right after the ask).
OWNER_ATTR = "launcher"
INTERRUPTED_ATTR = "interrupted"  # a trial whose launcher died: failed by no fault of its own, run again
RETRY_ATTR = "retry_of"  # the number of the interrupted trial a queued trial reruns
CONCLUDED_ATTR = "best_concluded"  # study attribute: the best trial whose config was written and tested
SURPLUS_ATTR = "surplus"  # asked when the study already had n_trials: never run, counted nowhere
HEARTBEAT_S = 20  # RDB storage: a launcher records a heartbeat for each of its running trials this often
GRACE_S = 120  # a trial of another host whose heartbeat is older than this has lost its launcher
ORPHAN_WAIT_S = 3.0  # how long a RUNNING trial without an owner is watched before it counts as an orphan
POLL_S = 2.0  # how often a launcher that has run its share looks at the trials of others
WAIT_FOR_OTHERS_S = 24 * 3600  # and for how long at most


def _owner() -> str:
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_process_started(pid)}"


def _process_started(pid: int) -> str:
    """When a process started (clock ticks since boot, Linux), so that a reused pid is not mistaken for it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _owner_alive(owner: str) -> bool:
    """Whether the launcher ``host:pid:started`` still runs; another host's is assumed to (its heartbeat tells)."""
    host, _, rest = str(owner).partition(":")
    pid, _, started = rest.partition(":")
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (ValueError, PermissionError):
        return True  # not ours to judge
    return not started or _process_started(int(pid)) in ("", started)


def _counting(trials) -> list:
    """The trials that use up the n_trials: finished, running or queued; not surplus, nor interrupted (failed
    because its launcher died, or found stale by its heartbeat: then a queued trial reruns it)."""
    retried = {t.user_attrs[RETRY_ATTR] for t in trials if RETRY_ATTR in t.user_attrs}
    fail = _state("FAIL")
    return [
        t
        for t in trials
        if not t.user_attrs.get(SURPLUS_ATTR)
        and not (t.state == fail and (t.user_attrs.get(INTERRUPTED_ATTR) or t.number in retried))
    ]


def _tally(study, me: str) -> tuple[int, int, list[int]]:
    """(trials that count, trials queued, numbers of trials other launchers are running)."""
    trials = study.get_trials(deepcopy=False)
    waiting = sum(1 for t in trials if t.state == _state("WAITING"))
    others = [t.number for t in trials if t.state == _state("RUNNING") and t.user_attrs.get(OWNER_ATTR, me) != me]
    return len(_counting(trials)), waiting, others


class _Heartbeat:
    """Records a heartbeat for each trial this launcher runs, every HEARTBEAT_S, where the storage keeps them."""

    def __init__(self, study):
        from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled

        self._storage = study._storage
        self._trials: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        if isinstance(self._storage, BaseHeartbeat) and is_heartbeat_enabled(self._storage):
            self._thread = threading.Thread(target=self._run, name="optuna-heartbeat", daemon=True)
            self._thread.start()

    def add(self, trial) -> None:
        if self._thread is not None:
            with self._lock:
                self._trials.add(trial._trial_id)
            self._beat(trial._trial_id)

    def remove(self, trial) -> None:
        with self._lock:
            self._trials.discard(trial._trial_id)

    def _beat(self, trial_id: int) -> None:
        try:
            self._storage.record_heartbeat(trial_id)
        except Exception as e:  # a lost beat or two is within the grace period
            log.debug("heartbeat of trial %d not recorded: %s", trial_id, e)

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with self._lock:
                ids = list(self._trials)
            for trial_id in ids:
                self._beat(trial_id)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


_ABSENT = object()
_OPENED: dict[str, Any] = {}  # storages opened before the sweep started (open_study_storage), by URL


def open_study_storage(url: str):
    """The study's storage for ``hydra.sweeper.storage=url``, opened once per sweep: the launching process opens
    it before anything else is written (mnist_sweep/sweep.py, before MLflow's parent run), the sweeper then
    takes that one. An unreachable database is a SearchError in one line."""
    url = _absolute_sqlite(url)
    opened = _OPENED.pop(url, None)
    return opened if opened is not None else _open_storage(url)


def check_study_storage(url: str) -> None:
    """Open the storage now (SearchError if it cannot be), and keep it for the sweeper's open_study_storage."""
    url = _absolute_sqlite(url)
    if url not in _OPENED:
        _OPENED[url] = _open_storage(url)


def _open_storage(url: str):
    """The study's database, checked before any trial runs; with heartbeats, so that launchers elsewhere can tell
    when this one is gone (the sweeper sets what is done with another's stale trial)."""
    import optuna

    if not url.startswith(("sqlite:", "postgresql", "mysql", "oracle", "mssql")):
        return url  # another kind of storage: Optuna opens it
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("postgresql"):
        kwargs["connect_args"] = {"connect_timeout": 10}
    elif url.startswith("sqlite:"):
        kwargs["connect_args"] = {"timeout": 60}  # launchers sharing one file wait for each other's writes

    for attempt in range(3):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=kwargs,
                    heartbeat_interval=HEARTBEAT_S,
                    grace_period=GRACE_S,
                )
        except Exception as e:
            # Launchers that meet a new database create its tables at the same moment; the loser's CREATE fails
            # on PostgreSQL's catalogue (duplicate key, already exists) or, in a new SQLite file, on the schema's
            # version stamp (alembic_version): the tables are there now, open it again.
            lost = r"already exists|duplicate key|pg_type_typname|UNIQUE constraint failed: alembic_version"
            if attempt < 2 and re.search(lost, str(e)):
                time.sleep(0.5 * (attempt + 1))
                continue
            reason = str(getattr(e, "orig", None) or e).strip().splitlines()
            raise SearchError(
                f"hydra.sweeper.storage={url}: cannot open the study database ({type(e).__name__}: "
                f"{reason[0] if reason else ''}); start the database server (scripts/tracking_server.sh start) or"
                " fix the URL (sqlite:///optuna.db needs nothing)"
            ) from None
    raise AssertionError("unreachable")


def _state(name: str):
    from optuna.trial import TrialState

    return TrialState[name]


def _values(value: Any, n: int) -> list[float]:
    """The task's return value as the study's objective values (one per direction)."""
    values = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    if len(values) != n:
        raise SearchError(f"the task returned {len(values)} value(s) for {n} direction(s) (hydra.sweeper.direction)")
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise SearchError(f"the task returned {value!r}: an Optuna sweep needs a number per direction") from None
    if any(math.isnan(v) for v in out):
        raise SearchError(f"the task returned {value!r}: NaN cannot be compared")
    return out


def _grid_sampler(grid: dict[str, list], configured: functools.partial):
    """Optuna's grid sampler, except that it does not stop the study when the grid is used up (``Study.stop`` works
    only inside ``Study.optimize``): the sweep runs as many trials as the grid has points."""
    import optuna

    class GridSampler(optuna.samplers.GridSampler):
        def after_trial(self, study, trial, state, values) -> None:
            pass

    return GridSampler(grid, *configured.args, **{k: v for k, v in configured.keywords.items() if k != "search_space"})


def _grid_values(dist) -> list | None:
    import optuna.distributions as D

    if isinstance(dist, D.CategoricalDistribution):
        return list(dist.choices)
    if isinstance(dist, D.IntDistribution):
        return list(range(dist.low, dist.high + 1, dist.step))
    if isinstance(dist, D.FloatDistribution) and dist.step is not None:
        n = int((Decimal(str(dist.high)) - Decimal(str(dist.low))) / Decimal(str(dist.step)))
        return [float(Decimal(str(dist.low)) + i * Decimal(str(dist.step))) for i in range(n + 1)]
    return None


def _describe(d) -> str:
    import optuna.distributions as D

    if isinstance(d, D.CategoricalDistribution):
        return "{" + ",".join(map(str, d.choices)) + "}"
    step = f" step {d.step}" if d.step not in (None, 1) else ""
    return f"[{d.low}, {d.high}]{step}" + (" log" if d.log else "")


def _absolute_sqlite(uri: str) -> str:
    """Trials may run in other folders or processes: a relative SQLite path is pinned to the launch folder."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri[len("sqlite:///") :]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    return uri


def _primary_conf_dir(config: DictConfig) -> Path:
    for source in config.hydra.runtime.config_sources:
        if source.provider == "main" and source.schema == "file":
            return Path(source.path)
    return Path.cwd() / "conf"
