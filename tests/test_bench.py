import json

from lrkit import bench


def test_bench_runs_every_method_and_writes_its_record(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "REPORTS_DIR", tmp_path)
    assert bench.main(["--size", "nano", "--vocab", "128", "--batch-size", "2", "--seq-len", "16",
                       "--steps", "1", "--warmup", "1", "--device", "cpu"]) == 0
    doc = json.loads((tmp_path / "bench" / "cpu.json").read_text())
    names = [r["method"] for r in doc["results"]]
    assert names[-1] == "galore (galore-torch 1.0)" and len(names) == len(bench.METHODS) + 1
    by = {r["method"]: r for r in doc["results"]}
    # Same projected state in the kit and the official optimizer; fused optimizers hold fewer gradients.
    assert by["galore"]["optimizer_state_bytes"] == by["galore (galore-torch 1.0)"]["optimizer_state_bytes"]
    assert by["adalomo"]["grad_peak_bytes"] < by["adamw (full-rank)"]["grad_peak_bytes"]
    assert "tokens/s" in capsys.readouterr().out
