"""The MLflow UI shows a sweep the way a user compares runs, checked in a real headless browser (issue 3).

Debian's chromium (`apt-get install chromium`, done by bash .ci/run) driven by Python Playwright against
`mlflow ui` on the project's SQLite store: the experiment page lists the sweep with its trials grouped under
it, and the compare view plots val/acc against model.hidden.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import train_py
from mnist_sweep import sweep

pytestmark = pytest.mark.e2e

CHROMIUM = Path(os.environ.get("MNIST_SWEEP_CHROMIUM", "/usr/bin/chromium"))
HIDDEN = ("16", "32", "48")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ui(tmp_path_factory, mnist_root, cache_dir):
    """A 3-trial sweep over model.hidden in a fresh store, and `mlflow ui` on that store."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: apt-get install chromium (bash .ci/run does it)")
    workdir = tmp_path_factory.mktemp("ui")
    proc = train_py(
        "-m",
        f"model.hidden={','.join(HIDDEN)}",
        "trainer.epochs=1",
        "mlflow.log_model=false",
        f"data.root={mnist_root}",
        f"data.cache_dir={cache_dir}",
        cwd=workdir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    store = f"sqlite:///{workdir}/mlruns/mlflow.db"
    port = _free_port()
    # Its own process group: `mlflow ui` leaves helper processes behind unless the whole group is stopped.
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store, "--host", "127.0.0.1", "-p", f"{port}"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "mlflow ui did not start"
                time.sleep(0.5)
        yield url, MlflowClient(store)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


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


def _sweep_runs(client: MlflowClient):
    exp = client.get_experiment_by_name("mnist-sweep")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get(sweep.ROLE) == "sweep"]
    trials = [r for r in runs if r.info.run_id != parent.info.run_id]
    return exp.experiment_id, parent, trials


def test_experiment_page_groups_the_trials_under_the_sweep(ui, browser):
    url, client = ui
    experiment_id, parent, trials = _sweep_runs(client)
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    # The UI keeps polling: wait for the page's load, then for the element needed (never for network idle).
    page.goto(f"{url}/#/experiments/{experiment_id}/runs", wait_until="load")
    page.get_by_text(parent.info.run_name, exact=True).wait_for(timeout=60000)
    for t in trials:  # grouped: only the sweep is listed until it is expanded
        assert page.get_by_text(t.info.run_name, exact=True).count() == 0
    row = page.locator("[role=row]", has_text=parent.info.run_name)
    row.locator("button[data-component-id*='runnamecellrenderer']").first.click()  # the sweep's expander
    for t in trials:
        page.get_by_text(t.info.run_name, exact=True).wait_for(timeout=20000)
    page.close()


def test_compare_view_plots_val_acc_against_model_hidden(ui, browser):
    url, client = ui
    experiment_id, _, trials = _sweep_runs(client)
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    ids = json.dumps([t.info.run_id for t in trials], separators=(",", ":"))
    page.goto(f'{url}/#/compare-runs?runs={ids}&experiments=["{experiment_id}"]', wait_until="load")
    page.get_by_text(f"Comparing {len(trials)} Runs").wait_for(timeout=60000)
    page.get_by_text("Scatter Plot", exact=True).click()
    page.locator("#x-axis-selector").click()
    page.get_by_role("option", name="model.hidden", exact=True).click()
    page.locator("#y-axis-selector").click()
    page.get_by_role("option", name="val/acc", exact=True).click()
    plot = page.locator("[role=tabpanel]:visible .js-plotly-plot").first
    page.wait_for_function(
        "el => el.data && el.data.length && el.data[0].x.length === 3", arg=plot.element_handle(), timeout=20000
    )
    assert plot.locator(".xtitle").text_content() == "model.hidden"
    assert plot.locator(".ytitle").text_content() == "val/acc"
    data = plot.evaluate("el => el.data.map(t => ({x: Array.from(t.x), y: Array.from(t.y)}))")
    points = sorted(zip(data[0]["x"], data[0]["y"], strict=True), key=lambda p: float(p[0]))
    expected = sorted(
        ((t.data.params["model.hidden"], t.data.metrics["val/acc"]) for t in trials), key=lambda p: float(p[0])
    )
    assert [float(x) for x, _ in points] == [float(h) for h in HIDDEN]
    assert [y for _, y in points] == pytest.approx([y for _, y in expected], abs=1e-6)
    page.close()
