"""docs/CONFIG.md, the configuration reference generated from the schema: current, complete, and from the comments."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import REPO
from mnist_sweep import config

SCRIPT = REPO / "scripts" / "config_reference.py"


@pytest.fixture(scope="module")
def ref():
    spec = importlib.util.spec_from_file_location("config_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses defined in it need their module registered
    spec.loader.exec_module(module)
    return module


def test_config_md_is_current():
    """The committed page is what the script writes now: edit the schema's comments, then rerun the script."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], cwd=REPO, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr + done.stdout


def test_check_fails_in_one_line_on_a_stale_page_and_writes_nothing(ref, tmp_path, capsys):
    page = tmp_path / "CONFIG.md"
    ref.main(["--out", str(page)])
    current = page.read_text()
    assert ref.main(["--check", "--out", str(page)]) == 0
    stale = current.replace("| `model.hidden` |", "| `model.width` |")
    assert stale != current
    page.write_text(stale)
    capsys.readouterr()
    assert ref.main(["--check", "--out", str(page)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stale" in err and "python scripts/config_reference.py" in err
    assert page.read_text() == stale


def _leaves(*overrides):
    config.register()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return set(config.flatten(OmegaConf.to_container(cfg, resolve=False)))


def test_every_leaf_key_of_the_composed_config_is_documented_once(ref):
    keys, _, _ = ref.reference()
    names = [k.name for k in keys]
    assert len(names) == len(set(names))
    leaves = _leaves()
    for option in sorted(p.stem for p in (REPO / "conf" / "optimizer").glob("*.yaml")):
        leaves |= _leaves(f"optimizer={option}")  # each optimizer's own keys (sgd's momentum, ...)
    assert leaves - set(names) == set()
    page = (REPO / "docs" / "CONFIG.md").read_text()
    documented = ref.keys_of(page)
    assert len(documented) == len(set(documented)) and leaves <= set(documented)


def test_every_key_has_a_meaning(ref):
    """Each field of the schema carries a comment: it is the key's meaning in docs/CONFIG.md."""
    assert ref.missing() == []


def test_the_comment_beside_a_field_is_its_meaning(ref, tmp_path, monkeypatch):
    (tmp_path / "schema_for_test.py").write_text(
        "from __future__ import annotations\n"
        "from dataclasses import dataclass\n\n\n"
        "@dataclass\n"
        "class Base:\n"
        '    """A base."""\n\n'
        "    a: int = 1  # beside it\n"
        "    # above it,\n"
        "    # on two lines\n"
        '    b: str = "x # not a comment"\n'
        "    c: float | None = 0.5\n\n\n"
        "@dataclass\n"
        "class Child(Base):\n"
        "    c: float | None = 0.7  # the subclass's\n"
        "    d: bool = True\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    schema = importlib.import_module("schema_for_test")
    assert ref.describe_field(schema.Child, "a")[:2] == ("int", "beside it")
    assert ref.describe_field(schema.Child, "b")[:2] == ("str", "above it, on two lines")
    assert ref.describe_field(schema.Child, "c")[:2] == ("float | None", "the subclass's")
    assert ref.describe_field(schema.Base, "c")[:2] == ("float | None", "")
    annotation, meaning, where = ref.describe_field(schema.Child, "d")
    assert (annotation, meaning) == ("bool", "") and where.endswith("schema_for_test.py:19")
    assert ref.describe_class(schema.Child) == "A base."
    assert [k.name for k in ref.walk(schema.Child, "x.")] == ["x.a", "x.b", "x.c", "x.d"]


def test_checks_and_defaults_come_from_the_schema_and_conf(ref):
    keys = {k.name: k for k in ref.reference()[0]}
    assert "must be in [0, 1)" in keys["model.dropout"].checks
    assert keys["device.type"].checks  # DeviceConfig names its check "device", not "device.type"
    assert keys["optimizer.momentum"].options == ("sgd",) and "(sgd)" in keys["optimizer.momentum"].default
    assert keys["model.hidden"].default == "256" and keys["model.hidden"].type == "int"
