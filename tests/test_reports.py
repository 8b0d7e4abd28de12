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


# ------------------------------------------------------------------------------- check, readme, command line
@pytest.fixture
def sigterm_kept():
    """reports.main installs a SIGTERM handler (sys.exit(143)); put the test process's own back afterwards."""
    import signal

    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


def _reference_repo(tmp_path, final):
    """A git repository with one committed cpu record (reports/p/nb/cpu/metrics.json, run "a | seed 0") made with
    this checkout's lock; returns the record's path, the fresh results' place."""
    import subprocess

    from lrkit._lock import lock_digest

    path = tmp_path / "reports" / "p" / "nb" / "cpu" / "metrics.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"runs": {"a | seed 0": {"final": final, "lock_sha256": lock_digest()}}}))
    for cmd in (["init", "-q"], ["add", "."], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "ref"]):
        subprocess.run(["git", *cmd], cwd=tmp_path, check=True)
    return path


def _fresh(path, **final):
    path.write_text(json.dumps({"runs": {"a | seed 0": {"final": final}}}))


def test_check_command_exit_status_names_a_differing_metric_and_never_fails_on_times(tmp_path, monkeypatch, capsys,
                                                                                      sigterm_kept):
    ref = {"val_loss": 3.25, "tokens": 1000, "wall_time_s": 10.0}
    path = _reference_repo(tmp_path, ref)
    monkeypatch.setattr(reports, "REPO_ROOT", tmp_path)
    _fresh(path, **{**ref, "wall_time_s": 31.0})  # only a measured time differs
    assert reports.main(["check", "--profile", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "OK: 2/2 computed metrics" in out and "<-- differs" not in out
    assert [line.split()[-1] for line in out.splitlines() if "wall_time_s" in line] == ["3.10"]  # listed, ratio
    _fresh(path, **{**ref, "tokens": 1001})  # a computed metric differs: named, non-zero exit
    assert reports.main(["check"]) == 1
    out = capsys.readouterr().out
    differs = [line.split() for line in out.splitlines() if line.endswith("<-- differs")]
    assert [row[5:8] for row in differs] == [["tokens", "1000", "1001"]], out  # after "reports/p/nb/cpu a | seed 0"
    assert "DIFFERS: 1/2 computed metrics" in out
    # --rtol is the tolerance used: a 1e-8 relative difference fails the default 1e-9, passes 1e-7
    _fresh(path, **{**ref, "val_loss": 3.25 * (1 + 1e-8)})
    assert reports.main(["check"]) == 1
    assert reports.main(["check", "--rtol", "1e-7"]) == 0
    assert "within rtol=1e-07" in capsys.readouterr().out
    # a committed run missing from the fresh results is a difference too (every computed metric of it)
    path.write_text(json.dumps({"runs": {"b | seed 0": {"final": ref}}}))
    assert reports.main(["check"]) == 1
    assert "DIFFERS: 0/2 computed metrics" in capsys.readouterr().out
    # --ref is the commit compared with: at a ref where the fresh values were committed, they agree
    _fresh(path, **{**ref, "tokens": 1001})
    import subprocess

    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "new"], cwd=tmp_path,
                   check=True)
    assert reports.main(["check"]) == 0 and reports.main(["check", "--ref", "HEAD~1"]) == 1


def _record(out_dir, run, loss, claims, conclusions, headline=None, wall=125.0):
    records.save_run(out_dir, records.RunResult(run, {"value": loss}, 0, "cpu", "cpu", final={"loss": loss}))
    records.save_summary(out_dir, [{"run": run, "loss": loss}], headline=headline, conclusions=conclusions,
                         claims=claims)
    records.save_execution(out_dir, profile="cpu", wall_time_s=wall, device_name="Test CPU",
                           executed_at="2026-01-02T03:04:05+0000")


def _claim(name, verdict, estimate, low, high, n=3):
    return {"claim": name, "verdict": verdict, "estimate": estimate, "low": low, "high": high, "n": n,
            "target": "ratio <= 1.1", "paper": 1.0, "source": "Table 2"}


def test_build_readme_lists_every_claim_and_each_notebooks_section(sandbox, monkeypatch):
    from lrkit import bench

    monkeypatch.setattr(bench, "REPORTS_DIR", sandbox / "reports")  # no bench records in the sandbox
    claims = [_claim("memory below AdamW", "holds", 0.61, 0.58, 0.64),
              _claim("perplexity within 10 %", "unresolved at this scale", 1.04, 0.97, 1.12)]
    _record(records.report_dir("galore/main", "cpu"), "galore", 2.5, claims, ["GaLore saves 39 % memory"],
            headline="curve.png")
    _record(records.report_dir("fedlrt/main", "cpu"), "fedlrt", 0.75, [_claim("fewer bytes", "contradicted", 1.3, 1.2,
                                                                             1.4, n=1)], ["FeDLRT sends more"])
    _record(records.report_dir("galore/main", "smoke"), "smoke", 9.0, [_claim("smoke only", "holds", 1, 0, 2)], [])
    readme = sandbox / "notebooks" / "galore" / "README.md"
    readme.parent.mkdir(parents=True)
    readme.write_text("# GaLore\n\nIntro.\n")
    text = reports.build_readme("cpu").read_text()
    assert text.startswith("# Reference results (cpu profile)")
    lines = text.splitlines()
    all_claims = lines[lines.index("## All claims") + 2:lines.index("## fedlrt/main")]
    assert [row.split(" | ")[:3] for row in all_claims if row.startswith("| ") and "---" not in row][1:] == [
        ["| fedlrt/main", "fewer bytes", "contradicted"], ["| galore/main", "memory below AdamW", "holds"],
        ["| galore/main", "perplexity within 10 %", "unresolved at this scale"]]
    assert "| [0.58, 0.64] |" in text and "none (one seed)" in text  # interval; n = 1 has none
    assert "smoke only" not in text  # the cpu profile's records only
    galore = "\n".join(lines[lines.index("## galore/main"):])
    assert "Test CPU, run time 125 s" in galore and "- GaLore saves 39 % memory" in galore
    assert "![galore/main](galore/main/cpu/curve.png)" in galore
    assert "| galore | 2.5 |" in galore  # the summary table
    assert "Benchmarks" not in text
    # the folder README gains the measured run times, between the markers, replaced (not repeated) on a rebuild
    reports.build_readme("cpu")
    folder = readme.read_text()
    assert folder.startswith("# GaLore\n\nIntro.\n") and folder.count(reports.TIMES_BEGIN) == 1
    assert "| `main.ipynb` | 2.1 min | 2026-01-02T03:04 |" in folder and "Test CPU" in folder


def test_command_line_subcommands_reach_their_functions(monkeypatch, sigterm_kept):
    calls = []
    for name in ("run_notebook", "build_index", "build_readme", "seed_check"):
        monkeypatch.setattr(reports, name, lambda *a, _n=name, **k: calls.append((_n, a, k)))
    monkeypatch.setattr(reports, "check_reports", lambda *a: calls.append(("check_reports", a, {})) or True)
    fresh, old = (str(reports.NOTEBOOKS_DIR / f"{n}.ipynb") for n in ("fresh", "old"))
    monkeypatch.setattr(reports, "stale_reason", lambda nb, profile: None if nb == fresh else "no results yet")
    assert reports.main(["run", "a.ipynb", "b.ipynb", "--profile", "cpu"]) == 0
    assert reports.main(["run", fresh, old, "--if-stale"]) == 0  # the up-to-date one is skipped
    assert reports.main(["index", "--profile", "smoke"]) == 0
    assert reports.main(["readme"]) == 0
    assert reports.main(["seed-check", "nb.ipynb", "--seeds", "5,6,7"]) == 0
    assert reports.main(["check", "--profile", "gpu", "--rtol", "0", "--ref", "v1"]) == 0
    assert calls == [("run_notebook", ("a.ipynb", "cpu"), {}), ("run_notebook", ("b.ipynb", "cpu"), {}),
                     ("run_notebook", (old, "auto"), {}), ("build_index", ("smoke",), {}),
                     ("build_readme", ("cpu",), {}), ("seed_check", ("nb.ipynb", [5, 6, 7], "cpu"), {}),
                     ("check_reports", ("gpu", 0.0, "v1"), {})]
    for bad in ([], ["publish"], ["check", "--rtol", "tight"], ["seed-check", "nb.ipynb"]):
        with pytest.raises(SystemExit) as e:
            reports.main(bad)
        assert e.value.code == 2, bad


def test_command_line_rejects_an_unknown_profile_before_running_anything(sandbox, sigterm_kept, capsys):
    nb = sandbox / "notebooks" / "tiny.ipynb"
    _notebook(nb, RECORD)
    for argv in (["index", "--profile", "fast"], ["run", str(nb), "--profile", "fast"],
                 ["run", str(nb), "--profile", "fast", "--if-stale"]):
        assert reports.main(argv) == 2  # one line on stderr, exit status 2
        assert "error: Invalid profile: 'fast' (expected one of ['auto', 'smoke', 'cpu'" in capsys.readouterr().err
        with pytest.raises(ValueError, match=r"Invalid profile: 'fast' \(expected one of \['auto', 'smoke', 'cpu'"):
            reports.main(argv + ["--debug"])
    assert not (sandbox / "reports").exists()


def _new_claim(name, verdict, accounting=False, reason="", **kw):
    """A verdict record as lrkit.claims.to_records writes it now (issue 19's fields)."""
    return {**_claim(name, verdict, 1.0, 0.9, 1.1), "accounting": accounting, "reason": reason, "failed": 0,
            "runs": 6, "direction": "", "flags": [], "paper_source": "Table 2 (60M)", "margin_reason": "", **kw}


def test_tally_counts_empirical_claims_only_with_the_reasons_and_accounting_apart():
    claims = [_new_claim("a", "holds"), _new_claim("b", "contradicted"),
              _new_claim("c", "unresolved at this scale", reason="too few seeds for this effect: about 7 seeds"),
              _new_claim("d", "unresolved at this scale", reason="too few seeds for this effect: about 9 seeds"),
              _new_claim("e", "unresolved at this scale", reason="2 of 6 runs failed"),
              _new_claim("f", "unresolved at this scale", reason="no effect at this scale: the estimate sits at"),
              _new_claim("bytes1", "holds", accounting=True), _new_claim("bytes2", "holds", accounting=True)]
    assert reports.tally(claims) == ("empirical claims: 1 contradicted, 1 holds, 4 unresolved at this scale "
                                     "(reasons: 2 too few seeds, 1 runs failed, 1 no effect at this scale); "
                                     "accounting: 2 checks, all hold")
    claims[-1]["verdict"] = "contradicted"
    assert reports.tally(claims).endswith("accounting: 2 checks, 1 contradicted, 1 holds")
    # a record made before the new fields: empirical, its unresolved reason not recorded
    old = _claim("old", "unresolved at this scale", 1.0, 0.9, 1.1)
    assert reports.tally([old]) == "empirical claims: 1 unresolved at this scale (reasons: 1 reason not recorded)"


def test_readme_and_index_show_accounting_apart_and_each_verdicts_reason_direction_failures_flags(sandbox,
                                                                                                 monkeypatch):
    from lrkit import bench

    monkeypatch.setattr(bench, "REPORTS_DIR", sandbox / "reports")
    claims = [_new_claim("galore-vs-adamw", "holds", direction="galore better than adamw",
                         flags=["adamw: lr 0.003 at the edge of its grid"]),
              _new_claim("ft-tie", "unresolved at this scale", reason="2 of 6 runs failed", failed=2),
              _new_claim("state-bytes", "holds", accounting=True),
              _claim("old-record", "holds", 1.0, 0.9, 1.1)]  # no new fields: still renders
    _record(records.report_dir("galore/main", "cpu"), "galore", 2.5, claims, [])
    text = reports.build_readme("cpu").read_text()
    lines = text.splitlines()
    assert ("Verdicts: empirical claims: 2 holds, 1 unresolved at this scale (reasons: 1 runs failed); "
            "accounting: 1 check, all hold.") in lines
    empirical = lines[lines.index("### Empirical claims"):lines.index(f"### {reports.ACCOUNTING_TITLE}")]
    accounting = lines[lines.index(f"### {reports.ACCOUNTING_TITLE}"):lines.index("## galore/main")]
    assert any("galore-vs-adamw" in r for r in empirical) and not any("state-bytes" in r for r in empirical)
    assert any("state-bytes" in r for r in accounting) and not any("galore-vs-adamw" in r for r in accounting)
    row = next(r for r in empirical if "galore-vs-adamw" in r)
    assert "galore better than adamw" in row and "adamw: lr 0.003 at the edge of its grid" in row
    assert "1 (Table 2 (60M))" in row  # the paper's value with its source
    failed = next(r for r in empirical if "ft-tie" in r)
    assert "| 2 of 6 |" in failed and "2 of 6 runs failed" in failed
    section = "\n".join(lines[lines.index("## galore/main"):])
    assert f"**{reports.ACCOUNTING_TITLE}**" in section and "old-record" in section
    index = reports.build_index("cpu").read_text()
    assert "empirical claims: 2 holds, 1 unresolved at this scale (reasons: 1 runs failed); accounting: 1 check" \
        in index
    assert f"<h4>{reports.ACCOUNTING_TITLE}</h4>" in index
    card = index[index.index('id="galore-main"'):]
    assert card.index("galore-vs-adamw") < card.index(reports.ACCOUNTING_TITLE) < card.index("state-bytes")
    assert "2 of 6 runs failed" in card and "adamw: lr 0.003 at the edge of its grid" in card


def _paper_section(text):
    """The README's papers' section, as {paper title: [[cell, ...] per table row]} (header row first)."""
    lines = text.splitlines()
    section = lines[lines.index("## The papers' numbers beside the kit's"):lines.index("## All claims")]
    out, title = {}, None
    for line in section:
        if line.startswith("### "):
            title = line[4:]
            out[title] = []
        elif title and line.startswith("| ") and "---" not in line:
            out[title].append([cell.strip() for cell in line.strip("|").split(" | ")])
    return out


def test_readme_puts_every_paper_value_beside_the_kits_estimate_at_each_profile(sandbox, monkeypatch):
    from lrkit import bench

    monkeypatch.setattr(bench, "REPORTS_DIR", sandbox / "reports")
    galore = [_new_claim("galore-vs-full-rank", "holds", paper=1.024, paper_source="Table 2 (60M)"),
              _new_claim("baseline-not-beaten", "holds", paper=None, paper_source=""),  # no paper value: left out
              _new_claim("state-smaller", "holds", accounting=True, paper=0.5652, paper_source="Table 6 (60M)")]
    _record(records.report_dir("galore/main", "cpu"), "a", 2.5, galore, [])
    # the same claim id in another notebook of the folder: its own row, with its own estimate
    _record(records.report_dir("galore/ablation", "cpu"), "a", 2.5,
            [{**_new_claim("galore-vs-full-rank", "unresolved at this scale", paper=1.024,
                           paper_source="Table 2 (60M)"), "estimate": 1.3, "low": 1.2, "high": 1.4}], [])
    # the gpu record of galore/main: a column of its own; the gpu-only claim appears, not-tested elsewhere
    _record(records.report_dir("galore/main", "gpu"), "a", 2.5,
            [{**galore[0], "verdict": "contradicted", "estimate": 1.2, "low": 1.15, "high": 1.25, "n": 5},
             _new_claim("8bit-cut", "holds", accounting=True, paper=0.175, paper_source="Abstract")], [])
    _record(records.report_dir("galore/main", "smoke"), "a", 9.0,  # smoke: never beside the papers
            [_new_claim("smoke-only", "holds", paper=7.0, paper_source="Table 9")], [])
    _record(records.report_dir("adalomo/main", "cpu"), "a", 1.0, [_new_claim("no-paper", "holds", paper=None)], [])
    _record(records.report_dir("fedlrt/main", "cpu"), "a", 1.0,
            [_new_claim("comm", "holds", accounting=True, paper=10.0, paper_source="Abstract (up to 10x)", n=1)], [])
    _record(records.report_dir("getting_started", "cpu"), "a", 1.0,
            [_new_claim("uses-context", "holds", paper=None)], [])
    tables = _paper_section(reports.build_readme("cpu").read_text())
    assert list(tables) == [reports.PAPER_TITLES["galore"], reports.PAPER_TITLES["adalomo"],
                            reports.PAPER_TITLES["fedlrt"]]  # one per paper, none for the kit's own notebooks
    head, *rows = tables[reports.PAPER_TITLES["galore"]]
    assert head == ["notebook", "claim", "kind", "tested", "paper", "paper source", "kit (cpu)", "verdict (cpu)",
                    "kit (gpu)", "verdict (gpu)"]  # cpu and gpu have records, smoke is left out
    got = {(r[0], r[1]): dict(zip(head, r)) for r in rows}
    # every claim with a paper value, keyed by notebook and claim; none without one; nothing from smoke
    assert list(got) == [("galore/ablation", "galore-vs-full-rank"), ("galore/main", "galore-vs-full-rank"),
                         ("galore/main", "state-smaller"), ("galore/main", "8bit-cut")]
    main = got[("galore/main", "galore-vs-full-rank")]
    assert (main["paper"], main["paper source"]) == ("1.024", "Table 2 (60M)")
    assert main["kit (cpu)"] == "1 [0.9, 1.1], n=3" and main["verdict (cpu)"] == "holds"
    assert main["kit (gpu)"] == "1.2 [1.15, 1.25], n=5" and main["verdict (gpu)"] == "contradicted"
    assert got[("galore/ablation", "galore-vs-full-rank")]["kit (cpu)"] == "1.3 [1.2, 1.4], n=3"
    assert got[("galore/ablation", "galore-vs-full-rank")]["kit (gpu)"] == "no record"
    assert got[("galore/main", "state-smaller")]["kind"] == "accounting"
    assert got[("galore/main", "state-smaller")]["kit (gpu)"] == "not tested"
    assert got[("galore/main", "8bit-cut")]["kit (cpu)"] == "not tested"
    assert got[("galore/main", "8bit-cut")]["paper"] == "0.175"
    assert tables[reports.PAPER_TITLES["adalomo"]] == []  # records, but no paper value: said in a line, no table
    fed_head, fed = tables[reports.PAPER_TITLES["fedlrt"]]
    assert dict(zip(fed_head, fed))["kit (cpu)"] == "1 none (one seed), n=1" and "kit (gpu)" not in fed_head
    text = reports.build_readme("cpu").read_text()
    assert "No claim recorded for `adalomo/` carries a paper value" in text
    section = "\n".join(text.splitlines()[:text.splitlines().index("## All claims")])
    for absent in ("baseline-not-beaten", "no-paper", "uses-context", "smoke-only", "Table 9"):
        assert absent not in section, absent


def test_check_compares_boolean_flags_and_claim_verdicts(tmp_path, monkeypatch, capsys, sigterm_kept):
    from lrkit._lock import lock_digest

    final = {"val_loss": 3.25, "diverged": False, "unstable": False}
    claims = [{"claim": "galore-vs-adamw", "verdict": "holds"}, {"claim": "tie", "verdict": "unresolved at this scale"}]
    path = _reference_repo(tmp_path, final)
    doc = {"runs": {"a | seed 0": {"final": final, "lock_sha256": lock_digest()}}, "summary": {"claims": claims}}
    path.write_text(json.dumps(doc))
    import subprocess

    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "claims"], cwd=tmp_path,
                   check=True)
    monkeypatch.setattr(reports, "REPO_ROOT", tmp_path)

    def fresh(final=final, claims=claims):
        path.write_text(json.dumps({"runs": {"a | seed 0": {"final": final}}, "summary": {"claims": claims}}))

    fresh()
    assert reports.main(["check"]) == 0
    assert "OK: 3/3 computed metrics" in capsys.readouterr().out
    fresh(final={**final, "diverged": True})  # the same loss, but the run now diverged
    assert reports.main(["check"]) == 1
    out = capsys.readouterr().out
    assert [line.split()[5] for line in out.splitlines() if line.endswith("<-- differs")] == ["diverged"], out
    fresh(claims=[claims[0] | {"verdict": "contradicted"}, claims[1]])  # same numbers, another verdict
    assert reports.main(["check"]) == 1
    out = capsys.readouterr().out
    assert "galore-vs-adamw" in next(line for line in out.splitlines() if line.endswith("<-- differs"))
    assert "1/2 claim verdicts unchanged" in out
    fresh(claims=claims[:1])  # a claim missing from the fresh results
    assert reports.main(["check"]) == 1
    assert "missing" in capsys.readouterr().out


# ---- issue 22: notebook YAML values out of their default's range, and the command line's errors
@pytest.mark.parametrize("body,match", [
    ("steps: -5\n", "Invalid value for 'steps' .*-5 \\(expected a number >= 0"),
    ("seeds: []\n", "Invalid value for 'seeds' .*\\[\\] \\(expected a non-empty list"),
    ("seeds: [0, -1]\n", "Invalid value for 'seeds' .*item -1: expected a number >= 0"),
    ("lr: .nan\n", "Invalid value for 'lr' .*nan \\(expected a finite number"),
    ("lr: .inf\n", "Invalid value for 'lr' .*inf \\(expected a finite number"),
])
def test_notebook_yaml_values_outside_their_defaults_range_are_errors(body, match, tmp_path):
    from unittest import mock

    from tests.helpers import tiny_notebook

    nb = tiny_notebook(tmp_path, {"cpu": body})
    with mock.patch.object(reports, "NOTEBOOKS_DIR", tmp_path / "notebooks"), \
            mock.patch.object(reports, "CONFIGS_DIR", tmp_path / "configs"):
        with pytest.raises(ValueError, match=match):
            reports.notebook_parameters(nb, "cpu")


def test_notebook_yaml_reads_numbers_as_a_user_means_them(tmp_path):
    from unittest import mock

    from tests.helpers import tiny_notebook

    nb = tiny_notebook(tmp_path, {"cpu": "lr: 1e-3\nsteps: 3\n"})
    with mock.patch.object(reports, "NOTEBOOKS_DIR", tmp_path / "notebooks"), \
            mock.patch.object(reports, "CONFIGS_DIR", tmp_path / "configs"):
        assert reports.notebook_parameters(nb, "cpu") == {"lr": 0.001, "steps": 3}


@pytest.mark.parametrize("module,args,message", [
    ("lrkit.reports", ["check", "--profile", "nope"], "error: Invalid profile: 'nope'"),
    ("lrkit.reports", ["seed-check", "x", "--seeds", "a,b"], "error: Invalid --seeds: 'a,b'"),
])  # lrkit.bench and lrkit.train: in-process in tests/test_bench.py, by subprocess in tests/test_train_resume.py
def test_cli_errors_are_one_line_with_exit_status_2(module, args, message):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = subprocess.run([sys.executable, "-m", module, *args, "--debug"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 1 and "Traceback" in res.stderr
