"""The reports as a reader sees them: reports/index.html (and every executed-notebook page present) loaded in
Debian's headless chromium through Playwright; a broken image, a card without its headline figure, a table
wider than its card or a console error fails; a screenshot of the index is saved."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import scratch_reports
from lrkit import reports
from lrkit.utils import REPORTS_DIR

CHROMIUM = shutil.which("chromium")
# CI installs chromium (.ci/run) and sets CI=1: there the browser test must run, never skip.
if not os.environ.get("CI"):
    pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = Path(os.environ.get("LRKIT_SCREENSHOTS", REPORTS_DIR / "screenshots"))

PAGE_CHECKS = """() => ({
  broken: Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src')),
  cardsWithoutFigure: Array.from(document.querySelectorAll('section.card[data-headline]'))
      .filter(c => !c.querySelector('img')).map(c => c.id),
  overflowing: Array.from(document.querySelectorAll('section.card table')).filter(t => {
      const card = t.closest('section.card').getBoundingClientRect(), r = t.getBoundingClientRect();
      return r.right > card.right + 1 || r.left < card.left - 1; }).length,
  cards: document.querySelectorAll('section.card').length,
  verdictBadges: document.querySelectorAll('nav .v').length,
})"""


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "chromium is not installed (apt-get install chromium)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


def _load(browser, path: Path, width=1280):
    page = browser.new_page(viewport={"width": width, "height": 900})
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.resolve().as_uri(), wait_until="load")
    return page, errors


@pytest.mark.parametrize("width", [1280, 800])
def test_index_in_a_real_browser(browser, width):
    index = reports.build_index("cpu")
    page, errors = _load(browser, index, width)
    found = page.evaluate(PAGE_CHECKS)
    assert not errors, errors
    assert not found["broken"], f"broken images: {found['broken']}"
    assert not found["cardsWithoutFigure"], f"cards without their headline figure: {found['cardsWithoutFigure']}"
    assert found["overflowing"] == 0, f"{found['overflowing']} tables wider than their card at {width} px"
    assert found["cards"] >= 16 and found["verdictBadges"] > 0
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"index-{width}.png"), full_page=False)
    page.close()


def test_every_executed_notebook_page_present_loads_cleanly(browser):
    pages = sorted(REPORTS_DIR.glob("*/*/cpu/*.html")) + sorted(REPORTS_DIR.glob("*/cpu/*.html"))
    if not pages:
        pytest.skip("no executed notebook pages here (make reproduce writes them; they are not committed)")
    for path in pages:
        page, errors = _load(browser, path)
        found = page.evaluate(PAGE_CHECKS)
        assert not found["broken"], f"{path}: broken images {found['broken']}"
        assert not [e for e in errors if "favicon" not in e], f"{path}: console errors {errors}"
        page.close()


def test_an_executed_notebook_page_made_here_loads_cleanly(browser, tmp_path):
    """The executed pages are not committed, so CI makes one: the quickest notebook at smoke size through the
    runner (papermill, then the HTML export), into a scratch reports directory; its page must show its figures
    (inline images, none broken) without a console error, and the index built there must link to it."""
    nb = reports.NOTEBOOKS_DIR / "fedlrt" / "ablation_initial_rank.ipynb"
    env = {**os.environ, "LRKIT_REPORTS": str(scratch_reports(tmp_path))}
    for cmd in (["run", str(nb), "--profile", "smoke"], ["index", "--profile", "smoke"]):
        res = subprocess.run([sys.executable, "-m", "lrkit.reports", *cmd], env=env, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
    html = tmp_path / "fedlrt/ablation_initial_rank/smoke/ablation_initial_rank.html"
    page, errors = _load(browser, html)
    found = page.evaluate(PAGE_CHECKS)
    n_images = page.evaluate("() => document.images.length")
    assert n_images >= 1 and not found["broken"], (n_images, found["broken"])
    assert not [e for e in errors if "favicon" not in e], errors
    page.close()
    index, errors = _load(browser, tmp_path / "index.html")
    links = index.evaluate("() => Array.from(document.querySelectorAll('a')).map(a => a.getAttribute('href'))")
    assert "fedlrt/ablation_initial_rank/smoke/ablation_initial_rank.html" in links and not errors
    index.close()
