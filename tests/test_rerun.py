"""`make reproduce` reruns only what is missing or stale (lrkit.reports.stale_reason, `run --if-stale`)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import scratch_reports
from lrkit import records, reports
from lrkit.utils import REPO_ROOT

NB = REPO_ROOT / "notebooks" / "fedlrt" / "ablation_initial_rank.ipynb"  # the quickest smoke notebook (10 s)
KEY = "fedlrt/ablation_initial_rank"


@pytest.fixture
def tmp_reports(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "REPORTS_DIR", tmp_path)
    return tmp_path


def _fake_result(root: Path, code: dict) -> Path:
    final = records.report_dir(KEY, "smoke", root)
    final.mkdir(parents=True)
    (final / "metrics.json").write_text(json.dumps({"schema": records.SCHEMA, "runs": {}, "summary": {}}))
    stamp = reports.run_inputs(NB, "smoke", code=code)
    reports._inputs_path(final).write_text(json.dumps(stamp))
    return final


def test_missing_and_foreign_results_are_stale(tmp_reports):
    assert reports.stale_reason(NB, "smoke") == "no results yet"
    final = _fake_result(tmp_reports, {"lrkit/records.py": None})
    reports._inputs_path(final).unlink()  # results there, but not run by this checkout (a committed reference)
    assert "not computed by this checkout" in reports.stale_reason(NB, "smoke")


def test_unchanged_inputs_are_up_to_date_and_each_change_is_named(tmp_reports):
    final = _fake_result(tmp_reports, {"lrkit/records.py": None, "lrkit/fed/fedlrt.py": None})
    assert reports.stale_reason(NB, "smoke") is None
    stamp = json.loads(reports._inputs_path(final).read_text())
    for field, value, named in [("code", {**stamp["code"], "lrkit/fed/fedlrt.py": "0" * 64}, "lrkit/fed/fedlrt.py"),
                                ("code", {**stamp["code"], "lrkit/gone.py": "0" * 64}, "lrkit/gone.py"),
                                ("notebook", "0" * 64, "notebook"), ("lock", "0" * 64, "lock"),
                                ("tuned", "0" * 64, "tuned")]:
        reports._inputs_path(final).write_text(json.dumps({**stamp, field: value}))
        reason = reports.stale_reason(NB, "smoke")
        assert reason is not None and named in reason and reason.count(",") == 0, (field, reason)


def test_a_new_tuning_choice_makes_the_folder_stale(tmp_reports):
    _fake_result(tmp_reports, {})
    tuning = records.report_dir("fedlrt/tuning", "smoke", tmp_reports)
    tuning.mkdir(parents=True)
    (tuning / "metrics.json").write_text(json.dumps({"schema": records.SCHEMA, "runs": {},
                                                     "summary": {"tuned": {"": {"fedlrt": {"lr": 0.1}}}}}))
    assert reports.stale_reason(NB, "smoke") == "changed since its run: tuned"


def test_notebook_digest_ignores_outputs_not_sources(tmp_path):
    nb = json.loads(NB.read_text())
    code = next(c for c in nb["cells"] if c["cell_type"] == "code")
    code["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["ran in JupyterLab\n"]}]
    code["execution_count"] = 7
    (tmp_path / "a.ipynb").write_text(json.dumps(nb))
    assert reports.notebook_digest(tmp_path / "a.ipynb") == reports.notebook_digest(NB)
    code["source"] = ["seeds = [0]\n"] + list(code["source"])
    (tmp_path / "b.ipynb").write_text(json.dumps(nb))
    assert reports.notebook_digest(tmp_path / "b.ipynb") != reports.notebook_digest(NB)


def test_cli_runs_once_then_skips_and_records_the_kernels_code(tmp_path):
    env = {**os.environ, "LRKIT_REPORTS": str(scratch_reports(tmp_path))}
    cmd = [sys.executable, "-m", "lrkit.reports", "run", str(NB), "--profile", "smoke", "--if-stale"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "no results yet: running" in first.stdout and "done in" in first.stdout
    stamp = json.loads((tmp_path / KEY / "smoke" / ".inputs.json").read_text())
    assert "lrkit/fed/fedlrt.py" in stamp["code"] and "lrkit/reports.py" not in stamp["code"]  # the kernel's imports
    assert stamp["code"] == records.load(tmp_path / KEY / "smoke")["code"]
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and "up to date" in second.stdout and "done in" not in second.stdout
