"""Checkpoints and resume (lrkit.train): a run killed mid-way and rerun with the same command ends with
exactly the metrics and parameters of an uninterrupted run, for every method."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lrkit import train as T

METHOD_OPTIONS = {
    "full": {}, "galore": {"rank": 4, "update_proj_gap": 3}, "galore-per-layer": {"rank": 4, "update_proj_gap": 3,
    "per_layer": True, "max_grad_norm": 1.0}, "adalomo": {"max_grad_norm": 1.0}, "lomo": {}, "adafactor": {},
    "lora": {"rank": 4}, "relora": {"rank": 4, "relora_every": 4}, "low_rank": {"rank": 4},
}
MEASURED = ("projector_time_s",)  # wall-clock figures: measured, not computed, so not compared


def recipe(method, steps=12, **over):
    opts = dict(METHOD_OPTIONS[method])
    r = {"name": method, "method": method.removesuffix("-per-layer"), "model_size": "nano",
         "corpus": "shakespeare", "corpus_options": {"vocab_size": 4096}, "method_options": opts,
         "train": {"steps": steps, "batch_size": 4, "seq_len": 32, "lr": 3e-3, "eval_every": 4,
                   "eval_windows": 4, "seed": 0}, "checkpoint_every": 4}
    r.update(over)
    return r


def outcome(out: Path):
    run = next(iter(json.loads((out / "metrics.json").read_text())["runs"].values()))
    final = {k: v for k, v in run["final"].items() if k not in MEASURED}
    return final, run["history"], torch.load(out / "model.pt", weights_only=True)


def assert_same(a, b):
    assert a[0] == b[0] and a[1] == b[1]
    assert a[2].keys() == b[2].keys()
    for k in a[2]:
        assert torch.equal(a[2][k], b[2][k]), k


class Crash(Exception):
    pass


@pytest.mark.parametrize("method", list(METHOD_OPTIONS))
def test_crash_between_checkpoints_then_rerun_equals_uninterrupted(method, tmp_path, monkeypatch):
    T.run_recipe(recipe(method), tmp_path / "straight")
    calls = {"n": 0}
    windows = T.random_windows

    def crashing(*a, **k):  # dies in step 7: after the checkpoint of step 4, before the one of step 8
        calls["n"] += 1
        if calls["n"] == 7:
            raise Crash
        return windows(*a, **k)

    monkeypatch.setattr(T, "random_windows", crashing)
    with pytest.raises(Crash):
        T.run_recipe(recipe(method), tmp_path / "crashed")
    assert not (tmp_path / "crashed" / "metrics.json").exists()  # nothing half-written
    assert torch.load(tmp_path / "crashed/checkpoint/last.pt", weights_only=True)["step"] == 4
    monkeypatch.setattr(T, "random_windows", windows)
    T.run_recipe(recipe(method), tmp_path / "crashed")
    assert_same(outcome(tmp_path / "straight"), outcome(tmp_path / "crashed"))


def _cli(cfg: dict, out: Path, tmp_path: Path):
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(T.__file__).parents[1])}
    return subprocess.Popen([sys.executable, "-m", "lrkit.train", "--config", str(path), "--out", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _stop_at_first_checkpoint(proc, out: Path, sig) -> int:
    """Freeze the run as soon as its first checkpoint exists, then deliver ``sig``; returns the exit code."""
    ckpt = out / "checkpoint" / "last.pt"
    deadline = time.monotonic() + 240
    while not ckpt.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.005)
    if sig == signal.SIGKILL:
        proc.send_signal(signal.SIGSTOP)
    proc.send_signal(sig)
    return proc.wait(timeout=120)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_cli_run_resumes_exactly(sig, tmp_path):
    cfg = recipe("galore", steps=60, checkpoint_every=5)
    straight = _cli(cfg, tmp_path / "straight", tmp_path)
    assert straight.wait(timeout=300) == 0, straight.stdout.read()
    proc = _cli(cfg, tmp_path / "killed", tmp_path)
    code = _stop_at_first_checkpoint(proc, tmp_path / "killed", sig)
    assert code == (-9 if sig == signal.SIGKILL else 143), proc.stdout.read()
    step = torch.load(tmp_path / "killed/checkpoint/last.pt", weights_only=True)["step"]
    assert 0 < step < 60 and not (tmp_path / "killed" / "metrics.json").exists()
    rerun = _cli(cfg, tmp_path / "killed", tmp_path)
    assert rerun.wait(timeout=300) == 0, rerun.stdout.read()
    assert_same(outcome(tmp_path / "straight"), outcome(tmp_path / "killed"))
    print(f"{sig.name} at step {step} of 60; resumed run equals the uninterrupted one exactly")


def test_checkpoint_of_another_run_and_corrupt_checkpoint_are_errors(tmp_path):
    T.run_recipe(recipe("full", steps=4), tmp_path)
    with pytest.raises(ValueError, match="Invalid checkpoint .* holds run 'full' of 4 steps"):
        T.run_recipe(recipe("full", steps=8), tmp_path)
    (tmp_path / "checkpoint" / "last.pt").write_bytes(b"truncated")
    with pytest.raises(RuntimeError, match="Invalid checkpoint .*delete it to start over"):
        T.run_recipe(recipe("full", steps=4), tmp_path)


def test_recipe_errors_name_the_value(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(recipe("full")))
    with pytest.raises(ValueError, match="Invalid train keys \\['stepz'\\]"):
        T.load_recipe(p, ["train.stepz=3"])
    with pytest.raises(ValueError, match="Invalid override: 'steps'"):
        T.load_recipe(p, ["steps"])
    with pytest.raises(ValueError, match="Invalid recipe keys \\['optimiser'\\]"):
        T.load_recipe(p, ["optimiser=adam"])
    with pytest.raises(ValueError, match="Invalid config"):
        T.load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="Invalid grad_accum: 3 .*dividing batch_size=4"):
        T.LMTrainConfig(batch_size=4, grad_accum=3)
    with pytest.raises(ValueError, match="Invalid precision: 'fp16'"):
        T.LMTrainConfig(precision="fp16")


def test_grad_accumulation_matches_one_batch(tmp_path):
    """Two micro-batches give the step of the whole batch (fp32 summation order aside)."""
    a = T.run_recipe(recipe("full", steps=4), tmp_path / "a")
    r = recipe("full", steps=4)
    r["train"]["grad_accum"] = 2
    b = T.run_recipe(r, tmp_path / "b")
    assert b.final["val_loss"] == pytest.approx(a.final["val_loss"], rel=1e-5)
    pa, pb = outcome(tmp_path / "a")[2], outcome(tmp_path / "b")[2]
    assert max((pa[k] - pb[k]).abs().max().item() for k in pa) < 1e-5


def test_the_shipped_recipe_loads():
    r = T.load_recipe(Path(T.__file__).parents[1] / "configs/train/tiny_cpu.yaml")
    T.LMTrainConfig(**r["train"])
