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


# ---- issue 22: a resume with another configuration, the global RNG, the command line's errors
@pytest.mark.parametrize("change", [("train", "lr", 3e-2), ("method_options", "rank", 2)], ids=["lr", "rank"])
def test_resume_with_a_changed_config_is_an_error_naming_the_keys(change, tmp_path, monkeypatch):
    """A crashed run rerun with another lr or rank in the same directory must not train on with the
    checkpoint's values while the record states the new ones; --restart starts over."""
    base = recipe("galore", steps=8)
    calls, windows = {"n": 0}, T.random_windows

    def crashing(*a, **k):  # dies in step 6, after the checkpoint of step 4
        calls["n"] += 1
        if calls["n"] == 6:
            raise Crash
        return windows(*a, **k)
    monkeypatch.setattr(T, "random_windows", crashing)
    with pytest.raises(Crash):
        T.run_recipe(base, tmp_path / "run")
    monkeypatch.setattr(T, "random_windows", windows)
    section, key, value = change
    changed = recipe("galore", steps=8)
    changed[section][key] = value
    old = base[section][key]
    with pytest.raises(ValueError, match=f"another configuration .*{key}: {old!r} -> {value!r}.*--restart"):
        T.run_recipe(changed, tmp_path / "run")
    fresh = T.run_recipe(changed, tmp_path / "fresh")
    restarted = T.run_recipe(changed, tmp_path / "run", restart=True)
    assert restarted.final["val_loss"] == fresh.final["val_loss"] and restarted.history == fresh.history


class _DropoutLM(torch.nn.Module):
    """A tiny LM whose training draws on the global torch RNG (dropout), as dropout in any model does."""

    def __init__(self, vocab):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.drop, self.head = torch.nn.Embedding(vocab, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, vocab)

    def forward(self, input_ids):
        return type("Out", (), {"logits": self.head(self.drop(self.emb(input_ids)))})()


def test_resume_restores_the_global_rng_so_dropout_masks_match(tmp_path, monkeypatch):
    from lrkit import data

    corpus = data.load("shakespeare", vocab_size=4096)
    cfg = T.LMTrainConfig(steps=8, batch_size=4, seq_len=16, lr=1e-2, eval_every=4, eval_windows=4, device="cpu")

    def run(out):
        model = _DropoutLM(corpus.vocab_size)
        return T.train_lm("drop", model, torch.optim.SGD(model.parameters(), lr=0.5), corpus, cfg,
                          checkpoint_dir=out, checkpoint_every=4), model
    straight, m1 = run(tmp_path / "a")
    calls, windows = {"n": 0}, T.random_windows

    def crashing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 6:
            torch.rand(100)  # the global RNG moves on before the crash, as it would in a real process
            raise Crash
        return windows(*a, **k)
    monkeypatch.setattr(T, "random_windows", crashing)
    with pytest.raises(Crash):
        run(tmp_path / "b")
    monkeypatch.setattr(T, "random_windows", windows)
    resumed, m2 = run(tmp_path / "b")
    assert resumed.history == straight.history
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))


def _cli_run(tmp_path, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(T.__file__).parents[1])}
    return subprocess.run([sys.executable, "-m", "lrkit.train", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def test_cli_errors_are_one_line_with_exit_status_2_and_debug_shows_the_traceback(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(recipe("full")))
    res = _cli_run(tmp_path, "--config", str(p), "--set", "train.stepz=3", "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]  # one line
    assert "error: Invalid train keys ['stepz']" in res.stderr
    res = _cli_run(tmp_path, "--config", str(p), "--set", "train.stepz=3", "--debug")
    assert res.returncode != 0 and "Traceback" in res.stderr and "Invalid train keys" in res.stderr


def test_recipe_that_is_a_list_or_binary_and_numbers_without_a_dot(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("- method: full\n- model_size: nano\n")
    with pytest.raises(ValueError, match="holds a list, not a mapping"):
        T.load_recipe(p)
    p.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="is not a YAML text file"):
        T.load_recipe(p)
    p.write_text(yaml.safe_dump(recipe("full")))
    r = T.load_recipe(p, ["train.lr=1e-3", "name='1e-3'"])
    assert r["train"]["lr"] == 0.001 and r["name"] == "1e-3"  # a number as a user means it; quotes keep a string
    T.LMTrainConfig(**r["train"])
