"""The Optuna sweeper in an app that declares nothing for it: only its own keys and ``override hydra/sweeper:
optuna`` in its defaults (tests/search_app, by contrast, declares ``optuna.*`` and ``trainer.test``).

A real search, ``python app.py -m`` in a subprocess, of a task that returns a function of x: it must behave as
hydra-optuna-sweeper does (optimization_results.yaml, nothing of this project's in the trials, no preset, no test
run), and an extra the app opts into on the command line (``hydra.sweeper.test_best=true``) must work without the
app declaring the key it sets (``trainer.test``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import REPO

CONFIG = "defaults:\n  - override hydra/sweeper: optuna\n  - _self_\nx: 0.5\n"
APP = """import json
import os

import hydra
from omegaconf import OmegaConf

from mnist_sweep import search


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg) -> float:
    reporter = search.reporter(cfg, 3)  # the documented pruning call: None here, the app has no optuna section
    with open(os.environ["BARE_LOG"], "a") as f:
        f.write(json.dumps({"config": OmegaConf.to_container(cfg), "reporter": reporter is not None}) + "\\n")
    return (cfg.x - 0.3) ** 2


if __name__ == "__main__":
    main()
"""
N_TRIALS = 4


def _bare_app(tmp_path: Path) -> Path:
    app = tmp_path / "app"
    (app / "conf").mkdir(parents=True)
    (app / "conf" / "config.yaml").write_text(CONFIG)
    (app / "app.py").write_text(APP)
    return app


def _run(app: Path, tmp_path: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    log = tmp_path / "calls.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO), "BARE_LOG": str(log)}  # Hydra finds the sweeper on the path
    env.pop("HYDRA_FULL_ERROR", None)
    args = [sys.executable, str(app / "app.py"), "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides]
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc, calls


@pytest.mark.parametrize("test_best", [False, True], ids=["upstream", "test_best"])
def test_a_bare_app_searches_as_upstream_and_opts_into_test_best(tmp_path, test_best):
    app = _bare_app(tmp_path)
    opt_in = ["hydra.sweeper.test_best=true"] if test_best else []
    proc, calls = _run(
        app,
        tmp_path,
        "x=interval(0.0,1.0)",
        f"hydra.sweeper.n_trials={N_TRIALS}",
        "hydra.sweeper.sampler.seed=1",
        *opt_in,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    configs = [c["config"] for c in calls]
    assert not any(c["reporter"] for c in calls)  # no pruning search: the pruning call is a no-op
    assert all("optuna" not in c for c in configs)  # no bookkeeping of this project's reached a trial
    assert sorted(p.name for p in (app / "conf").rglob("*")) == ["config.yaml"]  # no preset written
    results = OmegaConf.to_container(OmegaConf.load(tmp_path / "sweep" / "optimization_results.yaml"))
    assert set(results) == {"name", "best_params", "best_value"} and results["name"] == "optuna"
    assert set(results["best_params"]) == {"x"}  # minimize, by default: the trial closest to x = 0.3
    trials = configs[:N_TRIALS]
    best = min(trials, key=lambda c: (c["x"] - 0.3) ** 2)
    assert results["best_params"]["x"] == best["x"] and results["best_value"] == (best["x"] - 0.3) ** 2
    if not test_best:
        assert len(calls) == N_TRIALS  # no extra run with the test set
        assert all(set(c) == {"x"} for c in configs)  # the trials' configs hold the app's keys only
    else:
        assert len(calls) == N_TRIALS + 1  # the best config, once more
        assert all(c["trainer"] == {"test": False} for c in trials)  # trials are told to skip the test set
        assert configs[-1] == {"x": best["x"], "trainer": {"test": True}}  # and the best takes it
