"""The speed work: the benchmark script, the speedrun preset, and the training loop's GPU-style code path.

Behaviour only: no test asserts a wall-clock time (timings belong in docs/BENCHMARKS.md, from the bench).
"""

from __future__ import annotations

import math
import re

import mlflow
import pytest
import torch
from torch import nn

from conftest import tiny_fit, train_py
from mnist_sweep import bench, bench_augment, bench_denormal, bench_dropout, bench_search, bench_tta, model, training


def test_speedrun_preset_composes_with_its_recipe():
    cfg, s = bench.compose(["experiment=speedrun"])
    assert (s.model.hidden, s.model.depth) == (256, 2)
    assert s.data.batch_size == 512 and s.data.loader == "tensor"
    assert s.trainer.precision == "bf16" and s.trainer.epochs == 4 and s.trainer.label_smoothing == 0.1
    assert s.optimizer.lr == pytest.approx(5e-3) and s.scheduler.warmup > 0
    # Command-line overrides still win over the recipe.
    _, s2 = bench.compose(["experiment=speedrun", "trainer.precision=fp32", "data.batch_size=256"])
    assert s2.trainer.precision == "fp32" and s2.data.batch_size == 256


def test_tutorial_net_is_784_128_64_10():
    net = bench.tutorial_net()
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 128), (128, 64), (64, 10)]
    assert net(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert model.flops_per_sample(net) == 2 * (784 * 128 + 128 * 64 + 64 * 10)


def test_trial_time_to_threshold_and_throughput():
    t = bench.Trial("x", flops_per_sample=1000, times=[1.0, 2.0, 3.0], test_acc=[0.96, 0.976, 0.981])
    t.samples_per_s = [100.0, 200.0, 300.0]
    assert t.time_to(0.975) == 2.0 and t.time_to(0.98) == 3.0 and t.time_to(0.99) is None
    assert t.throughput == 300.0  # the fastest epoch
    assert t.gflops == pytest.approx(3 * 1000 * 300 / 1e9)
    assert t.epoch_seconds == 1.0 and t.final_acc == 0.981


def test_matmul_peak_is_measured():
    assert bench.matmul_gflops(64, torch.float32, seconds=0.01, repeats=1) > 0


def _fit(root, cache, **fit_args):
    """(epochs, test metrics) of a 2-layer tiny net on the GPU recipe's cosine schedule."""

    def schedule(step, total):
        return training.lr_multiplier(step, total, 0.25, 0.04, "cosine", 0.0)

    _, test, seen = tiny_fit(root, cache, depth=2, schedule=schedule, **fit_args)
    return seen, test


def test_gpu_style_loop_gives_the_same_metrics_as_the_cpu_loop(tiny_data, tmp_path):
    """The GPU's loop looks at the loss only every 50 steps; apart from that it is the CPU's loop."""
    every_step, _ = _fit(tiny_data[0], tmp_path, check_every=1)
    rarely, _ = _fit(tiny_data[0], tmp_path, check_every=50)
    assert [(e.train_loss, e.val_acc) for e in every_step] == [(e.train_loss, e.val_acc) for e in rarely]


def test_gpu_style_loop_still_stops_a_diverging_run(tiny_data, tmp_path):
    # A loss above max_loss at any step is remembered on the device until the host looks.
    with pytest.raises(training.DivergedError, match="diverged"):
        _fit(tiny_data[0], tmp_path, check_every=50, lr=1e6)


def test_speedrun_recipe_is_deterministic_in_bf16(tiny_data, tmp_path):
    """bf16 autocast and label smoothing (the speedrun's recipe): same seed, same metrics."""
    a, ta = _fit(tiny_data[0], tmp_path, precision="bf16", label_smoothing=0.1, seed=3)
    b, tb = _fit(tiny_data[0], tmp_path, precision="bf16", label_smoothing=0.1, seed=3)
    assert [(e.train_loss, e.val_loss) for e in a] == [(e.train_loss, e.val_loss) for e in b]
    assert (ta.loss, ta.acc) == (tb.loss, tb.acc)
    assert all(math.isfinite(e.train_loss) for e in a)


def test_speedrun_recipe_bf16_within_tolerance_of_fp32(tiny_data, tmp_path):
    # Stated tolerance on the 40 synthetic test images: 4 images (0.1) of accuracy, 0.25 of loss.
    _, fp32 = _fit(tiny_data[0], tmp_path, label_smoothing=0.1, epochs=4)
    _, bf16 = _fit(tiny_data[0], tmp_path, precision="bf16", label_smoothing=0.1, epochs=4)
    assert abs(fp32.acc - bf16.acc) <= 0.1
    assert abs(fp32.loss - bf16.loss) <= 0.25


@pytest.mark.e2e
def test_bench_quick_writes_the_report(tmp_path, mnist_root):
    out = tmp_path / "BENCHMARKS.md"
    assert bench.main(["--quick", "--silent", "--data-root", str(mnist_root), "--out", str(out)]) == 0
    text = out.read_text()
    for section in (
        "# Benchmarks",
        "## Machine",
        "## Headline",
        "## `experiment=speedrun` over seeds",
        "## Data loaders",
        "## `python train.py` end to end",
        "## Training throughput against the machine's peak",
        "## bf16 vs fp32",
        "## Evaluation of the 10,000 test images",
        "BENCHMARKS-sweeps.md",
        "## GPU",
    ):
        assert section in text, section
    assert "python -m mnist_sweep.bench --quick" in text  # the exact command
    assert "torch " + torch.__version__ in text
    assert "--quick smoke mode" in text
    assert "GFLOP/s" in text and "samples/s" in text


@pytest.mark.e2e
def test_bench_search_runs_both_searches_side_by_side_and_counts_their_epochs(tmp_path, mnist_root, cache_dir):
    out, work = tmp_path / "BENCHMARKS-search.md", tmp_path / "work"
    tiny = ["model.hidden=choice(16,24)", "model.depth=range(1,2)", "data.batch_size=choice(512)"]
    tiny += [f"data.cache_dir={cache_dir}", "hydra.sweeper.startup_trials=1", "hydra.sweeper.warmup_epochs=0"]
    args = ["--data-root", str(mnist_root), "--trials", "3", "--epochs", "2", "--workdir", str(work)]
    args += [a for o in tiny for a in ("--override", o)]
    assert bench_search.main([*args, "--out", str(out)]) == 0
    text = out.read_text()
    rows = _search_rows(text)
    trials, pruned, failed, epochs = (int(rows["no pruning"][i]) for i in range(4))
    assert (trials, pruned, failed, epochs) == (3, 0, 0, 6)  # no pruning: every trial runs every epoch
    assert int(rows["asha pruner"][0]) == 3 and int(rows["asha pruner"][3]) <= 6  # the preset's pruner by default
    assert f"--out {out} --pruner asha`" in text  # the default, named in the report's command all the same
    trial_s, wall_s = (float(rows["no pruning"][i]) for i in (6, 7))
    assert 0 < wall_s <= trial_s + 1  # one trial at a time: the wall time is the trials' (rounded)
    assert "Pruning saved" in text and "python -m mnist_sweep.bench_search --data-root" in text
    # The report can be rebuilt from the stores, against a reference recipe (here: the unpruned search's own).
    reference = ["--reference-experiment", "bench-search-none", "--reference-recipe", "search"]
    again = tmp_path / "again.md"
    assert bench_search.main([*args, "--report-only", *reference, "--out", str(again)]) == 0
    rebuilt = again.read_text()
    assert _search_rows(rebuilt) == rows and rebuilt.splitlines()[2] == text.splitlines()[2]  # same rows, command
    assert "Gap of the pruned search's best trial to it" in rebuilt
    assert re.search(r"epochs, data (as is|deskewed), seeds", rebuilt)  # what the reference trained on
    # Another pruner against the same unpruned search: only the pruned one runs, the unpruned study is copied.
    other = tmp_path / "median.md"
    median = [a if a != str(work) else str(tmp_path / "median") for a in args]
    assert bench_search.main([*median, "--pruner", "median", "--unpruned-from", str(work), "--out", str(other)]) == 0
    reused = _search_rows(other.read_text())
    unpruned = reused["no pruning"]
    assert unpruned[:5] == rows["no pruning"][:5] and unpruned[6:] == rows["no pruning"][6:]  # its test: re-run
    assert int(reused["median pruner"][0]) == 3
    assert other.read_text().count("--pruner") == 1  # given, so not added
    assert "The unpruned search was not run again here" in other.read_text()


@pytest.mark.e2e
def test_bench_denormal_times_both_runs_side_by_side(tmp_path, mnist_root, cache_dir):
    out = tmp_path / "BENCHMARKS-denormal.md"
    args = ["--data-root", str(mnist_root), "--preset", "speedrun", "--schedule-epochs", "3", "--epochs", "2"]
    args += ["--block", "1", "--override", f"data.cache_dir={cache_dir}", "--override", "model.hidden=32"]
    assert bench_denormal.main([*args, "--out", str(out)]) == 0
    text = out.read_text()
    rows = [ln for ln in text.splitlines() if ln.startswith(("| 1-1 ", "| 2-2 ", "| all 2 "))]
    assert len(rows) == 3 and all(float(ln.split("|")[4]) > 0 for ln in rows)  # a ratio for each block
    assert "device.flush_denormal" in text and "python -m mnist_sweep.bench_denormal --data-root" in text
    assert "identical in" in text


def _search_rows(text: str) -> dict[str, list[str]]:
    lines = [
        ln
        for ln in text.splitlines()
        if ln.startswith("| ") and ln.split("|")[1].strip().endswith(("pruner", "no pruning"))
    ]
    return {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in lines}


def test_bench_search_counts_diverged_and_interrupted_trials_apart(tmp_path):
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

    s = bench_search.study_summary(tmp_path, "none", f"sqlite:///{tmp_path}/mlflow.db")
    assert (s["trials"], s["failed"], s["interrupted"], s["unfinished"], s["epochs"]) == (1, 1, 1, 1, 2)
    assert s["best_val"] == 0.95
    assert bench_search._unfinished(tmp_path, "none", 3)  # 3 finished, but one trial still runs
    assert bench_search._unfinished(tmp_path, "hyperband", 1)  # no such study
    assert bench_search._covered([(5.0, 6.0), (0.0, 2.0), (1.0, 3.0)]) == 4.0  # overlaps count once


def test_bench_search_reports_the_tpe_seed_the_searches_used():
    assert bench_search._tpe_seed(["model.hidden=choice(64,128)"]) == "0"  # the sweeper's default
    assert bench_search._tpe_seed(["hydra.sweeper.seed=1", "trainer.epochs=3", "hydra.sweeper.seed=7"]) == "7"


def test_bench_search_reuses_the_unpruned_study_of_the_same_command_only(tmp_path):
    import json

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    earlier, here = tmp_path / "earlier", tmp_path / "here"
    earlier.mkdir(), here.mkdir()
    common = "python -m mnist_sweep.bench_search --trials 40 --override hydra.sweeper.seed=3"
    (earlier / "searches.json").write_text(json.dumps({"command": f"{common} --pruner median --workdir {earlier}"}))
    study = optuna.create_study(study_name="bench-none", storage=f"sqlite:///{earlier}/optuna.db")
    trial = study.ask()
    trial.report(0.97, 1)
    study.tell(trial, 0.97)

    with pytest.raises(SystemExit, match="it ran other searches"):  # another TPE seed: another unpruned search
        bench_search.copy_unpruned(earlier, here, f"python -m mnist_sweep.bench_search --trials 40 --workdir {here}")
    with pytest.raises(SystemExit, match="no searches.json"):
        bench_search.copy_unpruned(here, tmp_path, common)
    command = f"{common} --pruner asha --workdir {here} --out x.md --unpruned-from {earlier}"
    bench_search.copy_unpruned(earlier, here, command)
    bench_search.copy_unpruned(earlier, here, command)  # a relaunch keeps the copy it made
    copied = bench_search._load_study(here, "none").trials
    assert [(t.value, t.intermediate_values) for t in copied] == [(0.97, {1: 0.97})]
    assert not bench_search._unfinished(here, "none", 1)


def test_bench_augment_times_both_elastic_fields_beside_a_training_step(tmp_path):
    out = tmp_path / "BENCHMARKS-augment.md"
    assert bench_augment.main(["--rounds", "1", "--calls", "2", "--out", str(out)]) == 0
    text = out.read_text()
    assert "python -m mnist_sweep.bench_augment --rounds 1 --calls 2" in text
    rows = [ln for ln in text.splitlines() if ln.startswith(("| distortion", "| training step"))]
    assert len(rows) == 3 and float(rows[2].split("|")[4]) == 1.0  # the step is the unit
    diff = float(re.search(r"largest pixel difference ([\d.e+-]+)", text)[1])
    assert diff < 1e-4  # the same images both ways
    with pytest.raises(SystemExit, match="does not augment"):
        bench_augment.main(["--preset", "speedrun", "--out", str(out)])


def test_bench_dropout_times_torchs_mask_and_the_candidates_on_the_same_net(tmp_path):
    out = tmp_path / "BENCHMARKS-dropout.md"
    args = ["--presets", "best", "--ps", "0.5", "--shape", "8", "16", "--rounds", "1", "--calls", "1"]
    assert bench_dropout.main([*args, "--out", str(out)]) == 0
    text = out.read_text()
    assert "python -m mnist_sweep.bench_dropout --presets best --ps 0.5" in text
    layer = [ln for ln in text.splitlines() if ln.startswith("| 0.5 |")]
    step = [ln for ln in text.splitlines() if ln.startswith("| `experiment=best` | 0.2, 0.5 | 3 |")]
    assert len(layer) == 1 and len(step) == 1
    torch_ms, uniform_ms, ratio = (float(v) for v in step[0].split("|")[4:7])
    assert ratio == pytest.approx(torch_ms / uniform_ms, abs=0.01)


def test_bench_dropout_compares_nets_that_differ_only_in_their_dropout_layers():
    net = model.build(members=2, hidden=8, depth=2, dropout=0.5, input_dropout=0.2)
    candidate = bench_dropout.with_uniform_mask(net)
    rates = lambda n, kind: [m.p for m in n.modules() if type(m) is kind]  # noqa: E731
    assert rates(net, torch.nn.Dropout) == [0.2, 0.5, 0.5] * 2 and rates(net, bench_dropout.UniformMaskDropout) == []
    assert rates(candidate, bench_dropout.UniformMaskDropout) == [0.2, 0.5, 0.5] * 2
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(net.eval()(x), candidate.eval()(x))  # the same weights


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_the_candidate_mask_is_dropout_keeping_each_unit_with_probability_1_minus_p(p):
    drop = bench_dropout.UniformMaskDropout(p).train()
    x = torch.full((1000, 1000), 3.0, dtype=torch.bfloat16, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert y.dtype == torch.bfloat16
    assert abs(kept.float().mean().item() - (1 - p)) < 0.003  # 10^6 draws: std under 0.0005
    assert torch.allclose(y[kept].float(), torch.tensor(3 / (1 - p)), rtol=1e-2)  # bf16 rounds 1 / 0.9
    y.sum().backward()  # a dropped unit gets no gradient, a kept one the same scale
    assert torch.equal(x.grad != 0, kept)
    assert torch.equal(drop.eval()(x), x)


def test_bench_tta_rescores_a_finished_run_on_its_own_validation_split(tmp_path, mnist_root, cache_dir):
    args = ["trainer.epochs=1", "model.hidden=32", "model.depth=1", "data.augment.strength=1", "mlflow.log_model=false"]
    proc = train_py(*args, f"data.root={mnist_root}", f"data.cache_dir={cache_dir}", "hydra.run.dir=run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    val, test = (float(re.search(rf"{k}/acc (\d\.\d+)", proc.stdout)[1]) for k in ("val", "test"))
    out = tmp_path / "BENCHMARKS-tta.md"
    run = str(tmp_path / "run")
    assert bench_tta.main([run, "--views", "2", "--strengths", "0.5", "1", "--test", "0.5", "--out", str(out)]) == 0
    row = next(ln for ln in out.read_text().splitlines() if ln.startswith(f"| `{run}`"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "0" and len(cells) == 7  # run, seed, val plain / 0.5 / 1, test plain / 0.5
    # Plain scoring reproduces what the run itself reported: the same net, on the same split.
    assert float(cells[2]) == pytest.approx(100 * val, abs=0.006)
    assert float(cells[5]) == pytest.approx(100 * test, abs=0.006)
    assert cells[3] != cells[4]  # the strengths distort differently
    # Two copies of one net voting together vote as that net does.
    assert (
        bench_tta.main([run, run, "--views", "1", "--strengths", "1", "--test", "1", "--ensemble", "--out", str(out)])
        == 0
    )
    row = next(ln for ln in out.read_text().splitlines() if ln.startswith("| ensemble of the 2 nets"))
    assert [c.strip() for c in row.strip("|").split("|")][2:] == [cells[2], "-", cells[5], "-"]
    assert bench_tta.main([run, "--views", "1", "--strengths", "1", "--test", "0", "--out", str(out)]) == 0
    assert "| test plain |" in out.read_text() and "test TTA" not in out.read_text()  # plain chosen: plain only
    # The net is scored with the config saved beside its weights, whatever .hydra/ says: two runs started in the
    # same second once shared a folder, and one's .hydra/overrides.yaml then held the other's.
    other = f"- data.root={mnist_root}\n- data.val_size=100\n- model.norm=batch\n"
    (tmp_path / "run" / ".hydra" / "overrides.yaml").write_text(other)
    assert bench_tta.main([run, "--views", "1", "--strengths", "1", "--out", str(out)]) == 0
    row = next(ln for ln in out.read_text().splitlines() if ln.startswith(f"| `{run}`"))
    assert [c.strip() for c in row.strip("|").split("|")][1:3] == ["0", cells[2]]
    # The same run, read back from what MLflow logged (checkpoint/ among its artifacts).
    logged = str(next((tmp_path / "mlruns").glob("*/*/artifacts/checkpoint")).parent)
    assert bench_tta.main([logged, "--views", "1", "--strengths", "1", "--out", str(out)]) == 0
    row = next(ln for ln in out.read_text().splitlines() if ln.startswith(f"| `{logged}`"))
    assert [c.strip() for c in row.strip("|").split("|")][1:3] == ["0", cells[2]]
    with pytest.raises(SystemExit):
        bench_tta.main([run, "--strengths", "0.5", "--test", "1", "--out", str(out)])  # test only where validated
    with pytest.raises(SystemExit, match="not found"):
        bench_tta.main([str(tmp_path), "--out", str(out)])
    with pytest.raises(SystemExit, match=f"^{re.escape(run)}: --recalibrate needs a net with batch norm"):
        bench_tta.main([run, "--strengths", "1", "--recalibrate", "--out", str(out)])  # the run had none


def test_recalibrate_averages_batch_norm_statistics_over_the_clean_images():
    """Each BatchNorm's running mean and variance become its inputs' plain averages over the loader's batches,
    with dropout off, and the weights do not move."""
    torch.manual_seed(0)
    net = model.MLP(in_features=6, hidden=5, depth=2, norm="batch", dropout=0.5)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.fill_(7.0)  # what training's running average left behind
    batches = [(torch.randn(8, 6) * 3 + 1, torch.zeros(8, dtype=torch.long)) for _ in range(4)]
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "batches" not in k}
    bench_tta.recalibrate(net, batches, torch.device("cpu"), "fp32")
    assert not net.training
    linear1, norm1, linear2, norm2 = net.net[1], net.net[2], net.net[5], net.net[6]
    with torch.no_grad():
        h1 = [linear1(x) for x, _ in batches]
        # Inside the pass each batch is normalised by its own statistics, as in training; the second layer's
        # inputs come without dropout, as in evaluation.
        h2 = [linear2(torch.relu(nn.functional.batch_norm(h, None, None, norm1.weight, norm1.bias, True))) for h in h1]
    for norm, h in ((norm1, h1), (norm2, h2)):
        assert torch.allclose(norm.running_mean, torch.stack([b.mean(0) for b in h]).mean(0), atol=1e-5)
        assert torch.allclose(norm.running_var, torch.stack([b.var(0) for b in h]).mean(0), atol=1e-5)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in weights.items())


def test_a_run_with_test_time_augmentation_reports_what_bench_tta_measures(tmp_path, mnist_root, cache_dir):
    args = ["trainer.epochs=1", "model.hidden=32", "model.depth=1", "trainer.tta_views=2", "trainer.tta_strength=0.5"]
    proc = train_py(*args, f"data.root={mnist_root}", f"data.cache_dir={cache_dir}", "hydra.run.dir=run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    val, test = (float(re.search(rf"{k}/acc (\d\.\d+)", proc.stdout)[1]) for k in ("val", "test"))
    out, run = tmp_path / "BENCHMARKS-tta.md", str(tmp_path / "run")
    assert bench_tta.main([run, "--views", "2", "--strengths", "0.5", "--test", "0.5", "--out", str(out)]) == 0
    cells = [c.strip() for c in out.read_text().splitlines()[-4].strip("|").split("|")]  # the run's row
    assert cells[0] == f"`{run}`"
    assert float(cells[3]) == pytest.approx(100 * val, abs=0.006)  # val TTA 0.5
    assert float(cells[5]) == pytest.approx(100 * test, abs=0.006)  # test TTA 0.5
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (logged,) = client.search_runs([client.get_experiment_by_name("mnist-sweep").experiment_id])
    m = logged.data.metrics
    assert m["best_val/acc"] == pytest.approx(val, abs=5e-5) and m["test/acc"] == pytest.approx(test, abs=5e-5)
    assert m["best_val/acc_plain"] == pytest.approx(float(cells[2]) / 100, abs=5e-5)
    assert m["test/acc_plain"] == pytest.approx(float(cells[4]) / 100, abs=5e-5)
    assert logged.data.params["trainer.tta_views"] == "2"
