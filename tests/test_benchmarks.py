"""The benchmarks (benchmarks/, run from the checkout): their pieces, their reports, and their boundary with the
library. Behaviour only: no test asserts a wall-clock time (timings belong in the reports).
"""

from __future__ import annotations

import ast
import gzip
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import augment, common, denormal, presets, search, speed, sweeps
from conftest import REPO, make_dataset
from mnist_sweep import model, training

# --------------------------------------------------------------------------------------------------------------
# The boundary: the library knows nothing of the benchmarks, the benchmarks use only its public names
# --------------------------------------------------------------------------------------------------------------


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in a file, wherever it sits (functions included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [a.name for a in node.names]))
    return found


def test_the_library_imports_nothing_from_the_benchmarks():
    for path in sorted((REPO / "mnist_sweep").glob("*.py")):
        assert not [m for m, _ in _imports(path) if m.split(".")[0] == "benchmarks"], path


def _private_uses(path: Path) -> list[str]:
    """The library's private names (``_name``) a file imports or reaches through one of its modules."""
    found, modules = [], {"mnist_sweep"}  # names bound to the library or one of its modules in this file
    for module, names in _imports(path):
        if module == "mnist_sweep":
            modules |= set(names)
        if module.startswith("mnist_sweep"):
            found += [f"{module}.{n}" for n in [*module.split("."), *names] if n.startswith("_")]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            found += [f"{node.value.id}.{node.attr}"] if node.attr.startswith("_") else []
    return found


def test_the_benchmarks_use_only_public_names_of_the_library():
    for path in sorted((REPO / "benchmarks").glob("*.py")):
        assert _private_uses(path) == [], path


def test_the_boundary_check_sees_a_private_name(tmp_path):
    """The check above can fail: reaching into a private helper, either way, is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("from mnist_sweep import augment\nfrom mnist_sweep.run import _absolute\n\naugment._basis(1)\n")
    assert _private_uses(bad) == ["mnist_sweep.run._absolute", "augment._basis"]


def test_every_call_the_sweep_benchmark_times_still_exists():
    for module, name, _ in sweeps.TIMED_CALLS:
        owner, attr = sweeps.resolve(module, name)
        assert callable(getattr(owner, attr))
    with pytest.raises(AttributeError, match=r"mnist_sweep\.run\.save_artifacts, which no longer exists"):
        sweeps.resolve("run", "save_artifacts")


# --------------------------------------------------------------------------------------------------------------
# common.py: the machine, the command, the blocks of a shared report
# --------------------------------------------------------------------------------------------------------------


def test_the_machine_line_names_the_cpu_its_flags_and_torchs_kernels():
    cpu = common.cpu()
    assert set(cpu["flags"]) <= set(common.FLAGS) and cpu["cores"] >= 1
    assert cpu["bf16_native"] == bool({"avx512_bf16", "amx_bf16"} & set(cpu["flags"]))
    assert cpu["capability"] == torch.backends.cpu.get_cpu_capability()
    line = common.machine()
    assert line.startswith(cpu["model"]) and f"torch CPU kernels {cpu['capability']}" in line
    assert ("bf16 native" in line) == cpu["bf16_native"] and "GPU: " in line
    assert f"torch {torch.__version__}" in common.versions_line()


def test_the_command_line_is_quoted_for_a_shell():
    words = ["--override", "model.hidden=choice(64,128)", "--quick"]
    assert common.command_line("benchmarks.x", words) == (
        "python -m benchmarks.x --override 'model.hidden=choice(64,128)' --quick"
    )


def test_a_block_is_replaced_inserted_in_order_or_appended_and_the_rest_kept():
    doc = "# Title\n\nintro\n\n<!-- begin retired -->\nold story\n<!-- end retired -->\n"
    doc = common.replace_block(doc, "augment", "## augment v1")
    doc = common.replace_block(doc, "speed", "## speed v1")
    assert doc.index("speed v1") < doc.index("augment v1") < doc.index("old story")  # common.BLOCKS' order
    doc = common.replace_block(doc, "augment", "## augment v2\n")
    assert "augment v1" not in doc and doc.count("augment v2") == 1 and doc.startswith("# Title\n\nintro\n")
    assert common.replace_block("", "other", "x") == "<!-- begin other -->\nx\n<!-- end other -->\n"
    with pytest.raises(ValueError, match="the markers of block 'speed' are broken"):
        common.replace_block("<!-- end speed -->\n<!-- begin speed -->\n", "speed", "x")


def test_write_report_rewrites_only_its_block(tmp_path, capsys):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nhand-written intro\n\n<!-- begin denormal -->\nkept\n<!-- end denormal -->\n")
    common.write_report(out, "## Augmentation\n\nfigures", block="augment")
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nhand-written intro\n") and "kept" in text
    assert text.index("figures") < text.index("kept")
    assert f"wrote {out} (block augment)" in capsys.readouterr().out


def test_the_benchmark_pages_have_every_block_once():
    text = common.BENCHMARKS_MD.read_text()
    for name in common.BLOCKS:
        assert text.count(f"<!-- begin {name} -->") == text.count(f"<!-- end {name} -->") == 1, name
    starts = [text.index(f"<!-- begin {name} -->") for name in common.BLOCKS]
    assert starts == sorted(starts)


# --------------------------------------------------------------------------------------------------------------
# speed.py
# --------------------------------------------------------------------------------------------------------------


def test_tutorial_net_is_784_128_64_10():
    net = speed.tutorial_net()
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 128), (128, 64), (64, 10)]
    assert net(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert model.flops_per_sample(net) == 2 * (784 * 128 + 128 * 64 + 64 * 10)


def test_trial_time_to_threshold_and_throughput():
    t = speed.Trial("x", flops_per_sample=1000, times=[1.0, 2.0, 3.0], test_acc=[0.96, 0.976, 0.981])
    t.samples_per_s = [100.0, 200.0, 300.0]
    assert t.time_to(0.975) == 2.0 and t.time_to(0.98) == 3.0 and t.time_to(0.99) is None
    assert t.throughput == 300.0  # the fastest epoch
    assert t.gflops == pytest.approx(3 * 1000 * 300 / 1e9)
    assert t.epoch_seconds == 1.0 and t.final_acc == 0.981


def test_matmul_peak_is_measured():
    assert speed.matmul_gflops(64, torch.float32, seconds=0.01, repeats=1) > 0


@pytest.mark.e2e
def test_speed_quick_writes_its_block_and_keeps_the_others(tmp_path, mnist_root):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nintro\n\n<!-- begin augment -->\naugment figures\n<!-- end augment -->\n")
    assert speed.main(["--quick", "--silent", "--data-root", str(mnist_root), "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n") and text.index("## Speed") < text.index("augment figures")
    for section in (
        "### Machine",
        "### Headline",
        "### `experiment=speedrun` over seeds",
        "### Data loaders",
        "### `python train.py` end to end",
        "### Training throughput against the machine's peak",
        "### bf16 vs fp32",
        "### Evaluation of the 10,000 test images",
        "BENCHMARKS-sweeps.md",
        "### GPU",
    ):
        assert section in text, section
    assert "python -m benchmarks.speed --quick --silent" in text  # the exact command
    assert "torch " + torch.__version__ in text and torch.backends.cpu.get_cpu_capability() in text
    assert "--quick smoke mode" in text
    assert "GFLOP/s" in text and "samples/s" in text


def test_presets_times_each_preset_as_the_cpu_is_and_held_to_avx2(tmp_path, mnist_root):
    """Held to AVX2 (oneDNN and torch's kernels, in the child process) bf16 is emulated, so auto picks fp32; --whole
    trains the preset to its end on the kinds named (a relative data root too: the runs start elsewhere)."""
    out = tmp_path / "BENCHMARKS.md"
    root = os.path.relpath(mnist_root)
    args = ["--presets", "speedrun", "--epochs", "1", "--whole", "avx2", "--data-root", root, "--out", str(out)]
    assert presets.main(args) == 0
    text = out.read_text()
    assert "python -m benchmarks.presets --presets speedrun --epochs 1 --whole avx2" in text and "Machine: " in text
    rows = [line for line in text.splitlines() if line.startswith("| `speedrun`")]
    assert len(rows) == 2 and "| held to AVX2 | fp32 |" in rows[1]
    native = "bf16" if training.native_bf16(torch.device("cpu")) else "fp32"
    assert f"| this CPU | {native} |" in rows[0] and rows[0].endswith("|  |")  # not trained to its end
    assert re.search(r"\| [\d.]+ min \(\d+ s\), 9\d\.\d\d% \|$", rows[1])


# --------------------------------------------------------------------------------------------------------------
# search.py: records, and the one report rendered from them all
# --------------------------------------------------------------------------------------------------------------


def test_the_search_report_is_rendered_from_the_saved_records():
    """docs/BENCHMARKS-search.md is exactly what `python -m benchmarks.search --render-only` writes."""
    rendered = search.render(search.load_records(search.RECORDS), "python -m benchmarks.search --render-only")
    assert (common.DOCS / "BENCHMARKS-search.md").read_text() == rendered


def _record(name, pruner, seed, pruned_epochs, gap, variant=None):
    r = {
        "name": name,
        "date": "2026-12-01",
        "command": f"python -m benchmarks.search --pruner {pruner}",
        "device": "cpu",
        "pruner": pruner,
        "trials": 4,
        "epochs": 10,
        "jobs": 1,
        "tpe_seed": str(seed),
        "space": ["device.threads=1"],
        "searches": {
            pruner: {"trials": 4, "pruned": 2, "failed": 0, "epochs": pruned_epochs, "best_val": 0.99, "test": 0.98},
            "none": {"trials": 4, "pruned": 0, "failed": 0, "epochs": 40, "best_val": 0.99, "test": 0.98},
        },
        "reference": {"what": "best", "val_mean": 0.991, "test_mean": 0.99},
    }
    r["searches"][pruner]["gap"] = gap
    return {**r, "variant": variant} if variant else r


def test_the_search_report_has_a_table_per_search_and_a_row_per_pruner_and_seed():
    records = [
        _record("a0", "asha", 0, 20, 0.1),
        _record("a1", "asha", 1, 10, -0.2),
        _record("m0", "median", 0, 30, 0.3),
        _record("old", "asha", 0, 40, 0.5, variant="an older space"),
    ]
    text = search.render(records, "python -m benchmarks.search --render-only")
    assert text.count("\n## ") == 3  # two searches (the variant apart), then Runs
    rows = [ln for ln in text.splitlines() if ln.startswith(("| asha", "| median"))]
    assert [r.split("|")[1:3] for r in rows[:3]] == [[" asha ", " 0 "], [" asha ", " 1 "], [" median ", " 0 "]]
    assert "| 20 / 40 | **50%** |" in rows[0] and "| 30 / 40 | 25% |" in rows[2]  # ≥ 40% in bold
    assert "- asha over 2 TPE seeds: 30 epochs against 80 unpruned (62% saved; per seed 50-75%)" in text
    assert "gap -0.20 to 0.10 points." in text and "median over" not in text  # one seed: no summary
    assert "(an older space)" in text and "### old" in text


@pytest.mark.e2e
def test_search_runs_both_searches_side_by_side_and_counts_their_epochs(tmp_path, mnist_root, cache_dir):
    out, work, records = tmp_path / "BENCHMARKS-search.md", tmp_path / "work", tmp_path / "records"
    tiny = ["model.hidden=choice(16,24)", "model.depth=range(1,2)", "data.batch_size=choice(512)"]
    tiny += [f"data.cache_dir={cache_dir}", "hydra.sweeper.startup_trials=1", "hydra.sweeper.warmup_epochs=0"]
    args = ["--data-root", str(mnist_root), "--trials", "3", "--epochs", "2", "--records", str(records)]
    args += [a for o in tiny for a in ("--override", o)]
    t0 = time.time()
    assert search.main([*args, "--workdir", str(work), "--out", str(out)]) == 0
    elapsed = time.time() - t0
    record = json.loads((records / "work.json").read_text())  # named after its workdir
    full, pruned = record["searches"]["none"], record["searches"]["asha"]  # the preset's pruner by default
    assert (full["trials"], full["pruned"], full["failed"], full["epochs"]) == (3, 0, 0, 6)  # every epoch
    assert pruned["trials"] == 3 and pruned["epochs"] <= 6
    # One trial at a time: the trials' spans do not overlap, so the time any trial ran is their sum exactly.
    assert full["wall_s"] == pytest.approx(full["trial_s"], rel=1e-9) and 0 < full["trial_s"] < elapsed
    assert record["command"].endswith("--pruner asha")  # the default, named all the same (--epochs was given)
    text = out.read_text()
    assert f"| asha | 0 | 3 ({pruned['pruned']} pruned, {pruned['failed']} failed) | {pruned['epochs']} / 6 |" in text
    assert "python -m benchmarks.search --render-only --records" in text
    # The record can be rebuilt from the stores, against a reference recipe (here: the unpruned search's own).
    reference = ["--reference-experiment", "bench-search-none", "--reference-recipe", "search"]
    again = tmp_path / "again.md"
    assert search.main([*args, "--workdir", str(work), "--report-only", *reference, "--out", str(again)]) == 0
    rebuilt = json.loads((records / "work.json").read_text())
    assert rebuilt["searches"]["none"]["epochs"] == 6 and rebuilt["command"] == record["command"]
    assert re.search(r"epochs, data (as is|deskewed), seeds", rebuilt["reference"]["what"])
    ref_val = rebuilt["reference"]["val_mean"]
    assert rebuilt["searches"]["none"]["gap"] == pytest.approx(
        100 * (ref_val - rebuilt["searches"]["none"]["best_val"])
    )
    # Another pruner against the same unpruned search: only the pruned one runs, the unpruned study is copied.
    other = tmp_path / "median.md"
    median = ["--workdir", str(tmp_path / "median"), "--pruner", "median", "--unpruned-from", str(work)]
    assert search.main([*args, *median, "--out", str(other)]) == 0
    reused = json.loads((records / "median.json").read_text())
    assert reused["searches"]["none"]["epochs"] == 6 and reused["searches"]["median"]["trials"] == 3
    assert reused["command"].count("--pruner") == 1  # given, so not added
    assert reused["unpruned_from"] == str(work) and "was not run again" in other.read_text()
    assert "### median" in other.read_text() and "### work" in other.read_text()  # the report holds both runs


def test_search_counts_diverged_and_interrupted_trials_apart(tmp_path):
    """A diverged trial is the search's outcome; an interrupted one was rerun. Neither counts epochs."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="bench-none", storage=f"sqlite:///{tmp_path}/optuna.db")
    finished = study.ask()
    finished.report(0.9, 1)
    finished.report(0.95, 2)
    study.tell(finished, 0.95)
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)  # diverged in its first epoch
    interrupted = study.ask()
    interrupted.report(0.5, 1)
    interrupted.set_user_attr("interrupted", True)  # as the sweeper marks it when a relaunch finds it RUNNING
    study.tell(interrupted, state=optuna.trial.TrialState.FAIL)
    study.ask()  # still running

    s = search.study_summary(tmp_path, "none", f"sqlite:///{tmp_path}/mlflow.db")
    assert (s["trials"], s["failed"], s["interrupted"], s["unfinished"], s["epochs"]) == (1, 1, 1, 1, 2)
    assert s["best_val"] == 0.95
    assert search._unfinished(tmp_path, "none", 3)  # 3 finished, but one trial still runs
    assert search._unfinished(tmp_path, "hyperband", 1)  # no such study


@pytest.mark.parametrize(
    ("spans", "union"),
    [
        ([(5.0, 6.0), (0.0, 2.0), (1.0, 3.0)], 4.0),  # overlaps count once
        ([(0.0, 1.0), (5.0, 6.0)], 2.0),  # a gap between them does not count
        ([(0.0, 10.0), (2.0, 3.0)], 10.0),  # one inside another
        ([(0.0, 1.0), (1.0, 2.0)], 2.0),  # back to back, as one trial after another
    ],
)
def test_the_wall_time_of_a_search_is_the_length_of_the_union_of_its_trials(spans, union):
    assert search._covered(spans) == union


def test_search_reports_the_tpe_seed_the_searches_used():
    assert search._tpe_seed(["model.hidden=choice(64,128)"]) == "0"  # the sweeper's default
    assert search._tpe_seed(["hydra.sweeper.seed=1", "trainer.epochs=3", "hydra.sweeper.sampler.seed=7"]) == "7"


def test_search_reuses_the_unpruned_study_of_the_same_command_only(tmp_path):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    earlier, here = tmp_path / "earlier", tmp_path / "here"
    earlier.mkdir(), here.mkdir()
    common_words = "python -m benchmarks.search --trials 40 --override hydra.sweeper.sampler.seed=3"
    (earlier / "searches.json").write_text(
        json.dumps({"command": f"{common_words} --pruner median --workdir {earlier}"})
    )
    study = optuna.create_study(study_name="bench-none", storage=f"sqlite:///{earlier}/optuna.db")
    trial = study.ask()
    trial.report(0.97, 1)
    study.tell(trial, 0.97)

    with pytest.raises(SystemExit, match="it ran other searches"):  # another TPE seed: another unpruned search
        search.copy_unpruned(earlier, here, f"python -m benchmarks.search --trials 40 --workdir {here}")
    with pytest.raises(SystemExit, match="no searches.json"):
        search.copy_unpruned(here, tmp_path, common_words)
    command = f"{common_words} --pruner asha --workdir {here} --out x.md --unpruned-from {earlier}"
    search.copy_unpruned(earlier, here, command)
    search.copy_unpruned(earlier, here, command)  # a relaunch keeps the copy it made
    copied = search._load_study(here, "none").trials
    assert [(t.value, t.intermediate_values) for t in copied] == [(0.97, {1: 0.97})]
    assert not search._unfinished(here, "none", 1)


# --------------------------------------------------------------------------------------------------------------
# augment.py and denormal.py
# --------------------------------------------------------------------------------------------------------------


def test_the_elastic_field_by_its_matrix_is_the_blurred_field():
    h, w, sigma = 28, 28, 4.0
    gh, gw = augment.coarse(h, w, sigma)
    assert (gh, gw) == (8, 8)
    noise = torch.rand(6, gh * gw) * 2 - 1
    blurred = augment.blurred_fields(noise.view(6, 1, gh, gw), h, w, sigma)
    assert blurred.shape == (6, h * w)
    assert torch.allclose(noise @ augment.field_matrix(h, w, sigma), blurred, atol=1e-5)
    assert blurred.std(dim=1).min() > 0  # a field, not zeros


def test_augment_times_both_elastic_fields_beside_a_training_step(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    assert augment.main(["--rounds", "1", "--calls", "2", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("<!-- begin augment -->\n## Augmentation's cost per training step")
    assert f"python -m benchmarks.augment --rounds 1 --calls 2 --out {out}" in text
    rows = [ln for ln in text.splitlines() if ln.startswith(("| elastic field", "| the whole", "| training step"))]
    assert len(rows) == 4 and float(rows[3].split("|")[4]) == 1.0  # the step is the unit
    diff = float(re.search(r"largest difference ([\d.e+-]+)", text)[1])
    assert diff < 1e-4  # the same fields both ways
    with pytest.raises(SystemExit, match="does not augment"):
        augment.main(["--preset", "speedrun", "--out", str(out)])


@pytest.mark.e2e
def test_denormal_times_both_runs_side_by_side(tmp_path, mnist_root, cache_dir):
    out = tmp_path / "BENCHMARKS.md"
    args = ["--data-root", str(mnist_root), "--preset", "speedrun", "--schedule-epochs", "3", "--epochs", "2"]
    args += ["--block", "1", "--override", f"data.cache_dir={cache_dir}", "--override", "model.hidden=32"]
    assert denormal.main([*args, "--out", str(out)]) == 0
    text = out.read_text()
    rows = [ln for ln in text.splitlines() if ln.startswith(("| 1-1 ", "| 2-2 ", "| all 2 "))]
    assert len(rows) == 3 and all(float(ln.split("|")[4]) > 0 for ln in rows)  # a ratio for each block
    assert "<!-- begin denormal -->" in text and "python -m benchmarks.denormal --data-root" in text
    assert "identical in" in text


def test_startup_benchmark_lays_out_the_template_with_uncompressed_mnist(tmp_path):
    from benchmarks import startup

    make_dataset(tmp_path / "mnist", compress=True)
    template = tmp_path / "lht"
    for folder in ("configs/data", "src", "data", "logs", ".git"):
        (template / folder).mkdir(parents=True)
    (template / "configs/data/mnist.yaml").write_text("batch_size: 64\n")
    (template / "data/stale.bin").write_text("x")
    work = startup.prepare_template(template, tmp_path / "mnist", tmp_path / "out")
    raw = work / "data" / "MNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(startup.FILES)
    with gzip.open(tmp_path / "mnist" / "train-labels-idx1-ubyte.gz", "rb") as f:
        assert (raw / "train-labels-idx1-ubyte").read_bytes() == f.read()
    assert (work / "configs/data/mnist.yaml").exists()  # the template's own data config is kept
    assert not (work / ".git").exists() and not (work / "logs").exists() and not (work / "data/stale.bin").exists()


def test_startup_reads_what_the_imports_cost_from_pythons_import_timer():
    from benchmarks import startup

    trace = "\n".join(
        [
            "import time: self [us] | cumulative | imported package",
            "import time:       100 |        200 | hydra",
            "import time:       300 |    1200000 |   torch",
            "import time:      1000 |    1500000 | mnist_sweep",
            "[12:00:00] data: mnist via tensor loader",
            "import time:       500 |     900000 | mlflow",
            "import time:       400 |     700000 | mlflow.store.tracking.sqlalchemy_store",
        ]
    )
    found, total = startup.import_seconds(trace)
    assert found == {"hydra": 0.0002, "torch": 1.2, "mlflow": 0.9, "mlflow.store.tracking.sqlalchemy_store": 0.7}
    assert total == pytest.approx(0.0002 + 1.5 + 0.9 + 0.7)  # torch is inside mnist_sweep's import: counted once


def test_the_gpu_benchmark_says_in_one_line_that_it_needs_a_cuda_device(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the benchmark would run (minutes), not refuse")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--out", str(tmp_path / "gpu.md")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        "error: no CUDA device here; this benchmark measures one (CPU figures: benchmarks.speed)"
    ]
    assert not (tmp_path / "gpu.md").exists()
