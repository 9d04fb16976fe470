"""This app's side of an Optuna search (the sweeper itself is hydra_plugins/mnist_sweep_optuna).

``python train.py -m hydra/sweeper=optuna`` (conf/hydra/sweeper/optuna.yaml) turns on what the sweeper adds to
hydra-optuna-sweeper, and this module is what those additions need from the app:

* **pruning** - the task makes one call per epoch: ``r = search.reporter(cfg, epochs)`` once, then
  ``if r and r.report(epoch, val_acc): stop``. The sweeper fills ``optuna.*`` (storage, study, trial number,
  pruner) in each trial's config; ``report`` records the epoch's value in the study and says whether the pruner
  (``median``, ``asha``, ``hyperband``) judges the trial hopeless. Outside a pruning search (a single run, an app
  whose config has no ``optuna`` section) ``reporter`` returns None and the loop runs every epoch. A pruned trial
  is PRUNED in Optuna and tagged ``pruned=true`` on its (FINISHED) MLflow run, never failed;
* **the choice, then the exam** - the best trial's config is written as ``conf/experiment/<best_preset>.yaml``
  (``write_preset``: with what the sweep's own ``experiment=`` preset set, so it stands alone) and run once more
  with ``trainer.test=true``;
* **several objectives** - with ``optuna.objectives`` (``experiment=search_pareto``) the task returns those final
  metrics (``objective_values``) and the leaderboard marks the Pareto front (``mark_pareto``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from mnist_sweep import UserError
from mnist_sweep.config import flatten

log = logging.getLogger("mnist_sweep.search")

PRUNED_ATTR = "pruned_at_epoch"  # user attribute of a trial the pruner stopped: the epoch it stopped after
# Studies without a database (hydra.sweeper.storage=null), by name: the sweeper registers its own, so that trials
# run in its process (hydra/launcher=basic) can report to it.
IN_MEMORY: dict[str, Any] = {}


class SearchError(UserError):
    """A search space or study setting that cannot work."""


def before_search(config: DictConfig, dimensions: list[str]) -> None:
    """What makes a search pointless, found before the study exists or any trial runs."""
    if not dimensions:
        raise SearchError("the search space is empty: give hydra.sweeper.params or sweep values (e.g. a=1,2)")
    if OmegaConf.select(config, "data.val_size") == 0:
        raise SearchError(
            "data.val_size=0 leaves no validation split for the search to maximise: search with "
            "data.val_size=5000, then refit the chosen preset on all 60,000 with data.val_size=0"
        )


# ------------------------------------------------------------------------------------------------------------
# Inside a trial: report each epoch, learn whether to stop
# ------------------------------------------------------------------------------------------------------------


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


class TrialReporter:
    """The trial's side of pruning: ``report(epoch, val_acc)`` returns True when the trial should stop."""

    def __init__(self, storage: str | None, study: str, trial_number: int, pruner):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        if storage is None:
            storage = IN_MEMORY.get(study)
            if storage is None:
                raise SearchError(
                    f"optuna.storage=null: study {study!r} lives in the memory of the launching process, which this "
                    "trial cannot reach; to prune trials run elsewhere, give the study a database "
                    "(hydra.sweeper.storage=sqlite:///optuna.db)"
                )
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


def reporter(cfg: Any, max_epochs: int) -> TrialReporter | None:
    """The reporter for this run when it is a trial of a pruning search (the sweeper sets ``optuna.*``); None
    otherwise.

    ``cfg`` is the run's config (its ``optuna`` section is looked up) or that section itself; a config without
    one, an app that declares none and runs outside a search, or None: no reporter.
    """
    o = _get(cfg, "optuna") if _has(cfg, "optuna") else cfg
    if o is None or _get(o, "trial") is None:
        return None
    pruner = make_pruner(_get(o, "pruner"), _get(o, "warmup_epochs"), _get(o, "startup_trials"), max_epochs)
    return TrialReporter(_get(o, "storage"), _get(o, "study"), _get(o, "trial"), pruner)


def _has(obj: Any, key: str) -> bool:
    """Whether a config (DictConfig, dict or the typed dataclass) has ``key``."""
    if obj is None:
        return False
    return key in obj if isinstance(obj, (dict, DictConfig)) else hasattr(obj, key)


def _get(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    return obj.get(key) if isinstance(obj, (dict, DictConfig)) else getattr(obj, key, None)


def objective_values(metrics: dict[str, float], names: list[str]) -> tuple[float, ...]:
    """What a trial of a multi-objective search returns: the named final metrics, in order."""
    missing = [n for n in names if n not in metrics]
    if missing:
        raise SearchError(f"optuna.objectives: {', '.join(missing)} not among the run's metrics ({', '.join(metrics)})")
    return tuple(float(metrics[n]) for n in names)


# ------------------------------------------------------------------------------------------------------------
# Several objectives: the Pareto front on the leaderboard
# ------------------------------------------------------------------------------------------------------------


def objectives(config: DictConfig) -> list[tuple[str, str]]:
    """(metric, direction) of each objective of a multi-objective search (``optuna.objectives`` with
    ``hydra.sweeper.direction`` a list as long); empty for any other sweep."""
    names = list(OmegaConf.select(config, "optuna.objectives", default=None) or [])
    directions = OmegaConf.select(config, "hydra.sweeper.direction", default=None)
    if len(names) < 2 or not isinstance(directions, ListConfig) or len(directions) != len(names):
        return []
    return [(n, str(getattr(d, "name", d))) for n, d in zip(names, directions, strict=True)]


def pareto_front(points: list[tuple[float, ...]], directions: list[str]) -> list[bool]:
    """Whether each point is on the front: no other point is at least as good in every objective and better in one."""
    signs = [1.0 if d == "minimize" else -1.0 for d in directions]
    costs = [tuple(s * v for s, v in zip(signs, p, strict=True)) for p in points]

    def dominated(c: tuple[float, ...]) -> bool:
        return any(all(o <= v for o, v in zip(other, c, strict=True)) and other != c for other in costs)

    return [not dominated(c) for c in costs]


def mark_pareto(rows: list[dict], objectives: list[tuple[str, str]], metrics_of: Callable[[str], dict]) -> None:
    """Give each finished row of the leaderboard its objectives (``scores``) and whether it is on the front."""
    scored = []
    for row in rows:
        if row["status"] == "FINISHED" and row.get("run_id"):
            metrics = metrics_of(row["run_id"])
            row["scores"] = {name: metrics.get(name) for name, _ in objectives}
            if all(v is not None for v in row["scores"].values()):
                scored.append(row)
    points = [tuple(r["scores"][n] for n, _ in objectives) for r in scored]
    for row, on_front in zip(scored, pareto_front(points, [d for _, d in objectives]), strict=True):
        row["pareto"] = on_front


# ------------------------------------------------------------------------------------------------------------
# The best config as a preset of conf/experiment/
# ------------------------------------------------------------------------------------------------------------


# Where things go and how a search is run: not part of a recipe.
NOT_IN_PRESET = ("hydra.", "hydra/", "optuna.", "mlflow.", "data.root", "data.cache_dir", "experiment")


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


def write_preset(load, config: DictConfig, fixed: dict[str, str], deleted: list[str], best, study: str, path: Path):
    """Write the best trial's config to ``path``; returns the line that says where and how to rerun it.

    ``load`` is Hydra's ``load_sweep_config``; ``fixed`` the sweep's fixed values (key -> override text),
    ``deleted`` its ``~key`` overrides, which a preset cannot express: the header names them.
    """
    import yaml

    # What the sweep's own experiment preset set comes first (the search preset's 10 epochs, say), so the new
    # preset stands alone; then the command line's fixed values; then the trial's choices.
    params: dict[str, Any] = _experiment_settings(load, config, [f"{k}={v}" for k, v in fixed.items()], deleted)
    for key, value in fixed.items():
        if not key.lstrip("+").startswith(NOT_IN_PRESET):
            params[key.lstrip("+")] = yaml.safe_load(value) if value else value
    params.update({k.lstrip("+"): v for k, v in best.params.items()})
    name = path.stem
    header = (
        f"# Written by the Optuna search {study!r}: trial #{best.number}, val/acc {best.value:.4f}.\n"
        f"# Rerun: python train.py experiment={name}"
        + (f" {' '.join(deleted)}  (a preset cannot delete keys)" if deleted else "")
        + "\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(preset_yaml(params, header, set(config.hydra.runtime.choices)))
    return f"best config written to {path}; rerun it with: python train.py experiment={name} {' '.join(deleted)}"


def _experiment_settings(load, config: DictConfig, fixed: list[str], deleted: list[str]) -> dict[str, Any]:
    """The config groups and values that ``experiment=X`` (if among ``fixed``) changed, as overrides.

    Found by composing the config as the trials did, then without X but with its picks of the hydra/ groups
    (the sweeper's own overrides need them) and of the config groups, and comparing the two.
    """
    experiment = [o for o in fixed if o.split("=", 1)[0].lstrip("+") == "experiment"]
    if not experiment:
        return {}
    rest = [o for o in fixed if o not in experiment] + deleted
    try:
        full = load(config, fixed + deleted)
        choices = {g: c for g, c in full.hydra.runtime.choices.items() if c is not None}
        pins = [f"{g}={c}" for g, c in choices.items() if g.startswith("hydra/")]
        plain = load(config, rest + pins).hydra.runtime.choices
        groups = {
            g: c
            for g, c in choices.items()
            if not g.startswith(("hydra/", "schema/")) and g not in ("experiment", "base_config") and plain.get(g) != c
        }
        same = load(config, rest + pins + [f"{g}={c}" for g, c in groups.items()])
    except Exception as e:  # the search has run: write what is known rather than lose the result
        log.warning("could not tell what %s set (%s): the preset holds the search's own keys only", experiment[0], e)
        return {}
    before = _leaves(same)
    values = {k: v for k, v in _leaves(full).items() if not k.startswith(NOT_IN_PRESET) and before.get(k) != v}
    return {**groups, **values}


def _leaves(cfg: DictConfig) -> dict[str, Any]:
    """The task config's values by dotted key (``trainer.epochs``), interpolations unresolved; hydra's left out."""
    return flatten({k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if k != "hydra"})
