"""The papermill -> report pipe on tiny notebooks: success swaps results in, failure leaves none."""
import json

import nbformat
import pytest

from lrkit import records, reports


def _notebook(path, body):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell('profile = "smoke"\nreport_dir = ""\nvalue = 1.0')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)


RECORD = """
from lrkit import records
from lrkit.records import RunResult
records.save_run(report_dir, RunResult("r", {"value": value}, 0, "cpu", "cpu", final={"loss": value}))
records.save_summary(report_dir, [{"run": "r", "loss": value}], conclusions=[f"loss {value}"])
"""


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    monkeypatch.setattr(reports, "NOTEBOOKS_DIR", tmp_path / "notebooks")
    monkeypatch.setattr(reports, "REPORTS_DIR", tmp_path / "reports")
    monkeypatch.setattr(records, "REPORTS_DIR", tmp_path / "reports")
    return tmp_path


def test_run_exports_html_and_records_execution(sandbox):
    nb = sandbox / "notebooks" / "demo" / "tiny.ipynb"
    _notebook(nb, RECORD)
    out = reports.run_notebook(nb, "smoke")
    assert out == sandbox / "reports" / "demo" / "tiny" / "smoke"
    assert {p.name for p in out.iterdir()} == {"metrics.json", "tiny.ipynb", "tiny.html", ".inputs.json"}
    raw = json.loads((out / "metrics.json").read_text())  # not the staging directory's name
    assert raw["profile"] == "smoke" and raw["notebook"] == "demo/tiny"
    doc = records.load(out)
    assert doc["execution"]["profile"] == "smoke" and doc["execution"]["wall_time_s"] > 0
    assert doc["runs"]["r"]["final"]["loss"] == 1.0
    index = reports.build_index("smoke").read_text()
    assert 'href="demo/tiny/smoke/tiny.html"' in index and "loss 1.0" in index


def test_failed_notebook_leaves_previous_results_and_no_staging(sandbox):
    nb = sandbox / "notebooks" / "tiny.ipynb"
    _notebook(nb, RECORD)
    out = reports.run_notebook(nb, "smoke")
    _notebook(nb, RECORD + "\nraise RuntimeError('boom')")
    with pytest.raises(Exception, match="boom"):
        reports.run_notebook(nb, "smoke")
    assert json.loads((out / "metrics.json").read_text())["runs"]["r"]["final"]["loss"] == 1.0
    assert [p.name for p in out.parent.iterdir()] == ["smoke"], "staging directory removed"


def test_notebook_that_records_nothing_is_an_error(sandbox):
    nb = sandbox / "notebooks" / "silent.ipynb"
    _notebook(nb, "x = 1")
    with pytest.raises(RuntimeError, match="recorded nothing"):
        reports.run_notebook(nb, "smoke")
    assert not (sandbox / "reports" / "silent" / "smoke").exists()


def test_unknown_profile_is_rejected():
    with pytest.raises(ValueError, match="Invalid profile: 'fast'"):
        reports.profile_settings("fast")


def test_profiles_layer_cpu_then_gpu_then_paper():
    nb = reports.NOTEBOOKS_DIR / "fedlrt" / "fedlrt.ipynb"
    cpu, gpu, paper = (reports.notebook_parameters(nb, p) for p in ("cpu", "gpu", "paper"))
    assert reports.notebook_parameters(nb, "smoke") == {}  # the notebook's own defaults
    assert gpu["ls_rounds"] == cpu["ls_rounds"] and gpu["model"] == "resnet18" and "model" not in cpu
    assert paper["dataset"] == "cifar10" and paper["model"] == "resnet18"
    abl = reports.NOTEBOOKS_DIR / "fedlrt" / "ablation_dynamic_rank.ipynb"  # gpu layered over cpu
    assert reports.notebook_parameters(abl, "gpu")["seeds"] == reports.notebook_parameters(abl, "cpu")["seeds"]
    with pytest.raises(ValueError, match="Invalid profile: 'huge'"):
        reports.notebook_parameters(nb, "huge")


def test_check_reports_compares_computed_metrics_exactly_and_only_lists_measured_ones(tmp_path, monkeypatch, capsys):
    import json
    import subprocess

    from lrkit import reports
    from lrkit._lock import lock_digest

    rel = tmp_path / "reports" / "p" / "nb" / "cpu" / "metrics.json"
    rel.parent.mkdir(parents=True)
    run = {"final": {"val_loss": 3.25, "tokens": 1000, "projector_time_s": 0.5, "wall_time": 2.0},
           "lock_sha256": lock_digest()}
    rel.write_text(json.dumps({"runs": {"a | seed 0": run}}))
    for cmd in (["init", "-q"], ["add", "."], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "ref"]):
        subprocess.run(["git", *cmd], cwd=tmp_path, check=True)
    monkeypatch.setattr(reports, "REPO_ROOT", tmp_path)
    # other wall and projector times: still identical results
    rel.write_text(json.dumps({"runs": {"a | seed 0": {"final": {**run["final"], "projector_time_s": 0.9,
                                                               "wall_time": 7.0}}}}))
    assert reports.check_reports("cpu")
    out = capsys.readouterr().out
    assert "OK: 2/2 computed metrics within rtol=1e-09; 2 measured figures listed" in out and "1.80" in out
    # a computed metric off in the 8th digit is a difference; last-bit noise is not
    rel.write_text(json.dumps({"runs": {"a | seed 0": {"final": {**run["final"], "val_loss": 3.25 * (1 + 4e-16)}}}}))
    assert reports.check_reports("cpu")
    capsys.readouterr()
    rel.write_text(json.dumps({"runs": {"a | seed 0": {"final": {**run["final"], "val_loss": 3.2500001}}}}))
    assert not reports.check_reports("cpu")
    assert "DIFFERS: 1/2" in capsys.readouterr().out
    # a run made in another environment is named
    rel.write_text(json.dumps({"runs": {"a | seed 0": run}}))
    run["lock_sha256"] = "0" * 64
    rel.write_text(json.dumps({"runs": {"a | seed 0": run}}))
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "other env"], cwd=tmp_path,
                   check=True)
    assert reports.check_reports("cpu")
    assert "WARNING: reports/p/nb/cpu: committed runs were made with another environment" in capsys.readouterr().out
