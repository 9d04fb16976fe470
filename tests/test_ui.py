"""The links a sweep and a run print open the MLflow UI on what to compare, checked in a real headless browser.

A real 4-trial sweep (and a single run) on tiny synthetic IDX files, `mlflow ui` on their store, Debian's
chromium (`apt-get install chromium`, done by bash .ci/run) driven by Python Playwright, as a first-time visitor
(no saved UI state): the printed link shows the sweep's trials side by side in the model-training view, with the
swept keys and best_val/acc as columns - not MLflow 3's GenAI overview. The sweep's view is photographed; the
README's picture (docs/images/mlflow-sweep.png) is refreshed with
`MNIST_SWEEP_SCREENSHOT=docs/images/mlflow-sweep.png pytest tests/test_ui.py` (other runs leave it alone).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import REPO, make_dataset, train_py
from mnist_sweep import sweep

pytestmark = pytest.mark.e2e

CHROMIUM = Path(os.environ.get("MNIST_SWEEP_CHROMIUM", "/usr/bin/chromium"))
SCREENSHOT = os.environ.get("MNIST_SWEEP_SCREENSHOT")  # where to keep the photo (default: the test's tmp_path)
VIEWPORT = {"width": 1280, "height": 800}
HIDDEN = ("16", "32")
OPTIMIZERS = ("sgd", "adam")
LINK = re.compile(r"(https?://\S+)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _printed_link(stdout: str, prefix: str) -> str:
    lines = [line for line in stdout.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, stdout[-3000:]  # one link, not one per trial
    return LINK.search(lines[0]).group(1)


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """A sweep over model.hidden x optimizer and a single run in a fresh store, and `mlflow ui` on that store:
    (the UI's address, a client of the store, the sweep's printed link, the run's printed link, its output)."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: apt-get install chromium (bash .ci/run does it)")
    workdir = tmp_path_factory.mktemp("ui")
    make_dataset(workdir / "data", n_train=300, n_test=50)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    common = [
        "trainer.epochs=1",
        "data.val_size=100",
        f"data.root={workdir / 'data'}",
        f"data.cache_dir={workdir / 'cache'}",
        "data.download=false",
        "data.verify=false",  # synthetic files: not the published checksums
        f"mlflow.ui_url={url}",
    ]
    swept = train_py(
        "-m", f"model.hidden={','.join(HIDDEN)}", f"optimizer={','.join(OPTIMIZERS)}", *common, cwd=workdir
    )
    assert swept.returncode == 0, swept.stderr[-3000:]
    single = train_py("model.hidden=24", *common, cwd=workdir)
    assert single.returncode == 0, single.stderr[-3000:]
    sweep_link = _printed_link(swept.stdout, "compare the trials in MLflow: ")
    run_link = _printed_link(single.stdout, "see it in MLflow: ")
    store = f"sqlite:///{workdir}/mlruns/mlflow.db"
    # Its own process group: `mlflow ui` leaves helper processes behind unless the whole group is stopped.
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store, "--host", "127.0.0.1", "-p", f"{port}"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None, f"mlflow ui exited with {server.returncode}"
                assert time.monotonic() < deadline, "mlflow ui did not answer /health within 90 s"
                time.sleep(0.5)
        yield url, MlflowClient(store), sweep_link, run_link, swept.stdout + swept.stderr
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=20)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=str(CHROMIUM),
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A first visit: a new browser context, so no UI state saved by an earlier page."""
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    yield page
    context.close()


def _sweep_runs(client: MlflowClient):
    exp = client.get_experiment_by_name("mnist-sweep")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get(sweep.ROLE) == "sweep"]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return exp, parent, trials


def _visible(page, locator) -> bool:
    """On screen, not scrolled out of the table or hidden behind a panel: the element at its centre is it."""
    box = locator.bounding_box()
    if box is None:
        return False
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    if not (0 <= x < VIEWPORT["width"] and 0 <= y < VIEWPORT["height"]):
        return False
    return locator.evaluate("(el, [x, y]) => el.contains(document.elementFromPoint(x, y))", [x, y])


def _cell(row, col_id: str):
    return row.locator(f"[col-id='{col_id}']")


def test_the_sweep_prints_one_link_and_no_progress_bars(ui):
    url, client, sweep_link, _, output = ui
    exp, _, trials = _sweep_runs(client)
    assert sweep_link.startswith(f"{url}/#/experiments/{exp.experiment_id}/runs?")
    assert "workflowType=machine_learning" in sweep_link
    assert len(trials) == len(HIDDEN) * len(OPTIMIZERS)
    assert "Downloading artifacts" not in output and "it/s]" not in output


def test_the_sweep_link_shows_its_trials_side_by_side_with_keys_and_objective(ui, page, tmp_path):
    _, client, sweep_link, _, _ = ui
    exp, parent, trials = _sweep_runs(client)
    # The UI keeps polling: wait for the page's load, then for the element needed (never for network idle).
    page.goto(sweep_link, wait_until="load")
    names = sorted(t.info.run_name for t in trials)
    assert names == sorted(f"hidden={h} optimizer={o}" for h in HIDDEN for o in OPTIMIZERS)  # short, no fixed keys
    for name in names:
        page.get_by_role("link", name=name, exact=True).wait_for(timeout=60000)
    assert page.get_by_role("link", name=parent.info.run_name, exact=True).count() == 0  # not a row: trials only
    assert "/runs" in page.url and "workflowType=machine_learning" in page.url
    body = page.inner_text("body")
    for genai in ("Token Usage", "Tokens per Trace", "Cost Breakdown"):  # MLflow 3's GenAI overview
        assert genai not in body
    assert f"{len(trials)} matching runs" in body  # the sweep's trials, nothing else
    # The swept keys and the objective are columns on screen, without a click.
    columns = {
        "params.`model.hidden`": "model.hidden",
        "params.`optimizer.name`": "optimizer.name",
        "metrics.`best_val/acc`": "best_val/acc",
    }
    for col_id, title in columns.items():
        header = page.locator(f".ag-header-cell[col-id='{col_id}']")
        header.wait_for(timeout=20000)
        assert header.inner_text().strip() == title
        assert _visible(page, header), f"{title} is not on screen"
    # Each trial's row shows its own values, best first.
    by_row = {}
    for t in trials:
        link = page.get_by_role("link", name=t.info.run_name, exact=True)
        row_index = int(link.locator("xpath=ancestor::*[@row-index][1]").get_attribute("row-index"))
        row = page.locator(f".ag-row[row-index='{row_index}']:has([col-id='metrics.`best_val/acc`'])")
        assert _cell(row, "params.`model.hidden`").inner_text().strip() == t.data.params["model.hidden"]
        assert _cell(row, "params.`optimizer.name`").inner_text().strip() == t.data.params["optimizer.name"]
        objective = _cell(row, "metrics.`best_val/acc`")
        assert float(objective.inner_text()) == pytest.approx(t.data.metrics["best_val/acc"], abs=1e-3)
        assert _visible(page, objective)
        by_row[row_index] = t.data.metrics["best_val/acc"]
    assert sorted(by_row) == list(range(len(trials)))
    assert [by_row[i] for i in sorted(by_row)] == sorted(by_row.values(), reverse=True)
    # For the README: what the link opens, MLflow's Assistant panel (open on a first visit) closed.
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()
    page.wait_for_timeout(500)
    shot = REPO / SCREENSHOT if SCREENSHOT else tmp_path / "mlflow-sweep.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000  # a real picture of the page, not an empty canvas


def test_the_run_link_opens_the_run_with_its_dataset_and_source(ui, page):
    _, client, _, run_link, _ = ui
    run_id = re.search(r"/runs/(\w+)\?workflowType=machine_learning$", run_link).group(1)
    single = client.get_run(run_id)
    assert "mlflow.parentRunId" not in single.data.tags and single.info.run_name.startswith("hidden=24 epochs=1")
    page.goto(run_link, wait_until="load")
    page.get_by_text(single.info.run_name, exact=True).first.wait_for(timeout=60000)
    page.get_by_text("Datasets", exact=True).first.wait_for(timeout=20000)
    body = page.inner_text("body")
    assert "mnist (" in body and "Train" in body  # the dataset input, with its digest and context
    assert "train.py" in body  # its source
    assert "Token Usage" not in body


def test_compare_view_plots_best_val_acc_against_model_hidden(ui, page):
    """What the README tells users to do with the trials: Compare, Scatter Plot, best_val/acc against a key."""
    url, client, _, _, _ = ui
    exp, _, trials = _sweep_runs(client)
    ids = json.dumps([t.info.run_id for t in trials], separators=(",", ":"))
    page.goto(f'{url}/#/compare-runs?runs={ids}&experiments=["{exp.experiment_id}"]', wait_until="load")
    page.get_by_text(f"Comparing {len(trials)} Runs").wait_for(timeout=60000)
    page.get_by_text("Scatter Plot", exact=True).click()
    page.locator("#x-axis-selector").click()
    page.get_by_role("option", name="model.hidden", exact=True).click()
    page.locator("#y-axis-selector").click()
    page.get_by_role("option", name="best_val/acc", exact=True).click()
    plot = page.locator("[role=tabpanel]:visible .js-plotly-plot").first
    page.wait_for_function(
        "([el, n]) => el.data && el.data.length && el.data[0].x.length === n",
        arg=[plot.element_handle(), len(trials)],
        timeout=20000,
    )
    assert plot.locator(".xtitle").text_content() == "model.hidden"
    assert plot.locator(".ytitle").text_content() == "best_val/acc"
    data = plot.evaluate("el => el.data.map(t => ({x: Array.from(t.x), y: Array.from(t.y)}))")
    points = sorted(zip(data[0]["x"], data[0]["y"], strict=True))
    expected = sorted((t.data.params["model.hidden"], t.data.metrics["best_val/acc"]) for t in trials)
    assert [float(x) for x, _ in points] == [float(x) for x, _ in expected]
    assert [y for _, y in points] == pytest.approx([y for _, y in expected], abs=1e-6)
