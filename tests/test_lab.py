"""JupyterLab as a user opens it: `make lab`'s server (its flags, as root too) started headless on loopback,
a notebook opened in Debian's chromium, all its cells run at the smoke parameters through the server's
kernel, no error output, a screenshot saved."""
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import scratch_reports
from lrkit.utils import REPO_ROOT, REPORTS_DIR

CHROMIUM = shutil.which("chromium")
if not os.environ.get("CI"):  # CI installs chromium: there this test runs, never skips
    pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
NOTEBOOK = "fedlrt/ablation_dynamic_rank.ipynb"  # a smoke run of a few seconds
TOKEN = "lrkit-test-token"


def _lab_flags() -> list[str]:
    """LAB_FLAGS from the Makefile: the test starts the server exactly as `make lab` does."""
    text = (REPO_ROOT / "Makefile").read_text().replace("\\\n", " ")
    line = re.search(r"^LAB_FLAGS := (.*)$", text, re.M).group(1)
    return line.split()


@pytest.fixture()
def lab(tmp_path):
    # the notebook is opened from a copy, so the server's autosave never touches notebooks/
    (tmp_path / Path(NOTEBOOK).parent).mkdir(parents=True)
    shutil.copy(REPO_ROOT / "notebooks" / NOTEBOOK, tmp_path / NOTEBOOK)
    flags = [f for f in _lab_flags() if not f.startswith(("--notebook-dir", "--LabApp.app_settings_dir"))]
    cmd = [str(Path(sys.executable).with_name("jupyter")), "lab", *flags, f"--notebook-dir={tmp_path}",
           f"--LabApp.app_settings_dir={REPO_ROOT / 'configs' / 'jupyterlab'}", "--ServerApp.port=0",
           f"--IdentityProvider.token={TOKEN}", "--LabApp.expose_app_in_browser=True"]
    # The kernel's records go to a scratch reports directory (never over the committed smoke reference; this
    # run's thread count is JupyterLab's, not make's one), with the tuned rates the notebook reads.
    env = {**os.environ, "JUPYTER_PLATFORM_DIRS": "1", "LRKIT_REPORTS": str(scratch_reports(tmp_path / "reports"))}
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    url, log, deadline = None, [], time.monotonic() + 90
    while url is None:
        line = proc.stdout.readline()
        assert line or proc.poll() is None, "".join(log)
        log.append(line)
        m = re.search(r"(http://127\.0\.0\.1:\d+)/lab", line)
        url = m.group(1) if m else None
        assert time.monotonic() < deadline, "JupyterLab did not start in 90 s:\n" + "".join(log)
    yield url, log
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)


def test_lab_runs_a_notebook_in_chromium(lab, tmp_path):
    from playwright.sync_api import sync_playwright

    url, log = lab
    assert not any("Running as root is not" in l and "exit" in l.lower() for l in log)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu",
                                    "--no-first-run", "--disable-background-networking", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"{url}/lab/tree/{NOTEBOOK}?token={TOKEN}")
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
        page.wait_for_function("window.jupyterapp && window.jupyterapp.shell.currentWidget"
                               " && window.jupyterapp.shell.currentWidget.sessionContext"
                               " && window.jupyterapp.shell.currentWidget.sessionContext.session", timeout=60_000)
        page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
        # done when every code cell shows an execution count and the kernel is idle again
        page.wait_for_function("""() => {
            const w = window.jupyterapp.shell.currentWidget, cells = w.content.widgets.filter(c => c.model.type === 'code');
            return cells.every(c => c.model.executionCount) && w.sessionContext.session.kernel.status === 'idle';
        }""", timeout=180_000, polling=500)
        errors = page.evaluate("""() => window.jupyterapp.shell.currentWidget.content.widgets
            .flatMap(c => c.model.type === 'code' ? c.model.outputs.toJSON() : [])
            .filter(o => o.output_type === 'error').map(o => o.ename + ': ' + o.evalue)""")
        images = page.evaluate("document.querySelectorAll('.jp-OutputArea-output img').length")
        news = page.get_by_text("official Jupyter news").count()
        shots = Path(os.environ.get("LRKIT_SCREENSHOTS", REPORTS_DIR / "screenshots"))
        shots.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shots / "jupyterlab.png"))
        browser.close()
    assert not errors, errors
    assert images >= 1  # the notebook's figures rendered in the page
    assert news == 0, "the first-run news prompt is showing"
    assert (tmp_path / "reports" / Path(NOTEBOOK).with_suffix("") / "smoke" / "metrics.json").exists()
