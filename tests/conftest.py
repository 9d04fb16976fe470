"""Shared fixtures: tiny synthetic IDX files for unit tests, and the real MNIST copy for end-to-end runs."""

from __future__ import annotations

import gzip
import os
import queue
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
# CI and the developers' machines keep a verified copy of MNIST beside the checkout (no network here).
MNIST = Path(os.environ.get("MNIST_SWEEP_TEST_DATA", REPO.parent / "shared" / "datasets" / "mnist"))


def write_idx(path: Path, array: torch.Tensor, compress: bool = False) -> Path:
    """Write a uint8 tensor as an IDX file (the format of the MNIST distribution)."""
    header = bytes([0, 0, 0x08, array.dim()]) + struct.pack(f">{array.dim()}i", *array.shape)
    payload = header + array.to(torch.uint8).contiguous().numpy().tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def make_dataset(folder: Path, n_train: int = 120, n_test: int = 40, compress: bool = False, seed: int = 0):
    """Four tiny IDX files whose images carry their label (so a model can learn them quickly)."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8)
        images = torch.randint(0, 60, (n, 28, 28), generator=g, dtype=torch.uint8)
        for i, lab in enumerate(labels.tolist()):  # a bright bar whose row encodes the class
            images[i, 2 + 2 * lab : 4 + 2 * lab, 4:24] = 250
        out[f"{split}-images-idx3-ubyte"] = write_idx(folder / f"{split}-images-idx3-ubyte", images, compress)
        out[f"{split}-labels-idx1-ubyte"] = write_idx(folder / f"{split}-labels-idx1-ubyte", labels, compress)
    return out


def tiny_loaders(root, cache, loader="tensor", batch_size=16, eval_batch_size=25, seed=3, deskewed=False):
    """The train/val/test loaders over a tiny dataset: 20 validation images, no download, no checksums."""
    from mnist_sweep import data

    return data.build_loaders(
        name="mnist",
        root=root,
        loader=loader,
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        val_size=20,
        split_seed=0,
        mean=0.1307,
        std=0.3081,
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(seed),
        cache_dir=cache,
        download=False,
        verify=False,
        deskewed=deskewed,
    )


@pytest.fixture
def tiny_data(tmp_path):
    root = tmp_path / "tiny"
    files = make_dataset(root)
    return root, files


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(items):
    """A test that reads the real MNIST files is end-to-end (e2e) by definition: `pytest -m "not e2e"` skips it."""
    for item in items:
        if "mnist_root" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    if not (MNIST / "train-images-idx3-ubyte.gz").exists() and not (MNIST / "train-images-idx3-ubyte").exists():
        pytest.fail(f"MNIST not found at {MNIST}: set MNIST_SWEEP_TEST_DATA to a folder with the four IDX files")
    return MNIST


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One decoded-tensor cache for the whole session, as users get across runs."""
    return tmp_path_factory.mktemp("cache")


def raw_test_images(mnist_root: Path, n: int = 200):
    """The first ``n`` official test images as ``ToTensor()`` gives them (float 0..1, [n,1,28,28]) and labels."""
    from mnist_sweep import data

    files = data.find_files(mnist_root, "mnist")
    images = data.read_idx(files["t10k-images-idx3-ubyte"])[:n].numpy().astype("float32")[:, None] / 255
    return images, data.read_idx(files["t10k-labels-idx1-ubyte"])[:n].numpy()


def _train_py_env(extra: dict[str, str | None] | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # lines arrive as they are printed
    env.pop("HYDRA_FULL_ERROR", None)  # errors as users see them
    for key, value in (extra or {}).items():  # None removes the variable
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _tail(text: str | bytes | None, chars: int = 3000) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-chars:]


def train_py(*overrides: str, cwd: Path, timeout: int = 600, env: dict[str, str | None] | None = None):
    """Run `python train.py OVERRIDES...` for real, the way a user does (``env``: variables to set, or with None
    to remove).

    A run that outlives ``timeout`` seconds is killed and the test fails with what it printed.
    """
    args = [sys.executable, str(REPO / "train.py"), *overrides]
    try:
        return subprocess.run(args, cwd=cwd, env=_train_py_env(env), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        late = e
    pytest.fail(
        f"train.py {' '.join(overrides)} still ran after {timeout} s; it printed:\n"
        f"{_tail(late.stdout)}\n--- stderr ---\n{_tail(late.stderr)}"
    )


_CHILDREN: list[Child] = []


@pytest.fixture(autouse=True)
def _no_child_outlives_its_test():
    yield
    while _CHILDREN:
        child = _CHILDREN.pop()
        if child.proc.poll() is None:  # the test failed before it waited for its child
            child.proc.kill()
            child.proc.wait(timeout=30)


class Child:
    """`python train.py` running in the background; a thread collects its output (stdout and stderr, by line),
    so that no wait on it can hang: each one has a deadline, after which the child is killed and the test fails
    with what the child printed."""

    def __init__(self, overrides: tuple[str, ...], cwd: Path):
        self.overrides = overrides
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "train.py"), *overrides],
            cwd=cwd,
            env=_train_py_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []  # everything read so far
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        _CHILDREN.append(self)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)  # end of output: the child closed it (exited)

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def _fail(self, what: str) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._reader.join(timeout=10)
        self._drain()
        printed = "".join(self.lines)[-3000:]
        pytest.fail(f"train.py {' '.join(self.overrides)}: {what}; it printed:\n{printed}")

    def _drain(self) -> list[str]:
        got = []
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                return got
            if line is not None:
                got.append(line)
                self.lines.append(line)

    def read_until(self, done, seconds: float) -> str:
        """Read lines until one satisfies ``done(line)`` and return it; fail if the child ends or ``seconds`` pass."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = ""
            if line == "":  # nothing came in time (a line read from a pipe ends in a newline, never empty)
                self._fail(f"the awaited line did not come within {seconds} s")
            if line is None:
                self.proc.wait(timeout=30)
                self._fail(f"exited (code {self.proc.returncode}) before the awaited line")
            self.lines.append(line)
            if done(line):
                return line

    def finish(self, seconds: float) -> str:
        """Wait up to ``seconds`` for the child to exit; return what it printed after the lines read so far."""
        try:
            self.proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            pass
        if self.proc.returncode is None:
            self._fail(f"still running after {seconds} s")
        self._reader.join(timeout=30)
        return "".join(self._drain())


def start_train_py(*overrides: str, cwd: Path) -> Child:
    """Start `python train.py OVERRIDES...` in the background (see Child)."""
    return Child(overrides, cwd)


def read_until(child: Child, done, seconds: float) -> str:
    """Read ``child``'s output until a line satisfies ``done(line)``; the test fails after ``seconds``."""
    return child.read_until(done, seconds)


def tiny_fit(root, cache, *, seed=0, epochs=3, precision="fp32", lr=3e-3, depth=1, **fit_args):
    """A net of 32 units trained with Adam on the tiny dataset: (fit's result, test metrics, each epoch's result)."""
    from mnist_sweep import model, training

    torch.manual_seed(seed)
    loaders = tiny_loaders(root, cache, eval_batch_size=50, seed=seed)
    net = model.MLP(hidden=32, depth=depth)
    seen = []
    result = training.fit(
        net,
        loaders.train,
        loaders.val,
        torch.optim.Adam(net.parameters(), lr=lr),
        epochs=epochs,
        device=torch.device("cpu"),
        precision=precision,
        on_epoch=seen.append,
        **fit_args,
    )
    return result, training.evaluate(net, loaders.test, torch.device("cpu"), precision=precision), seen


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh SQLite store in tmp_path, artifacts beside it (MLflow puts them under the working folder):
    (client, experiment id, tracking URI)."""
    import mlflow

    from mnist_sweep import tracking

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    experiment_id = tracking.prepare(uri, "tests")
    return mlflow.MlflowClient(uri), experiment_id, uri
