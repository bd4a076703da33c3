"""The report opened in Debian's headless Chromium with the network off (Playwright)."""
import os
import shutil
from pathlib import Path

import pytest

from dashboards.report import build_report
from tests.conftest import gmwae
from tests.dashboards.test_data import failed_only

ARTIFACTS = Path(os.environ.get("GMWAE_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def open_offline(html: Path, screenshot: Path) -> dict:
    """Load `html` with the network off; return console errors, outside requests and, per
    Plotly container, how many traces it holds and whether it drew an SVG."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "Debian's chromium is needed: apt-get install chromium (make sysdeps)"
    errors, outside = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--no-sandbox", "--enable-unsafe-swiftshader"])
        context = browser.new_context(offline=True, viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: None if r.url.startswith(("file:", "data:", "blob:"))
                else outside.append(r.url))
        page.goto(html.as_uri(), wait_until="load")
        page.wait_for_timeout(500)
        figures = page.evaluate("""() => Array.from(document.querySelectorAll('div.figure')).map(
            f => { const g = f.querySelector('.js-plotly-plot');
                   return {id: g ? g.id : null, traces: g && g.data ? g.data.length : 0,
                           svg: g ? g.querySelectorAll('svg.main-svg').length : 0}; })""")
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    return {"errors": errors, "outside": outside, "figures": figures}


def test_the_smoke_report_renders_every_figure_offline(smoke_study):
    spec, folder = smoke_study
    out = folder / "report.html"
    done = gmwae("dashboard", spec, "--out", out, cwd=folder)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = open_offline(out, ARTIFACTS / "dashboard-smoke.png")
    assert seen["errors"] == [] and seen["outside"] == []
    assert len(seen["figures"]) >= 15
    empty = [f for f in seen["figures"] if f["traces"] == 0 or f["svg"] == 0]
    assert empty == []
    assert (ARTIFACTS / "dashboard-smoke.png").stat().st_size > 50_000


def test_a_report_of_failed_trials_renders_too(tmp_path):
    out = tmp_path / "failed.html"
    out.write_text(build_report(failed_only()))
    seen = open_offline(out, ARTIFACTS / "dashboard-failed-only.png")
    assert seen["errors"] == [] and seen["outside"] == []
    assert all(f["traces"] > 0 and f["svg"] > 0 for f in seen["figures"])


def test_dashboard_of_a_missing_study_is_a_clear_error(tmp_path):
    done = gmwae("dashboard", "never-ran", cwd=tmp_path)
    assert done.returncode == 2 and "No study 'never-ran'" in done.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.html"))
