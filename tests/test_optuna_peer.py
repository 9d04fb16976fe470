"""hydra-optuna-sweeper's own test suite, run against our Optuna sweeper, as ../shared/peer/README.md says: the
suite is copied to a temporary folder, its import path ``hydra_plugins.hydra_optuna_sweeper`` replaced by ours,
and run with pytest in a subprocess. Every one of its tests must pass; nothing else in it is changed.

One file is added to the copy: an empty ``setup.py``. The suite calls Hydra's ``chdir_plugin_root()``, which
looks for the plugin's root by that file, as upstream's plugin folder has it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

PEER = Path(os.environ.get("MNIST_SWEEP_PEER_SUITE", REPO.parent / "shared" / "peer" / "hydra-optuna-sweeper"))
UPSTREAM, OURS = "hydra_plugins.hydra_optuna_sweeper", "hydra_plugins.mnist_sweep_optuna"


def copy_suite(source: Path, dest: Path) -> Path:
    """The suite at ``dest``, importing our plugin instead of upstream's."""
    shutil.copytree(source, dest)
    for path in dest.rglob("*"):
        if path.is_file() and path.suffix in (".py", ".yaml", ".md"):
            text = path.read_text()
            if UPSTREAM in text:
                path.write_text(text.replace(UPSTREAM, OURS))
    (dest / "setup.py").write_text("")
    return dest


def run_suite(suite: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # Hydra finds plugins on sys.path: ours is REPO/hydra_plugins
    env.pop("HYDRA_FULL_ERROR", None)  # errors as upstream's tests expect them
    cmd = [sys.executable, "-m", "pytest", "tests", "-q", "-rfEs", "-p", "no:cacheprovider"]
    try:
        return subprocess.run(cmd, cwd=suite, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        late = e
    pytest.fail(f"the peer suite still ran after {timeout} s:\n{(late.stdout or b'')[-4000:]!r}")


def all_passed(proc: subprocess.CompletedProcess) -> int:
    """How many tests passed, when all of them did and none was skipped; 0 otherwise."""
    lines = proc.stdout.strip().splitlines()
    summary = lines[-1] if lines else ""
    m = re.fullmatch(r"=*\s*(\d+) passed(, \d+ warnings?)? in [\d.]+s.*", summary)
    return int(m.group(1)) if proc.returncode == 0 and m else 0


def test_upstream_suite_passes_against_our_plugin(tmp_path):
    if not (PEER / "tests").is_dir():
        pytest.fail(f"hydra-optuna-sweeper's suite not found at {PEER}: set MNIST_SWEEP_PEER_SUITE to its folder")
    suite = copy_suite(PEER, tmp_path / "hydra-optuna-sweeper")
    assert UPSTREAM not in (suite / "tests" / "test_optuna_sweeper_plugin.py").read_text()
    proc = run_suite(suite)
    passed = all_passed(proc)
    assert passed >= 41, f"not every test of the peer suite passed:\n{proc.stdout[-8000:]}\n{proc.stderr[-2000:]}"


def test_a_single_failure_in_the_suite_fails_the_check(tmp_path):
    suite = tmp_path / "suite"
    (suite / "tests").mkdir(parents=True)
    (suite / "tests" / "test_canary.py").write_text("def test_ok():\n    pass\n\n\ndef test_not():\n    assert 0\n")
    assert all_passed(run_suite(suite, timeout=120)) == 0
    (suite / "tests" / "test_canary.py").write_text("import pytest\n\n\ndef test_ok():\n    pytest.skip('no')\n")
    assert all_passed(run_suite(suite, timeout=120)) == 0  # a skipped test is not a passed one
    (suite / "tests" / "test_canary.py").write_text("def test_ok():\n    pass\n")
    assert all_passed(run_suite(suite, timeout=120)) == 1
