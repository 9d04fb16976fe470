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
    # Not -q: the header's "collected N items" line is what every test passing is checked against.
    cmd = [sys.executable, "-m", "pytest", "tests", "-rfEs", "-p", "no:cacheprovider"]
    try:
        return subprocess.run(cmd, cwd=suite, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        late = e
    pytest.fail(f"the peer suite still ran after {timeout} s:\n{(late.stdout or b'')[-4000:]!r}")


def counts(proc: subprocess.CompletedProcess) -> tuple[int, int]:
    """(tests passed, tests pytest collected), as pytest reports them. Passed is 0 unless the run ended with
    passes alone: any failure, error, skip, xfail or xpass; collected is 0 where some were deselected or failed
    to be collected."""
    lines = proc.stdout.strip().splitlines()
    summary = lines[-1] if lines else ""
    m = re.fullmatch(r"=*\s*(\d+) passed(, \d+ warnings?)? in [\d.]+s.*", summary)
    passed = int(m.group(1)) if proc.returncode == 0 and m else 0
    found = [re.fullmatch(r"collected (\d+) items?", line.strip()) for line in lines if line.startswith("collected ")]
    collected = int(found[0].group(1)) if len(found) == 1 and found[0] else 0  # "... / 2 deselected": no match
    return passed, collected


def all_passed(proc: subprocess.CompletedProcess) -> bool:
    """Whether every test pytest collected passed (and it collected some)."""
    passed, collected = counts(proc)
    return collected > 0 and passed == collected


def test_upstream_suite_passes_against_our_plugin(tmp_path):
    if not (PEER / "tests").is_dir():
        pytest.fail(f"hydra-optuna-sweeper's suite not found at {PEER}: set MNIST_SWEEP_PEER_SUITE to its folder")
    suite = copy_suite(PEER, tmp_path / "hydra-optuna-sweeper")
    assert UPSTREAM not in (suite / "tests" / "test_optuna_sweeper_plugin.py").read_text()
    proc = run_suite(suite)
    passed, collected = counts(proc)
    report = f"{passed} of {collected} collected tests passed:\n{proc.stdout[-8000:]}\n{proc.stderr[-2000:]}"
    assert collected > 0 and passed == collected, report


def test_a_single_failure_in_the_suite_fails_the_check(tmp_path):
    suite = tmp_path / "suite"
    (suite / "tests").mkdir(parents=True)
    (suite / "tests" / "test_canary.py").write_text("def test_ok():\n    pass\n\n\ndef test_not():\n    assert 0\n")
    assert counts(run_suite(suite, timeout=120)) == (0, 2)  # a failure: no pass counts
    (suite / "tests" / "test_canary.py").write_text("import pytest\n\n\ndef test_ok():\n    pytest.skip('no')\n")
    assert not all_passed(run_suite(suite, timeout=120))  # a skipped test is not a passed one
    xfail = "import pytest\n\n\n@pytest.mark.xfail\ndef test_ok():\n    assert 0\n"
    (suite / "tests" / "test_canary.py").write_text(xfail)
    assert not all_passed(run_suite(suite, timeout=120))  # nor an expected failure
    two = "import pytest\n\n\ndef test_ok():\n    pass\n\n\n@pytest.mark.slow\ndef test_slow():\n    pass\n"
    (suite / "tests" / "test_canary.py").write_text(two)
    (suite / "pytest.ini").write_text("[pytest]\nmarkers = slow\naddopts = -m 'not slow'\n")
    assert counts(run_suite(suite, timeout=120))[1] == 0  # a deselected test: 1 passed, but not of 2 collected
    (suite / "pytest.ini").unlink()
    assert all_passed(run_suite(suite, timeout=120))


def test_passed_is_compared_with_collected():
    """Fewer passes than tests collected fails the check, even where the summary names passes alone."""

    def proc(out: str) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess([], 0, stdout=out, stderr="")

    header = "platform linux -- Python 3.11\nrootdir: /x\ncollected {} items\n\ntests/test_a.py ...\n"
    assert all_passed(proc(header.format(3) + "============ 3 passed, 1 warning in 0.50s ============\n"))
    assert counts(proc(header.format(41) + "===== 40 passed in 9.10s =====\n")) == (40, 41)
    assert not all_passed(proc(header.format(41) + "===== 40 passed in 9.10s =====\n"))
    assert not all_passed(proc("===== 41 passed in 9.10s =====\n"))  # no collected count reported: no pass
