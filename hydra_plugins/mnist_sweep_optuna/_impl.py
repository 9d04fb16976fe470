"""The search: Hydra's sweep expressions become Optuna distributions, then Optuna is asked for a batch of trials,
Hydra's launcher runs them, and Optuna is told how each ended, until ``n_trials`` have run.

What a trial is told: the fixed values (from ``params`` and the command line; the command line wins for a key
both give), the ``~key`` deletions, and the parameters Optuna chose. The additions (config.py), where an app turns
them on, also tell it how to report each epoch to the study (``optuna.*``, for pruning) and ``trainer.test=false``.

Optuna is imported inside the functions: Hydra imports this module whenever any app starts.
"""

from __future__ import annotations

import functools
import logging
import math
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
            done = sum(1 for t in study.trials if t.state.is_finished() and not t.user_attrs.get("interrupted"))
        to_run = max(0, planned - done)
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
        while to_run > 0:
            trials = [self._ask(study, space) for _ in range(min(self.n_jobs, to_run))]
            batch = [space.overrides() + self._chosen(t) + self._bookkeeping(study, t) for t in trials]
            returns = self.launcher.launch(batch, initial_job_idx=self.job_idx)
            self.job_idx += len(returns)
            for trial, ret in zip(trials, returns, strict=True):
                self._tell(study, trial, ret, len(directions), failed, app)
            to_run -= len(trials)
            if len(failed) > self.max_failure_rate * max(planned - done, 1):
                self._give_up(failed, planned - done)
        self._conclude(study, directions, space, failed, app)

    def _open_study(self, directions: list[str], space: Space, app) -> tuple[Any, int]:
        """Create the study (or load it: a study of the same name in the storage is continued)."""
        import optuna

        storage = self.storage
        if isinstance(storage, str):
            storage = self._storage_url = _absolute_sqlite(storage)
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

    def _ask(self, study, space: Space):
        trial = study.ask(dict(space.dimensions))
        for key, value in space.fixed.items():
            trial.set_user_attr(key, value)  # what custom_search_space must not suggest again
        if self._custom is not None:
            self._custom(self.config, trial)
            clash = sorted(set(space.fixed) & set(trial.params))
            if clash:
                study.tell(trial, state=_state("FAIL"))
                raise SearchError(f"custom_search_space suggested {clash}, which have fixed values on the command line")
        return trial

    @staticmethod
    def _chosen(trial) -> list[str]:
        return [as_override(k, v) for k, v in trial.params.items()]

    def _bookkeeping(self, study, trial) -> list[str]:
        """What an app that turned the additions on needs to hear: where to report each epoch, and no test set."""
        out = []
        if self.pruner != "none":
            p = "" if OmegaConf.select(self.config, "optuna", default=None) is not None else "++"
            out += [
                f"{p}optuna.storage={self._storage_url or 'null'}",
                as_override(f"{p}optuna.study", study.study_name),
                f"{p}optuna.trial={trial.number}",
                f"{p}optuna.pruner={self.pruner}",
                f"{p}optuna.warmup_epochs={self.warmup_epochs}",
                f"{p}optuna.startup_trials={self.startup_trials}",
            ]
        if self.test_best:
            out.append("trainer.test=false")  # trials are judged on validation only
        return out

    def _tell(self, study, trial, ret: JobReturn, n_values: int, failed: list, app) -> None:
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
            self._best_config(study.best_trial, space, study.study_name, app)

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
            final = space.overrides() + self._chosen(best) + ["trainer.test=true"]
            (ret,) = self.launcher.launch([final], initial_job_idx=self.job_idx)
            self.job_idx += 1
            ret.return_value  # noqa: B018  (raises the run's error, if it failed)
        if summary:
            log.info("%s", summary)

    def _rerun_interrupted(self, study) -> None:
        """Trials a killed launch left RUNNING are failed and queued again with the same parameters."""
        for t in study.get_trials(deepcopy=False, states=(_state("RUNNING"),)):
            study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)  # failed by no fault of its own
            study._storage.set_trial_state_values(t._trial_id, _state("FAIL"))
            study.enqueue_trial(t.params)
            log.info("trial #%d was interrupted: queued again", t.number)


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
