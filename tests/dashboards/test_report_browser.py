"""The report opened in Debian's headless Chromium with the network off (Playwright)."""
import os
from pathlib import Path

from dashboards.browser import open_offline
from dashboards.report import build_report
from tests.conftest import gmwae
from tests.dashboards.test_data import failed_only

ARTIFACTS = Path(os.environ.get("GMWAE_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts"))


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
