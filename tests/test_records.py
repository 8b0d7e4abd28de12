"""Run records: fields, atomic writes, round trip, and the runner's no-half-written-results rule."""
import json
import math

import pytest

from lrkit import records
from lrkit.records import RunResult
from helpers import interrupt_writes


def _result(name="adamw", loss=1.5):
    return RunResult(name=name, config={"lr": 1e-3}, seed=0, device="cpu", device_name="test cpu",
                     history=[{"step": 1, "train_loss": 2.0}, {"step": 2, "train_loss": loss}],
                     final={"val_loss": loss, "nan_metric": math.nan}, wall_time_s=0.5,
                     memory={"optimizer_state_bytes": 16})


def test_save_run_writes_every_field_and_loads_back(tmp_path):
    out = tmp_path / "reports" / "galore" / "galore" / "cpu"
    records.save_run(out, _result())
    records.save_run(out, _result("galore", 1.6))
    doc = records.load(out)
    assert doc["notebook"] == "galore/galore" and doc["profile"] == "cpu"
    run = doc["runs"]["adamw"]
    for field in ("config", "seed", "device", "device_name", "torch", "git_commit", "lock_sha256", "history", "final",
                  "wall_time_s", "memory"):
        assert field in run, field
    assert run["final"]["nan_metric"] is None  # NaN is not JSON; stored as null
    assert set(doc["runs"]) == {"adamw", "galore"}
    assert [p.name for p in out.iterdir()] == ["metrics.json"], "no temporary files left behind"


def test_summary_and_figures(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    fig, ax = plt.subplots()
    ax.plot([1, 2])
    png = records.savefig(fig, tmp_path, "loss")
    assert png.read_bytes()[:4] == b"\x89PNG"
    records.save_summary(tmp_path, pd.DataFrame([{"run": "a", "ppl": 3.0}]), headline="loss.png",
                         conclusions=["a wins"])
    doc = records.load(tmp_path)
    assert doc["summary"] == {"table": [{"run": "a", "ppl": 3.0}], "headline": "loss.png", "conclusions": ["a wins"]}


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    records.save_run(tmp_path, _result())
    before = (tmp_path / "metrics.json").read_text()
    bad = _result("broken")
    bad.final = {"x": object()}  # serialised as str: fine; force a failure inside json instead
    monkeypatch.setattr(json, "dumps", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError, match="disk full"):
        records.save_run(tmp_path, bad)
    assert (tmp_path / "metrics.json").read_text() == before


def test_a_record_write_interrupted_midway_keeps_the_previous_file(tmp_path, monkeypatch):
    """The failure above comes before any byte is written; here the write itself fails halfway (a full disk): the
    previous metrics.json is intact, still loads with its run, and no temporary file is left."""
    records.save_run(tmp_path, _result())
    before = (tmp_path / "metrics.json").read_bytes()
    with monkeypatch.context() as m:
        interrupt_writes(m)
        with pytest.raises(OSError, match="injected midway"):
            records.save_run(tmp_path, _result("second", loss=1.0))
    assert (tmp_path / "metrics.json").read_bytes() == before and list(records.load(tmp_path)["runs"]) == ["adamw"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_report_dir_validates():
    assert records.report_dir("galore/ablation_rank", "cpu").parts[-3:] == ("galore", "ablation_rank", "cpu")
    with pytest.raises(ValueError, match="Invalid profile: 'fast'"):
        records.report_dir("getting_started", "fast")
    with pytest.raises(ValueError, match="Invalid notebook: '../x'"):
        records.report_dir("../x", "cpu")
    with pytest.raises(FileNotFoundError, match="run the notebook first"):
        records.load("/nonexistent/dir")


def test_load_maps_a_staging_directory_name_to_its_profile(tmp_path):
    # records written before the runner's staging name was mapped carry ".cpu.staging-<random>"
    (tmp_path / "metrics.json").write_text(json.dumps({"schema": records.SCHEMA, "notebook": "x",
                                                       "profile": ".cpu.staging-ab_12", "runs": {}, "summary": {}}))
    assert records.load(tmp_path)["profile"] == "cpu"
