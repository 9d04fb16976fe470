"""The package's shape: a pipeline whose modules import each other one way, at the top, and never the lab."""

import ast
from pathlib import Path

import tomllib

from conftest import make_dataset, train_py

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "mnist_sweep"


def _imports(path: Path) -> tuple[set[str], list[str]]:
    """The mnist_sweep modules a file imports at its top level, and those it imports inside a function."""
    top, nested = set(), []
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        modules = {
            n.split(".")[1]
            for n in names
            if n.startswith("mnist_sweep.") and (PACKAGE / f"{n.split('.')[1]}.py").exists()
        }
        if node.col_offset == 0:
            top |= modules
        else:
            nested += [f"{path.name}:{node.lineno} imports {m}" for m in sorted(modules)]
    return top, nested


def test_package_modules_import_each_other_at_the_top_and_without_cycles():
    graph, nested = {}, []
    for path in sorted(PACKAGE.glob("*.py")):
        top, inner = _imports(path)
        graph[path.stem] = top - {path.stem}
        nested += inner
    assert not nested, f"imports between package modules inside functions (a cycle dodged?): {nested}"

    def visit(module: str, stack: list[str]) -> None:
        assert module not in stack, f"import cycle: {' -> '.join([*stack, module])}"
        for dep in graph.get(module, ()):
            visit(dep, [*stack, module])

    for module in graph:
        visit(module, [])


def test_the_library_never_imports_the_lab():
    for path in [*PACKAGE.glob("*.py"), *(REPO / "hydra_plugins").rglob("*.py")]:
        text = path.read_text()
        assert "import benchmarks" not in text and "from benchmarks" not in text, path


def test_the_wheel_ships_the_library_and_the_plugin_only():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["tool"]["setuptools"]["packages"] == ["mnist_sweep", "hydra_plugins.mnist_sweep_optuna"]


def test_a_default_run_imports_neither_torchvision_nor_dynamo(tmp_path):
    """torchvision (about 1.8 s of start-up) serves only data.loader=torchvision, and ``torch._dynamo`` (about
    1 s) only torch.compile, which a run never calls: a real default run, traced with Python's own import
    timer, imports neither."""
    make_dataset(tmp_path / "data")
    store = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = (
        f"data.root={tmp_path / 'data'}",
        "data.val_size=20",
        "data.verify=false",
        "data.download=false",
        "trainer.epochs=1",
        f"mlflow.tracking_uri={store}",
    )
    done = train_py(*overrides, cwd=tmp_path, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "mnist_sweep.run" in imported and "mlflow" in imported  # the trace saw the run
    assert not {m for m in imported if m.split(".")[0] == "torchvision"}
    assert not {m for m in imported if m.startswith("torch._dynamo")}
    # The same run with the tutorial's loader does import it: the check above can fail.
    done = train_py(*overrides, "data.loader=torchvision", cwd=tmp_path, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "import time:" in done.stderr and "| torchvision" in done.stderr
