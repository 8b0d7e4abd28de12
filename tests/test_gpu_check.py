import json

import pytest

from lrkit import gpu_check


def test_gpu_check_dry_run_exercises_every_path_and_writes_its_record(tmp_path):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    doc = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert doc["dry_run"] and doc["cuda_tests"]["returncode"] == 0 and "collected" in doc["cuda_tests"]["summary"]
    names = {r["method"] for r in doc["bench"]} | set(doc["skipped"])
    assert names == set(gpu_check.optimizers(cuda=False))
    assert all(r["tokens_per_s"] > 0 and r["dtype"] == "bf16" for r in doc["bench"])
    assert doc["recipe_run"]["steps"] == 3 and doc["recipe_run"]["val_loss"] is not None


def test_gpu_check_without_cuda_says_to_dry_run(capsys):
    if gpu_check.resolve_device("auto").type == "cuda":
        pytest.skip("CUDA present: gpu-check runs for real here")
    assert gpu_check.main([]) == 2
    assert "--dry-run" in capsys.readouterr().err
