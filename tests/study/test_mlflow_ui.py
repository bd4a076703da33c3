"""MLflow's own UI on a finished smoke study, in headless Chromium (Debian's chromium via
Playwright), as a user opens it from the link `gmwae study status` prints."""
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from study.spec import load_spec
from tests.conftest import ROOT, gmwae

SHOTS = ROOT / "test-artifacts"
KNOWN_CONSOLE = ("/mlflow/users/current",)
"""The UI asks who is signed in; a server without auth answers 404 (MLflow's own request)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_ui(smoke_study):
    spec, folder = smoke_study
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "ui",
                               "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
                               "--host", "127.0.0.1", "--port", str(port)],
                              cwd=folder, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        assert server.poll() is None and time.monotonic() < deadline, "mlflow ui did not start"
        time.sleep(1)
    yield spec, folder, url
    os.killpg(server.pid, 15)
    server.wait(timeout=30)


def printed_link(spec, port_url: str) -> str:
    """The runs-view link `gmwae study status` prints, pointed at this test's server."""
    done = gmwae("study", "status", spec, cwd=spec.parent, timeout=120)
    assert done.returncode == 0, done.stderr
    link = re.search(r"then open (\S+)", done.stdout)
    assert link, done.stdout
    assert "optuna-dashboard sqlite:///" in done.stdout
    return link.group(1).replace("http://127.0.0.1:5000", port_url)


def open_page(url: str, shot: Path, ready: str):
    """Load `url`, wait for `ready`, screenshot it; returns the page's column ids, cells by
    column, visible text and the errors seen (page errors and failed requests)."""
    from playwright.sync_api import sync_playwright

    from dashboards.browser import chromium

    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(),
                                    args=["--no-sandbox", "--enable-unsafe-swiftshader"])
        page = browser.new_page(viewport={"width": 1900, "height": 950})
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("response", lambda r: errors.append(f"{r.status} {r.url}")
                if r.status >= 400 and not r.url.endswith(KNOWN_CONSOLE) else None)
        # Not "networkidle": MLflow 3.17's UI starts a telemetry Web Worker whose script
        # request Chromium 156 never reports finished, so the network never goes idle. The
        # selector below is the page's own readiness.
        page.goto(url, wait_until="load")
        page.wait_for_selector(ready, timeout=60_000)
        page.wait_for_timeout(1500)
        for closer in ("mlflow.assistant.chat_panel.close", "mlflow.experiment_page.shared_view.dismiss"):
            button = page.locator(f'[data-component-id="{closer}"]')
            if button.count():
                button.first.click()
        page.wait_for_timeout(1000)
        SHOTS.mkdir(exist_ok=True)
        page.screenshot(path=str(shot))
        out = page.evaluate("""() => {
            const cells = {};
            for (const c of document.querySelectorAll('[role=gridcell][col-id]')) {
                (cells[c.getAttribute('col-id')] ||= []).push(c.innerText.trim());
            }
            return {headers: Array.from(document.querySelectorAll('.ag-header-cell'))
                                  .map(e => e.getAttribute('col-id')),
                    cells, text: document.body.innerText,
                    charts: Array.from(document.querySelectorAll('[data-testid="experiment-view-compare-runs-card-title"], [role=heading]'))
                                 .map(e => e.innerText.trim())};
        }""")
        browser.close()
    return out, errors


def assert_no_error(text: str, errors: list[str]) -> None:
    assert not errors, errors
    for message in ("Error loading shared view", "Something went wrong", "No runs", "Failed to"):
        assert message not in text, message


def test_the_printed_link_opens_the_trials_sorted_by_validation_accuracy(mlflow_ui):
    spec, folder, url = mlflow_ui
    link = printed_link(spec, url)
    assert "workflowType=machine_learning" in link and "viewStateShareKey=trials" in link
    metric = load_spec(spec).objective.metric  # val/ami: the smoke space searches K
    page, errors = open_page(link, SHOTS / "mlflow-runs.png", f'[col-id="metrics.`{metric}`"]')
    assert_no_error(page["text"], errors)
    assert "Model training" in page["text"] and "Runs" in page["text"]
    for column in ("tags.`family`", "tags.`origin`", f"metrics.`{metric}`", "metrics.`val/cluster_acc`",
                   "metrics.`val/mmd`", "params.`K`", "params.`lambda_mmd`"):
        assert column in page["headers"], column

    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    experiment = client.get_experiment_by_name("smoke")
    trials = client.search_runs([experiment.experiment_id], "tags.role = 'trial'")
    shown = [float(v) for v in page["cells"][f"metrics.`{metric}`"]]
    assert len(shown) == len(trials) == 6  # the trials only: the parent and confirm runs filtered out
    assert shown == sorted(shown, reverse=True)  # best first
    assert sorted(shown) == pytest.approx(sorted(r.data.metrics[metric] for r in trials), abs=1e-3)
    assert sorted(page["cells"]["tags.`family`"]) == ["gmvae"] * 3 + ["gmwae"] * 3
    # where each trial came from: each family's paper point, then the sampler's
    assert sorted(page["cells"]["tags.`origin`"]) == ["paper point"] * 2 + ["sampled"] * 4


def test_the_family_view_compares_the_top_runs_val_curves(mlflow_ui):
    spec, folder, url = mlflow_ui
    link = printed_link(spec, url).replace("viewStateShareKey=trials",
                                           "viewStateShareKey=trials-gmwae") + "&compareRunsMode=CHART"
    # MLflow orders the charts by metric name; the first ones are drawn first.
    page, errors = open_page(link, SHOTS / "mlflow-compare.png", "text=val/active_components")
    assert_no_error(page["text"], errors)
    assert "3 matching runs" in page["text"]
    shown = re.findall(r"gmwae-\d", page["text"])
    assert set(shown) == {"gmwae-0", "gmwae-1", "gmwae-2"} and "gmvae-0" not in page["text"]
    for chart in ("val/active_components", "val/ami"):  # the first charts drawn
        assert chart in page["text"], chart
    assert "train/loss" not in page["text"]  # the charts are filtered to val/
