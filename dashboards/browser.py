"""Open a report in Debian's headless Chromium with the network off (Playwright drives it).

    python -m dashboards.browser runs/quickstart/report.html --out docs/img

prints what the page did (console errors, requests that left the machine, traces per
figure) and writes a full-page screenshot plus one per section. The tests use
`open_offline` to check every report they build. Needs the `test` extra (playwright) and
`apt-get install chromium`; Playwright's own browser download is never used.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Optional

__all__ = ["open_offline", "SECTIONS"]

SECTIONS = ("overview", "comparison", "collapse", "insight", "curves", "trials")

_FIGURES_JS = """() => Array.from(document.querySelectorAll('div.figure')).map(f => {
    const g = f.querySelector('.js-plotly-plot');
    return {id: g ? g.id : null, traces: g && g.data ? g.data.length : 0,
            svg: g ? g.querySelectorAll('svg.main-svg').length : 0}; })"""

_SECTION_BOX_JS = """(id) => { const h = document.getElementById(id); if (!h) return null;
    let end = h.nextElementSibling; while (end && end.tagName !== 'H2') end = end.nextElementSibling;
    const top = h.getBoundingClientRect().top + window.scrollY;
    const bottom = end ? end.getBoundingClientRect().top + window.scrollY : document.body.scrollHeight;
    return {x: 0, y: top, width: document.body.scrollWidth, height: bottom - top}; }"""


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        raise RuntimeError("Debian's chromium is needed: apt-get install chromium (make sysdeps)")
    return path


def open_offline(html: Path, screenshot: Optional[Path] = None,
                 sections_to: Optional[Path] = None, width: int = 1400) -> dict:
    """Load `html` with the network off. Returns console errors, requests for anything but
    the file itself, and per figure container its traces and drawn SVGs."""
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    outside: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(),
                                    args=["--no-sandbox", "--enable-unsafe-swiftshader"])
        context = browser.new_context(offline=True, viewport={"width": width, "height": 1000})
        page = context.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: None if r.url.startswith(("file:", "data:", "blob:"))
                else outside.append(r.url))
        page.goto(Path(html).resolve().as_uri(), wait_until="load")
        page.wait_for_timeout(500)
        figures = page.evaluate(_FIGURES_JS)
        if screenshot is not None:
            Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
        if sections_to is not None:
            Path(sections_to).mkdir(parents=True, exist_ok=True)
            for name in SECTIONS:
                box = page.evaluate(_SECTION_BOX_JS, name)
                if box and box["height"] > 0:
                    page.screenshot(path=str(Path(sections_to) / f"report-{name}.png"),
                                    full_page=True, clip=box)
        browser.close()
    return {"errors": errors, "outside": outside, "figures": figures}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dashboards.browser",
                                description=__doc__.split("\n")[0])
    p.add_argument("report", help="an HTML report (gmwae dashboard NAME)")
    p.add_argument("--out", default=None, help="folder for the screenshots (default: none)")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else None
    seen = open_offline(Path(args.report), out / "report-full.png" if out else None, out)
    print(json.dumps({"console_errors": seen["errors"], "outside_requests": seen["outside"],
                      "figures": len(seen["figures"]),
                      "empty_figures": [f for f in seen["figures"] if not f["traces"]]}, indent=2))
    return 1 if seen["errors"] or seen["outside"] else 0


if __name__ == "__main__":
    sys.exit(main())
